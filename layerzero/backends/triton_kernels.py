"""LayerZero's own Triton kernels: `triton.rms_norm` (residual add fused), `triton.rope` (q and k
in one launch) and `triton.swiglu` / `triton.geglu` (activation and product in one pass). The
kernels live in `_triton_impl` (imported on first use: it imports triton); norm and RoPE take any
strides, so transposed or sliced inputs need no copy, the gated ones any row stride. All are
`torch.library` custom ops (`layerzero::triton_rms_norm`, `layerzero::triton_rope`,
`layerzero::triton_gated`) with fake implementations, so torch.compile traces them as one call each; in eager mode the public
functions call the implementation directly (the custom op's dispatch costs tens of us a call).

They run on CUDA, and on the CPU under TRITON_INTERPRET=1 (how the CPU tests check them; the
interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even, so CPU checks use fp32
and fp16).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import probe
from ..registry import register
from . import priorities
from ._gpu import eager, lazy_module, triton_reasons

_IMPL = "layerzero.backends._triton_impl"
_kernels = lazy_module(_IMPL)                  # the _triton_impl module, once imported


@torch.library.custom_op("layerzero::triton_rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float,
                residual: Optional[torch.Tensor], offset: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, x + residual); the second is an empty tensor without a residual. A custom op, so
    torch.compile sees one call."""
    out = _kernels().rms_norm(x, weight, eps, residual, offset)
    return out if residual is not None else (out, x.new_empty(0))


@rms_norm_op.register_fake
def _(x, weight, eps, residual, offset):
    return x.new_empty(x.shape), x.new_empty(x.shape if residual is not None else (0,))


@torch.library.custom_op("layerzero::triton_rope", mutates_args=())
def rope_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str,
            interleaved: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return _kernels().rope(q, k, cos, sin, layout, interleaved)


@rope_op.register_fake
def _(q, k, cos, sin, layout, interleaved):
    return torch.empty_like(q), k.new_empty(k.shape)      # strides as the kernel's (see _triton_impl.rope)


@torch.library.custom_op("layerzero::triton_gated", mutates_args=())
def gated_op(gate: torch.Tensor, up: torch.Tensor, act: int) -> torch.Tensor:
    return _kernels().gated(gate, up, act)


@gated_op.register_fake
def _(gate, up, act):
    return gate.new_empty(gate.shape)


_ACTS = {"silu": 0, "none": 1, "tanh": 2}      # _triton_impl's _SILU, _GELU_ERF, _GELU_TANH


def _gated(gate, up, act):
    return _kernels().gated(gate, up, act) if eager(gate) else gated_op(gate, up, act)


def swiglu(gate, up):
    return _gated(gate, up, 0)


def geglu(gate, up, approximate):
    return _gated(gate, up, _ACTS[approximate])


def rms_norm(x, weight, eps, residual, offset):
    if eager(x):                               # no custom-op dispatch
        return _kernels().rms_norm(x, weight, float(eps), residual, float(offset))
    y, s = rms_norm_op(x, weight, float(eps), residual, float(offset))
    return (y, s) if residual is not None else y


def rope(q, k, cos, sin, layout, interleaved):
    if eager(q):
        return _kernels().rope(q, k, cos, sin, layout, interleaved)
    return rope_op(q, k, cos, sin, layout, interleaved)


def supports_rms(spec) -> list[str]:
    r = triton_reasons(spec, "triton.rms_norm")
    if spec.head_dim > 65536:
        r.append(f"triton.rms_norm keeps a row in registers: hidden size <= 65536, got {spec.head_dim}")
    return r


def supports_rope(spec) -> list[str]:
    return triton_reasons(spec, "triton.rope")


def supports_swiglu(spec) -> list[str]:
    return triton_reasons(spec, "triton.swiglu")


def supports_geglu(spec) -> list[str]:
    return triton_reasons(spec, "triton.geglu")


probe.define(_IMPL, """
from layerzero.backends import _triton_impl as T
if dev:
    x = torch.randn(4, 64, device=dev, dtype=torch.bfloat16)
    T.rms_norm(x, torch.ones(64, device=dev), 1e-6, x, 0.0)
""", ("triton",), needs="cuda_or_interpreter")

# With a residual the fused kernel does 2 reads + 2 writes where torch does 3 + 2: it comes
# first there; without one, Liger's tuned kernel does (see priorities.by_size for small tensors).
# All four come first in a traced "matvec" graph (lz.generate's batch-1 step): priorities.MATVEC_OPAQUE.
_matvec = priorities.opaque_in_matvec
register("rms_norm", "triton.rms_norm", rms_norm,
         priority=_matvec(priorities.by_size(58, 44, min_elems=1 << 23, residual=62)),
         supports=supports_rms, requires=(_IMPL,))
register("rope", "triton.rope", rope, priority=_matvec(priorities.gpu_only(60)), supports=supports_rope,
         requires=(_IMPL,))
# One pass (2 reads, 1 write) where torch's form is two kernels (silu, then the product: 3 reads,
# 2 writes). H100 (benchmarks/results/kernels_micro_h100.txt), us GPU / host: 2048x8192 bf16
# 36 / 31 against torch's 60 / 24 and Liger's 35 / 77; 8192x14336 233 / 34, Liger's 233 / 69. One
# decode row (1x8192) is host time only: torch's two launches 22 us a call, this one 31. So it
# comes first from 8M elements (where torch's two passes take longer on the GPU than its launches
# on the host); below, torch's form (priority 0) does.
_gated_priority = _matvec(priorities.by_size(62, -1, min_elems=1 << 23))
register("swiglu", "triton.swiglu", swiglu, priority=_gated_priority, supports=supports_swiglu,
         requires=(_IMPL,))
register("geglu", "triton.geglu", geglu, priority=_gated_priority, supports=supports_geglu,
         requires=(_IMPL,))
