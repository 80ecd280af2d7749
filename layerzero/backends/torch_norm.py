"""torch's fused norms: F.rms_norm (torch >= 2.4) and F.layer_norm as `torch.rms_norm` /
`torch.layer_norm`. Low-precision inputs are normalised in float32, as the op's contract says."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import register


def rms_norm(x, weight, eps, residual, offset):
    if residual is not None:
        x = x + residual
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


register("rms_norm", "torch.rms_norm", rms_norm, priority=50, supports=supports_rms)
register("layer_norm", "torch.layer_norm", layer_norm, priority=50)
