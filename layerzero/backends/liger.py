"""Liger-Kernel's Triton ops as kernels: `liger.rms_norm`, `liger.layer_norm`, `liger.rope`,
`liger.swiglu`, `liger.geglu`.

- rms_norm: LigerRMSNormFunction with casting_mode="gemma" (everything in fp32, the op's
  contract) and Liger's `offset` (Gemma's 1 + w); with `residual`, LigerFusedAddRMSNormFunction
  returns (y, x + residual) from one pass over fresh tensors (the inputs are not modified).
- layer_norm: LigerLayerNormFunction (needs weight and bias); residual is added first.
- rope: LigerRopeFunction, llama's rotate_half form only. Liger reads only the first half of
  cos/sin (it assumes each angle appears twice, in halves, as transformers builds them) and
  rotates in place, so q/k are copied first unless the transpose Liger makes already copies.
- swiglu: LigerSiLUMulFunction; geglu: LigerGELUMulFunction, tanh approximation only.

Liger runs on CUDA; on the CPU only under TRITON_INTERPRET=1, where its rope works (its norm
and gated kernels don't: they call `.to()` on Python-float arguments, which the interpreter passes
as plain floats). Liger's norms pay a Triton launch (~10-20 us), so small tensors go to torch.
"""
from __future__ import annotations

import torch

from .. import probe
from ..registry import register
from . import priorities
from ._gpu import triton_reasons

_NORM, _ROPE, _ACT = "liger_kernel.ops.rms_norm", "liger_kernel.ops.rope", "liger_kernel.ops.swiglu"


def rms_norm(x, weight, eps, residual, offset):
    shape, h = x.shape, x.shape[-1]
    x2 = x.reshape(-1, h)
    if residual is not None:
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
        w = weight if weight is not None else torch.ones(h, dtype=x.dtype, device=x.device)
        y, s = LigerFusedAddRMSNormFunction.apply(x2, residual.reshape(-1, h), w, eps, offset, "gemma", False)
        return y.view(shape), s.view(shape)
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    return LigerRMSNormFunction.apply(x2, weight, eps, offset, "gemma", False).view(shape)


def layer_norm(x, weight, bias, eps, residual):
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    if residual is not None:
        x = x + residual
    y = LigerLayerNormFunction.apply(x.reshape(-1, x.shape[-1]), weight, bias, eps).view(x.shape)
    return (y, x) if residual is not None else y


def _private(t, layout):
    """A (B, H, S, D) view over a (B, S, H, D)-contiguous copy Liger may overwrite in place."""
    tb = t.transpose(1, 2) if layout == "bhsd" else t            # (B, S, H, D)
    if tb.is_contiguous():                                       # Liger would write into the input
        tb = tb.clone()
    return tb.transpose(1, 2)                                    # (B, H, S, D), as Liger takes it


def rope(q, k, cos, sin, layout, interleaved):
    from liger_kernel.ops.rope import LigerRopeFunction
    s = q.shape[2] if layout == "bhsd" else q.shape[1]
    if cos.shape[-2] != s:                                       # (.., 1, D_rot) broadcast over S
        cos, sin = cos.expand(*cos.shape[:-2], s, cos.shape[-1]), sin.expand(*sin.shape[:-2], s, sin.shape[-1])
    qo, ko = LigerRopeFunction.apply(_private(q, layout), _private(k, layout), cos, sin)
    if layout == "bshd":
        qo, ko = qo.transpose(1, 2), ko.transpose(1, 2)
    return qo, ko


def swiglu(gate, up):
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    return LigerSiLUMulFunction.apply(gate.contiguous(), up.contiguous())


def geglu(gate, up, approximate):
    from liger_kernel.ops.geglu import LigerGELUMulFunction
    return LigerGELUMulFunction.apply(gate.contiguous(), up.contiguous())


def _cuda_only(spec, name) -> list[str]:
    """Liger's norm and gated kernels fail under TRITON_INTERPRET (see the module docstring)."""
    r = triton_reasons(spec, name)
    if spec.device == "cpu" and not r:
        r.append(f"{name} runs on CUDA only (its kernels don't run under TRITON_INTERPRET)")
    return r


def supports_rms(spec) -> list[str]:
    return _cuda_only(spec, "liger.rms_norm")


def supports_layer_norm(spec) -> list[str]:
    r = _cuda_only(spec, "liger.layer_norm")
    if "no_weight" in spec.flags or "no_bias" in spec.flags:
        r.append("Liger's layer_norm needs both weight and bias")
    return r


def supports_rope(spec) -> list[str]:
    r = triton_reasons(spec, "liger.rope")
    if "interleaved" in spec.flags:
        r.append("Liger's rope has only the rotate_half (llama) form, not interleaved pairs")
    return r


def supports_swiglu(spec) -> list[str]:
    return _cuda_only(spec, "liger.swiglu")


def supports_geglu(spec) -> list[str]:
    r = _cuda_only(spec, "liger.geglu")
    if "gelu_tanh" not in spec.flags:
        r.append("Liger's geglu uses the tanh approximation only (approximate='tanh')")
    return r


_LN, _GEGLU = "liger_kernel.ops.layer_norm", "liger_kernel.ops.geglu"


def _probe(module: str, call: str) -> None:
    """Probe `module` (crash-isolated, see probe.py): import its Liger function and, on a GPU, run
    `call` on a (4, 64) bf16 `x` and a (64,) `w`. Each kernel requires only its own module, so an
    unavailable kernel names the module it really needs."""
    name = call.split(".")[0]
    probe.define(module, f"from {module} import {name}\nif dev:\n"
                 "    x = torch.randn(4, 64, device=dev, dtype=torch.bfloat16)\n"
                 "    w = torch.ones(64, device=dev, dtype=torch.bfloat16)\n"
                 f"    {call}\n", ("liger-kernel", "triton"), needs="cuda_or_interpreter")


_probe(_NORM, 'LigerRMSNormFunction.apply(x, w, 1e-6, 0.0, "gemma", False)')
_probe(_LN, "LigerLayerNormFunction.apply(x, w, w - 1, 1e-6)")
_probe(_ROPE, "LigerRopeFunction.apply(x.view(1, 4, 1, 64), x.view(1, 4, 1, 64).clone(), "
              "w[None, None], w[None, None])")                    # q, k (B, H, S, D); cos, sin
_probe(_ACT, "LigerSiLUMulFunction.apply(x, x.clone())")
_probe(_GEGLU, "LigerGELUMulFunction.apply(x, x.clone())")

_big = priorities.by_size(60, 45, min_elems=1 << 23)
# The gated activations have a torch form of two elementwise kernels (reference.swiglu, priority
# 0); Liger's one pass saves ~40% of their GPU time but its launch costs ~40 us more host time,
# which pays only from ~32M elements (a 64 MB bf16 gate) up; below, plain torch runs them.
_gated = priorities.by_size(60, -1, min_elems=1 << 25)
register("rms_norm", "liger.rms_norm", rms_norm, priority=_big, supports=supports_rms, requires=(_NORM,))
register("layer_norm", "liger.layer_norm", layer_norm, priority=_big, supports=supports_layer_norm,
         requires=(_LN,))
register("rope", "liger.rope", rope, priority=priorities.gpu_only(55), supports=supports_rope, requires=(_ROPE,))
register("swiglu", "liger.swiglu", swiglu, priority=_gated, supports=supports_swiglu, requires=(_ACT,))
register("geglu", "liger.geglu", geglu, priority=_gated, supports=supports_geglu, requires=(_GEGLU,))
