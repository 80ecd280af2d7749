"""Property-based: random valid attention calls match the float64 reference (never NaN);
random invalid ones raise ValueError/TypeError naming the argument (never a crash).

FlexAttention is denied here: it compiles per shape on the CPU (seconds each) and has its own
grid in test_attention_grid.py; every other kernel is reachable."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import layerzero as lz
from helpers import assert_fa_rule, attention_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def attention_calls(draw):
    b = draw(st.integers(1, 3))
    hkv = draw(st.integers(1, 3))
    hq = hkv * draw(st.sampled_from([1, 2, 3]))
    sq, sk = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    d = draw(st.sampled_from([8, 12, 16, 40]))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(["bhsd", "bshd"]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)

    def t(h, s):
        shape = (b, h, s, d) if layout == "bhsd" else (b, s, h, d)
        return torch.randn(*shape, generator=g).to(dtype)

    q, k, v = t(hq, sq), t(hkv, sk), t(hkv, sk)
    if draw(st.booleans()):   # same values, last dim strided (a transposed buffer's view)
        q, k, v = (x.transpose(-1, -2).contiguous().transpose(-1, -2) if draw(st.booleans()) else x
                   for x in (q, k, v))
    kw = {"layout": layout}
    if draw(st.booleans()):
        kw["is_causal"] = True
        kw["causal_align"] = draw(st.sampled_from(["top_left", "bottom_right"]))
    if draw(st.booleans()):
        kw["window"] = (draw(st.integers(-1, 6)), draw(st.integers(-1, 6)))
        kw.setdefault("causal_align", draw(st.sampled_from(["top_left", "bottom_right"])))
    mask = draw(st.sampled_from([None, "bool", "float"]))
    if mask:
        shape = tuple(draw(st.sampled_from([1, n])) for n in (b, hq, sq, sk))
        shape = shape[draw(st.integers(0, 2)):]                 # fewer leading dims broadcast too
        kw["attn_mask"] = (torch.rand(*shape, generator=g) > 0.3 if mask == "bool"
                           else torch.randn(*shape, generator=g).to(dtype))
    if draw(st.booleans()):
        kw["softcap"] = draw(st.floats(1.0, 50.0))
    if draw(st.booleans()):
        kw["alibi_slopes"] = torch.rand(*((hq,) if draw(st.booleans()) else (b, hq)), generator=g)
    if draw(st.booleans()):
        kw["sinks"] = torch.randn(hq, generator=g)
    if draw(st.booleans()):
        kw["scale"] = draw(st.floats(0.05, 2.0))
    return q, k, v, kw


def _noflex():
    lz.configure(policy={"deny": [{"kernel": "torch.flex"}]})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attention_calls())
def test_valid_calls_match_reference(call):
    _noflex()
    q, k, v, kw = call
    out = lz.attention(q, k, v, **kw)
    assert not torch.isnan(out).any()
    ref, base = attention_reference(q, k, v, **kw)
    assert_fa_rule(out, ref, base, f"{lz.which('attention', q, k, v, **kw)} {kw}")


# (mutation, exception type, text the message must contain)
def _corrupt(q, k, v, kw, which):
    kw = dict(kw)
    if which == "k_dtype":
        k = k.double() if k.dtype != torch.float64 else k.float()
        return q, k, v, kw, TypeError, "k has dtype"
    if which == "q_3d":
        return q[0], k, v, kw, ValueError, "q must be 4-D"
    if which == "q_not_tensor":
        return q.tolist(), k, v, kw, TypeError, "q must be a torch.Tensor"
    if which == "int_dtype":
        return q.long(), k.long(), v.long(), kw, TypeError, "q has dtype torch.int64"
    if which == "heads":                       # Hq + 1 kv heads never divide Hq
        axis = 1 if kw["layout"] == "bhsd" else 2
        grow = lambda t: t.narrow(axis, 0, 1).repeat_interleave(q.shape[axis] + 1, dim=axis)  # noqa: E731
        return q, grow(k), grow(v), kw, ValueError, "multiple of k/v heads"
    if which == "head_dim":
        return q, k[..., :-1], v, kw, ValueError, "same head_dim"
    if which == "mask_shape":
        kw["attn_mask"] = torch.ones(7, 1, 1, 1, 1, dtype=torch.bool)
        return q, k, v, kw, ValueError, "attn_mask of shape"
    if which == "mask_dtype":
        kw["attn_mask"] = torch.ones(1, dtype=torch.int32)
        return q, k, v, kw, TypeError, "attn_mask has dtype"
    table = {
        "window_neg": ("window", (-2, 0), ValueError, "window left=-2"),
        "window_type": ("window", (1.5, 0), TypeError, "window left must be an int"),
        "window_len": ("window", (1, 2, 3), TypeError, "window must be a (left, right) pair"),
        "softcap_neg": ("softcap", -1.0, ValueError, "softcap=-1.0"),
        "scale_zero": ("scale", 0.0, ValueError, "scale=0.0"),
        "scale_tensor": ("scale", torch.tensor(0.5), TypeError, "scale must be a Python number"),
        "dropout": ("dropout_p", 1.5, ValueError, "dropout_p=1.5"),
        "layout": ("layout", "bsdh", ValueError, "layout='bsdh'"),
        "align": ("causal_align", "left", ValueError, "causal_align='left'"),
        "causal": ("is_causal", "yes", TypeError, "is_causal must be a bool"),
        "alibi": ("alibi_slopes", torch.ones(99), ValueError, "alibi_slopes has shape (99,)"),
        "sinks": ("sinks", torch.ones(2, 99), ValueError, "sinks has shape (2, 99)"),
    }
    name, value, exc, text = table[which]
    kw[name] = value
    return q, k, v, kw, exc, text


CORRUPTIONS = ["k_dtype", "q_3d", "q_not_tensor", "int_dtype", "heads", "head_dim", "mask_shape",
               "mask_dtype", "window_neg", "window_type", "window_len", "softcap_neg", "scale_zero",
               "scale_tensor", "dropout", "layout", "align", "causal", "alibi", "sinks"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attention_calls(), st.sampled_from(CORRUPTIONS), st.booleans())
def test_invalid_calls_raise_naming_the_argument(call, which, warm):
    _noflex()
    q, k, v, kw = call
    if warm:
        lz.attention(q, k, v, **kw)          # a cached decision must not let bad input through
    q2, k2, v2, kw2, exc, text = _corrupt(q, k, v, kw, which)
    with pytest.raises(exc) as err:
        lz.attention(q2, k2, v2, **kw2)
    assert text in str(err.value), f"{which}: {err.value}"
    assert lz.metrics()["fallbacks"] == {}
