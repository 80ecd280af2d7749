"""LayerZero: each op call runs the fastest kernel that can correctly run it on this machine.

    import layerzero as lz
    out = lz.attention(q, k, v, is_causal=True)
    lz.which("attention", q, k, v, is_causal=True)   # -> "torch.sdpa"
    print(lz.explain("attention", q, k, v, is_causal=True))
"""
from __future__ import annotations

__version__ = "0.1.0"

from importlib import import_module as _import_module

_import_module(f"{__name__}.backends")  # registers the built-in kernels

from .control import configure, lock, unlock, use
from .doctor import doctor
from .generation import generate
from .speculative import SpeculativeStats, speculative_generate
from .inspect import explain, kernels, which
from .ops import attention, geglu, layer_norm, paged_attention, rms_norm, rope, sample, swiglu
from .registry import register
from .warmup import warmup
from .telemetry import metrics
from .telemetry import opentelemetry as metrics_opentelemetry
from .telemetry import reset as reset_metrics
from .telemetry import serve as metrics_server
from .patch import auto_patch, patch, unpatch
from .control import load_environment as _load_environment
from . import compiled as _compiled, ops as _ops
from .patching.hooks import when_imported as _when_imported

_load_environment()
# Registrations with optional packages, made when (and only if) the user imports them. The
# integrations (transformers, diffusers) make theirs when imported, and register with lz.patch;
# this is the one place in layerzero that imports them (the patching layers below never do).
_import_module(f"{__name__}.integrations")
_when_imported("torch._dynamo", lambda _m: _compiled.install(_ops.PUBLIC))

__all__ = ["attention", "rms_norm", "layer_norm", "rope", "swiglu", "geglu", "sample", "paged_attention",
           "PagedKVCache", "register",
           "which", "explain", "kernels", "doctor", "metrics", "reset_metrics", "metrics_server",
           "metrics_opentelemetry", "configure", "lock",
           "unlock", "use", "patch", "unpatch", "auto_patch", "warmup", "generate",
           "speculative_generate", "SpeculativeStats"]


def __getattr__(name: str):
    """`lz.PagedKVCache`, a transformers Cache: imported (with transformers) on first use."""
    if name == "PagedKVCache":
        from .paged.cache import PagedKVCache
        return PagedKVCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
