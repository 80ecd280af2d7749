"""torch's fused norms: F.rms_norm (torch >= 2.4) and F.layer_norm as `torch.rms_norm` /
`torch.layer_norm`. Low-precision inputs are normalised in float32, as the op's contract says:
on CUDA, torch's fused kernels (`aten._fused_rms_norm`, torch >= 2.8, and layer_norm's) take
half/bf16 inputs and accumulate in float32 themselves, one kernel and one cheap launch; elsewhere
the input is upcast first."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import register


_FUSED_RMS = hasattr(torch.ops.aten, "_fused_rms_norm")


def rms_norm(x, weight, eps, residual, offset):
    if residual is not None:
        x = x + residual
    if _FUSED_RMS and x.is_cuda and offset == 0.0 and (weight is None or weight.dtype == x.dtype):
        y = F.rms_norm(x, (x.shape[-1],), weight, eps)
        return (y, x) if residual is not None else y
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    w = None
    if weight is not None:
        w = weight.to(xf.dtype)
        if offset != 0.0:
            w = w + offset
    y = F.rms_norm(xf, (x.shape[-1],), w, eps).to(x.dtype)
    return (y, x) if residual is not None else y


def layer_norm(x, weight, bias, eps, residual):
    if residual is not None:
        x = x + residual
    if x.is_cuda and all(p is None or p.dtype == x.dtype for p in (weight, bias)):
        # the CUDA kernel accumulates half/bf16 in float32 itself; an upcast copy costs 4x the time
        y = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
        return (y, x) if residual is not None else y
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    w = None if weight is None else weight.to(xf.dtype)
    b = None if bias is None else bias.to(xf.dtype)
    y = F.layer_norm(xf, (x.shape[-1],), w, b, eps).to(x.dtype)
    return (y, x) if residual is not None else y


def supports_rms(spec) -> list[str]:
    return [] if hasattr(F, "rms_norm") else [f"torch {torch.__version__} has no F.rms_norm"]


def rms_priority(spec) -> int:
    """50; on CUDA with torch's fused kernel and no offset, 61 (57 with a residual): ahead of
    Liger's and our Triton kernels, whose Python launch costs several times torch's (see
    priorities.by_size) for the same one pass over the row."""
    if spec.device == "cuda" and _FUSED_RMS and "offset" not in spec.flags:
        # with a residual: torch's add, then the fused kernel (two cheap launches), ahead of the
        # one-pass Triton/Liger kernels below their size thresholds (1x2048x2048 bf16 on the
        # H100: 19.9 vs Triton's 47.5 us a call), behind them above (8192x4096: 131.5 vs 98.1 us)
        return 57 if "residual" in spec.flags else 61
    return 50


register("rms_norm", "torch.rms_norm", rms_norm, priority=rms_priority, supports=supports_rms)
register("layer_norm", "torch.layer_norm", layer_norm, priority=50)
