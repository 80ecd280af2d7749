"""Checking a replacement by behaviour before it is swapped in: a candidate module's own forward
and the LayerZero replacement run on one small reproducible random input (`probe_input`), and
the module is patched only when their outputs `agree`. Replacements under test compute with
`layerzero.reference`, so a probe neither selects kernels nor counts calls.

Mechanics layer of `layerzero.patching` (above `swap`): imports nothing from the recognisers,
`layerzero.patch` or the integrations; anything above may import it.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .swap import swap_forward

# why a probe needing a module's weights was not run (a model built with `torch.device("meta")`,
# accelerate's `init_empty_weights`, ...); `lz.patch` on the model again, once loaded, probes it
META = ("parameters are on the meta device (not loaded) and no execution device is known, so the "
        "probe cannot run; call lz.patch(model) again once the weights are loaded")


def _tol(dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def agree(a, b, dtype) -> tuple[bool, float]:
    """Do two probe outputs agree for `dtype` (relative to the output's scale)? (ok, max error)."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape:
        return False, float("inf")
    a, b = a.detach().double(), b.detach().double()
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = max(b.abs().max().item() if b.numel() else 0.0, 1.0)
    return err <= _tol(dtype) * scale, err


def probe_input(shape, like: torch.Tensor | None, dtype=None, device=None) -> torch.Tensor:
    """A reproducible random probe tensor (never zeros) on `like`'s device and dtype."""
    g = torch.Generator().manual_seed(1234)
    dtype = dtype or (like.dtype if like is not None else torch.float32)
    device = device or (like.device if like is not None else "cpu")
    return torch.randn(shape, generator=g, device="cpu").to(dtype=dtype, device=device)


def param_device(module: nn.Module):
    """Where the module's parameters live, or its accelerate hook's execution device when they are
    offloaded (meta); None when unknown (META)."""
    p = next(module.parameters(recurse=True), None)
    if p is None:
        return None
    if p.device.type != "meta":
        return p.device
    for sub in module.modules():
        hook = getattr(sub, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or [hook]:
            dev = getattr(h, "execution_device", None)
            if dev is not None:
                return torch.device(dev)
    return None


def unloaded(model: nn.Module) -> bool:
    """Does the model still hold meta parameters without an execution device (see META)?"""
    return any(p.is_meta for p in model.parameters()) and param_device(model) is None


def run_original(module: nn.Module, x, **kwargs):
    """The module's current forward on a probe, without autograd and in eval mode."""
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            return module(x, **kwargs)
    finally:
        module.train(was)


def probe(module: nn.Module, make: Callable, x, **kwargs) -> tuple:
    """(module's output, output with forward `make(original)` swapped in) on probe input x (and
    keyword arguments). Both run through the module's hooks (accelerate loads offloaded weights
    for each)."""
    got = run_original(module, x, **kwargs)
    tmp: list = []
    swap_forward(module, make, tmp)
    try:
        want = run_original(module, x, **kwargs)
    finally:
        for fn in reversed(tmp):
            fn()
    return got, want
