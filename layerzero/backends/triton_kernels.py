"""LayerZero's own Triton kernels: `triton.rms_norm` (residual add fused) and `triton.rope`
(q and k in one launch). The kernels live in `_triton_impl` (imported on first use: it imports
triton); they take any strides, so transposed or sliced inputs need no copy.

They run on CUDA, and on the CPU under TRITON_INTERPRET=1 (how the CPU tests check them; the
interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even, so CPU checks use fp32
and fp16).
"""
from __future__ import annotations

from .. import probe
from ..registry import register
from . import priorities
from ._gpu import triton_reasons

_IMPL = "layerzero.backends._triton_impl"


def rms_norm(x, weight, eps, residual, offset):
    from ._triton_impl import rms_norm as run
    return run(x, weight, eps, residual, offset)


def rope(q, k, cos, sin, layout, interleaved):
    from ._triton_impl import rope as run
    return run(q, k, cos, sin, layout, interleaved)


def supports_rms(spec) -> list[str]:
    r = triton_reasons(spec, "triton.rms_norm")
    if spec.head_dim > 65536:
        r.append(f"triton.rms_norm keeps a row in registers: hidden size <= 65536, got {spec.head_dim}")
    return r


def supports_rope(spec) -> list[str]:
    return triton_reasons(spec, "triton.rope")


probe.define(_IMPL, """
from layerzero.backends import _triton_impl as T
if dev:
    x = torch.randn(4, 64, device=dev, dtype=torch.bfloat16)
    T.rms_norm(x, torch.ones(64, device=dev), 1e-6, x, 0.0)
""", ("triton",), needs="cuda_or_interpreter")

# With a residual the fused kernel does 2 reads + 2 writes where torch does 3 + 2: it comes
# first there; without one, Liger's tuned kernel does (see priorities.by_size for small tensors).
register("rms_norm", "triton.rms_norm", rms_norm, priority=priorities.by_size(58, 44, residual=62),
         supports=supports_rms, requires=(_IMPL,))
register("rope", "triton.rope", rope, priority=priorities.gpu_only(60), supports=supports_rope,
         requires=(_IMPL,))
