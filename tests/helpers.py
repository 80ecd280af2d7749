"""Shared test helpers: the flash-attention tolerance rule and call builders."""
from __future__ import annotations

import pytest
import torch

from layerzero import reference

# Rounding floor per dtype added to the flash-attention rule (absolute).
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}


def assert_fa_rule(out: torch.Tensor, ref64: torch.Tensor, baseline: torch.Tensor, what: str = ""):
    """|out - ref| <= 2 * |baseline - ref| + floor, elementwise max, where baseline is plain
    PyTorch in out's dtype and ref the float64 result."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype == baseline.dtype, f"{what}: dtype {out.dtype} != {baseline.dtype}"
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    err = (out.double() - ref64).abs().max().item()
    base = (baseline.double() - ref64).abs().max().item()
    bound = 2 * base + FLOOR[out.dtype]
    assert err <= bound, f"{what}: error {err:.3g} > 2 x baseline {base:.3g} + floor {FLOOR[out.dtype]:g}"


def attention_reference(q, k, v, **kw):
    """(float64 reference, same-dtype plain-PyTorch baseline) for an attention call."""
    def d(t):
        return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
    ref = reference.attention(d(q), d(k), d(v), **{n: d(x) for n, x in kw.items()})
    base = reference.attention(q, k, v, **kw, upcast=False)
    return ref, base


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run no faster on more threads, and much slower when other jobs share the
    cores: a module importing this fixture runs on one torch thread (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
