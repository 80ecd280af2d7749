"""Attention numerics the grid doesn't reach: torch.sdpa_flash on the CPU with inputs whose last
dim is strided and with attention sinks under autograd (issue 12 item 1), and float64 calls with
float64 masks, ALiBi and sinks kept in float64 by every kernel that builds a mask or bias
(item 2)."""
from __future__ import annotations

import pytest
import torch

import layerzero as lz
from layerzero import registry
from layerzero.backends import torch_flex
from helpers import assert_fa_rule, attention_reference

F64 = torch.float64


def _qkv(b=1, hq=4, hk=2, sq=6, sk=9, d=8, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, s, d, generator=g, dtype=F64).to(dtype)
                 for h, s in ((hq, sq), (hk, sk), (hk, sk)))


def _col_major(t):
    """Same values, last dim strided (stride(-1) != 1): the layout of a transposed buffer."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64], ids=str)
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_flash_cpu_takes_inputs_with_a_strided_last_dim(which, dtype):
    q, k, v = _qkv(dtype=dtype)
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(1))
    kw = {"sinks": sinks, "is_causal": True, "causal_align": "bottom_right"}
    args = {"q": q, "k": k, "v": v}
    args[which] = _col_major(args[which])
    assert args[which].stride(-1) != 1
    with lz.use("torch.sdpa_flash"):
        out = lz.attention(args["q"], args["k"], args["v"], **kw)
        plain = lz.attention(args["q"], args["k"], args["v"])
    ref, base = attention_reference(q, k, v, **kw)
    assert_fa_rule(out, ref, base, f"sinks, strided {which}")
    ref, base = attention_reference(q, k, v)
    assert_fa_rule(plain, ref, base, f"strided {which}")


@pytest.mark.parametrize("kw", [{}, {"is_causal": True, "causal_align": "bottom_right"},
                                {"mask": True}, {"window": (2, 1)}, {"layout": "bshd"}], ids=str)
def test_flash_cpu_sinks_gradients(kw):
    """gradcheck in float64: q, k, v and the sinks, GQA, with causal/mask/window/layout variants."""
    kw = dict(kw)
    q, k, v = _qkv(sq=4, sk=5, d=4)
    if kw.pop("mask", False):
        kw["attn_mask"] = torch.randn(1, 1, 4, 5, dtype=F64)
    sinks = torch.randn(4, dtype=F64)
    inputs = tuple(t.clone().requires_grad_() for t in (q, k, v, sinks))
    bshd = kw.get("layout") == "bshd"

    def f(q, k, v, sinks):
        if bshd:                       # (B, S, H, D) views of the same values
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        with lz.use("torch.sdpa_flash"):
            out = lz.attention(q, k, v, sinks=sinks, **kw)
        return out.transpose(1, 2) if bshd else out

    lz.reset_metrics()
    assert torch.autograd.gradcheck(f, inputs)
    assert set(lz.metrics()["calls"]["attention"]) == {"torch.sdpa_flash"}


def test_flash_cpu_sinks_gradients_match_reference_in_bfloat16():
    """A training step's gradients in bf16 (the gpt-oss case): within the flash-attention rule
    of plain PyTorch's, for q, k, v and the sinks."""
    q, k, v = _qkv(b=2, hq=4, hk=2, sq=16, sk=16, d=16, dtype=torch.bfloat16)
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(2)).bfloat16()
    grad_out = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3)).bfloat16()
    kw = {"is_causal": True}

    def grads(fn, cast):
        ins = [t.to(cast).detach().requires_grad_() for t in (q, k, v, sinks)]
        out = fn(*ins)
        return torch.autograd.grad(out, ins, grad_out.to(cast))

    from layerzero import reference
    with lz.use("torch.sdpa_flash"):
        got = grads(lambda q, k, v, s: lz.attention(q, k, v, sinks=s, **kw), torch.bfloat16)
    ref = grads(lambda q, k, v, s: reference.attention(q, k, v, sinks=s, **kw), F64)
    base = grads(lambda q, k, v, s: reference.attention(q, k, v, sinks=s, upcast=False, **kw),
                 torch.bfloat16)
    for name, a, r, b in zip(("q", "k", "v", "sinks"), got, ref, base):
        assert_fa_rule(a, r, b, f"d{name}")


