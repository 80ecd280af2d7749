"""Every registered attention kernel x every feature it claims x odd shapes x dtypes, against a
float64 reference under the flash-attention rule, proving which kernel ran.

A kernel that rejects a feature must be refused by `lz.use(kernel)` with a ValueError (the
feature is never dropped). FlexAttention compiles per shape and configuration on the CPU, so it
runs on a covering subset: every feature once, rotating shapes, plus low-precision checks.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import layerzero as lz
from layerzero import reference, registry
from helpers import assert_fa_rule, attention_reference

# (B, Hq, Hkv, Sq, Sk, D): head_dim 40/72/96/128/256, Sq != Sk both ways, GQA 1/4/7, batch 1/3.
SHAPES = [(1, 4, 4, 17, 17, 40), (3, 8, 2, 9, 23, 72), (1, 7, 1, 5, 13, 96),
          (3, 4, 4, 33, 20, 128), (1, 4, 1, 8, 16, 256)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _mask_bool(b, h, sq, sk, g):
    m = torch.rand(b, 1, sq, sk, generator=g) > 0.3
    m[..., 0] = True
    return m


def _mask_float(b, h, sq, sk, g):
    return torch.randn(b, h, sq, sk, generator=g).clamp(-3, 3)


def _mask_empty_rows(b, h, sq, sk, g):
    m = torch.rand(b, 1, sq, sk, generator=g) > 0.3
    m[:, :, ::3] = False                  # every third query attends nothing -> zeros
    return m


# name -> function (shape, dtype, generator) -> kwargs for lz.attention (tensors in dtype)
def _features():
    def f(**kw):
        return lambda s, dt, g: kw
    return {
        "plain": f(),
        "causal_top_left": f(is_causal=True),
        "causal_bottom_right": f(is_causal=True, causal_align="bottom_right"),
        "scale": f(scale=0.3),
        "bool_mask": lambda s, dt, g: {"attn_mask": _mask_bool(s[0], s[1], s[3], s[4], g)},
        "float_mask": lambda s, dt, g: {"attn_mask": _mask_float(s[0], s[1], s[3], s[4], g).to(dt)},
        "empty_rows": lambda s, dt, g: {"attn_mask": _mask_empty_rows(s[0], s[1], s[3], s[4], g)},
        "mask_2d_and_3d": lambda s, dt, g: {"attn_mask": _mask_bool(1, 1, s[3], s[4], g)[0]},
        "mask_and_causal": lambda s, dt, g: {"attn_mask": _mask_bool(s[0], s[1], s[3], s[4], g),
                                             "is_causal": True},
        "window": f(window=(3, 2)),
        "window_causal_br": f(window=(4, -1), is_causal=True, causal_align="bottom_right"),
        "softcap": f(softcap=5.0),
        "alibi": lambda s, dt, g: {"alibi_slopes": torch.rand(s[1], generator=g) * 0.5},
        "alibi_batch_causal": lambda s, dt, g: {"alibi_slopes": torch.rand(s[0], s[1], generator=g),
                                                "is_causal": True},
        "sinks": lambda s, dt, g: {"sinks": torch.randn(s[1], generator=g)},
        "bshd": f(layout="bshd"),
        "non_contiguous": f(),            # q/k/v built as strided views, see _inputs
        "strided_last_dim": lambda s, dt, g: {"sinks": torch.randn(s[1], generator=g)},  # see _inputs
    }


FEATURES = _features()


def _inputs(shape, dtype, feature, g):
    b, hq, hkv, sq, sk, d = shape
    if feature == "bshd":
        mk = lambda h, s: torch.randn(b, s, h, d, generator=g).to(dtype)  # noqa: E731
    elif feature == "non_contiguous":  # (B, S, H, D) storage seen as (B, H, S, D), and a sliced D
        mk = lambda h, s: torch.randn(b, s, h, d + 8, generator=g).to(dtype)[..., :d].transpose(1, 2)  # noqa: E731
    elif feature == "strided_last_dim":  # a transposed buffer seen as (B, H, S, D): stride(-1) = S
        mk = lambda h, s: torch.randn(b, h, d, s, generator=g).to(dtype).transpose(-1, -2)  # noqa: E731
    else:
        mk = lambda h, s: torch.randn(b, h, s, d, generator=g).to(dtype)  # noqa: E731
    q, k, v = mk(hq, sq), mk(hkv, sk), mk(hkv, sk)
    kw = FEATURES[feature](shape, dtype, g)
    return q, k, v, kw


def _kernels():
    return [k.id for k in registry.op_kernels("attention") if registry.unavailable_reason(k) is None]


def _check(kernel, shape, dtype, feature):
    g = torch.Generator().manual_seed(hash((shape, feature)) % 2**31)
    q, k, v, kw = _inputs(shape, dtype, feature, g)
    spec = lz.explain("attention", q, k, v, **kw).spec
    reasons = registry.get(kernel).reasons(spec)
    if reasons:
        with lz.use(kernel), pytest.raises(ValueError, match="none of its kernels can run"):
            lz.attention(q, k, v, **kw)
        return False
    ref, base = attention_reference(q, k, v, **kw)
    lz.reset_metrics()
    with lz.use(kernel):
        assert lz.which("attention", q, k, v, **kw) == kernel
        out = lz.attention(q, k, v, **kw)
    assert lz.metrics()["calls"]["attention"] == {kernel: 1}
    assert lz.metrics()["fallbacks"] == {}
    assert_fa_rule(out, ref, base, f"{kernel} {feature} {shape} {dtype}")
    if feature == "empty_rows":
        rows = ~kw["attn_mask"].any(-1)                     # (B, 1, Sq): queries with no key
        assert (out.transpose(1, 2) if kw.get("layout") == "bshd" else out)[
            rows.expand(shape[0], shape[1], shape[3])].abs().max() == 0
    return True


FAST = ["torch.sdpa", "torch.sdpa_flash", "torch.sdpa_math", "reference.attention"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kernel", FAST)
def test_kernel_grid(kernel, shape, dtype):
    if kernel not in _kernels():
        pytest.skip(f"{kernel} unavailable here")
    ran = [f for f in FEATURES if _check(kernel, shape, dtype, f)]
    assert "plain" in ran


@pytest.mark.slow
@pytest.mark.parametrize("feature", list(FEATURES))
def test_flex_features(feature):
    """torch.flex: each feature once (fp32), shapes rotating over the grid."""
    if "torch.flex" not in _kernels():
        pytest.skip("FlexAttention unavailable")
    shape = SHAPES[list(FEATURES).index(feature) % len(SHAPES)]
    _check("torch.flex", shape, torch.float32, feature)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,feature,shape", [
    (torch.bfloat16, "causal_bottom_right", SHAPES[1]),
    (torch.float16, "softcap", SHAPES[2]),
    (torch.bfloat16, "window", SHAPES[4]),
], ids=str)
def test_flex_low_precision(dtype, feature, shape):
    if "torch.flex" not in _kernels():
        pytest.skip("FlexAttention unavailable")
    assert _check("torch.flex", shape, dtype, feature)


def test_every_available_kernel_is_covered():
    covered = set(FAST) | {"torch.flex"}
    cpu_only_missing = [k for k in _kernels() if k not in covered
                        and not registry.get(k).reasons(lz.explain("attention", *(
                            torch.randn(1, 2, 4, 8) for _ in range(3))).spec)]
    assert not cpu_only_missing, f"attention kernels that run here but have no grid: {cpu_only_missing}"


@pytest.mark.parametrize("kernel", ["torch.sdpa", "torch.sdpa_math", "reference.attention"])
def test_dropout(kernel):
    """Dropout is applied as given: seeded calls repeat, outputs differ from dropout 0, and the
    mean over many draws approaches the dropout-free result."""
    q, k, v = (torch.randn(1, 2, 6, 16) for _ in range(3))
    with lz.use(kernel):
        torch.manual_seed(1)
        a = lz.attention(q, k, v, dropout_p=0.5)
        torch.manual_seed(1)
        b = lz.attention(q, k, v, dropout_p=0.5)
        mean = torch.stack([lz.attention(q, k, v, dropout_p=0.5) for _ in range(800)]).mean(0)
    exact = reference.attention(q, k, v)
    torch.testing.assert_close(a, b)
    assert (a - exact).abs().max() > 1e-3
    assert (mean - exact).abs().max() < 0.25
    assert lz.metrics()["calls"]["attention"][kernel] == 802


def test_dropout_refused_by_kernels_without_it():
    q, k, v = (torch.randn(1, 2, 6, 16) for _ in range(3))
    for kernel in ["torch.sdpa_flash", "torch.flex"]:
        with lz.use(kernel), pytest.raises(ValueError, match="dropout"):
            lz.attention(q, k, v, dropout_p=0.1)


def test_float64_inputs_run():
    q, k, v = (torch.randn(2, 3, 5, 8, dtype=torch.float64) for _ in range(3))
    ref, _ = attention_reference(q, k, v, is_causal=True)
    torch.testing.assert_close(lz.attention(q, k, v, is_causal=True), ref)


def test_default_choice_on_cpu():
    """Plain calls go to SDPA; softcap (which SDPA can't express) to FlexAttention when the call
    is big enough to repay its compile, else to the reference; sinks to the flash-CPU kernel,
    which returns the log-sum-exp they need."""
    q, k, v = (torch.randn(1, 4, 8, 16) for _ in range(3))
    assert lz.which("attention", q, k, v, is_causal=True) == "torch.sdpa"
    assert lz.which("attention", q, k, v, softcap=30.0) == "reference.attention"
    big = torch.randn(1, 1, 512, 16)
    assert lz.which("attention", big, big, big, softcap=30.0) == "torch.flex"
    assert lz.which("attention", q, k, v, sinks=torch.randn(4)) == "torch.sdpa_flash"
    with torch.enable_grad():
        bg = big.clone().requires_grad_()
        assert lz.which("attention", bg, big, big, softcap=30.0) == "reference.attention"