CASES = {
    "float_mask": lambda g: {"attn_mask": torch.randn(2, 1, 6, 9, generator=g, dtype=F64)},
    "alibi": lambda g: {"alibi_slopes": torch.rand(4, generator=g, dtype=F64) + 0.1},
    "alibi_causal_br": lambda g: {"alibi_slopes": torch.rand(2, 4, generator=g, dtype=F64),
                                  "is_causal": True, "causal_align": "bottom_right"},
    "mask_window": lambda g: {"attn_mask": torch.randn(6, 9, generator=g, dtype=F64),
                              "window": (3, 1)},
    "sinks_mask": lambda g: {"sinks": torch.randn(4, generator=g, dtype=F64),
                             "attn_mask": torch.randn(1, 4, 6, 9, generator=g, dtype=F64)},
}


def _exact(q, k, v, kw):
    """float64 attention written out independently of layerzero.reference."""
    kw = dict(kw)
    hq, sq, sk = q.shape[1], q.shape[2], k.shape[2]
    k, v = (t.repeat_interleave(hq // t.shape[1], 1) for t in (k, v))
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    off = sk - sq if kw.get("causal_align") == "bottom_right" else 0
    i = torch.arange(sq, dtype=F64)[:, None] + off
    j = torch.arange(sk, dtype=F64)[None, :]
    if "alibi_slopes" in kw:
        sl = kw["alibi_slopes"]
        s = s - sl.reshape(-1, hq, 1, 1) * (i - j).abs()
    if "attn_mask" in kw:
        s = s + kw["attn_mask"]
    keep = torch.ones(sq, sk, dtype=torch.bool)
    if kw.get("is_causal"):
        keep &= j <= i
    if "window" in kw:
        keep &= (j >= i - kw["window"][0]) & (j <= i + kw["window"][1])
    s = s.masked_fill(~keep, float("-inf"))
    if "sinks" in kw:
        s = torch.cat([s, kw["sinks"].reshape(1, hq, 1, 1).expand(*s.shape[:3], 1)], -1)
        return s.softmax(-1)[..., :-1] @ v
    return s.softmax(-1) @ v


def _kernels_for(kw):
    q, k, v = _qkv(b=2)
    spec = lz.explain("attention", q, k, v, **kw).spec
    return [kid for kid in ("torch.sdpa", "torch.sdpa_math", "torch.sdpa_flash", "reference.attention")
            if not registry.get(kid).reasons(spec)]


@pytest.mark.parametrize("case", list(CASES))
def test_float64_masks_and_biases_stay_float64(case):
    q, k, v = _qkv(b=2)
    kw = CASES[case](torch.Generator().manual_seed(5))
    exact = _exact(q, k, v, kw)
    kernels = _kernels_for(kw)
    assert len(kernels) >= 2, kernels
    for kid in kernels:
        with lz.use(kid):
            out = lz.attention(q, k, v, **kw)
        err = (out - exact).abs().max().item()
        assert err < 1e-13, f"{kid} {case}: error {err:.2g} (float64 needs < 1e-13)"


@pytest.mark.parametrize("case", ["float_mask", "alibi_causal_br"])
def test_flex_score_mods_stay_float64(case, monkeypatch):
    """torch.flex's score mods (ALiBi, float mask) in float64, run through eager FlexAttention
    (the compiled program is the same code; compiling it on the CPU costs seconds)."""
    if importlib_find("torch.nn.attention.flex_attention") is None:
        pytest.skip("no FlexAttention in this torch")
    monkeypatch.setattr(torch_flex, "_compiled", lambda config: torch_flex._run_flex)
    q, k, v = _qkv(b=2, sq=16, sk=16)
    kw = CASES[case](torch.Generator().manual_seed(6))
    if case == "float_mask":
        kw["attn_mask"] = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(7), dtype=F64)
    out = torch_flex.flex(q, k, v, kw.get("attn_mask"), kw.get("is_causal", False), None, 0.0, None,
                          None, kw.get("alibi_slopes"), None, "bhsd", kw.get("causal_align", "top_left"))
    err = (out - _exact(q, k, v, kw)).abs().max().item()
    assert err < 1e-12, f"flex {case}: error {err:.2g}"


def importlib_find(name):
    import importlib.util
    try:
        return importlib.util.find_spec(name)
    except ModuleNotFoundError:
        return None
