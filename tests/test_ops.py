"""Norms, RoPE, gated MLPs and sampling: every registered kernel x features x dtypes against the
float64 reference (and transformers' own functions where they define the semantics)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import layerzero as lz
from layerzero import reference, registry
from helpers import FLOOR

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _available(op):
    return [k.id for k in registry.op_kernels(op) if registry.unavailable_reason(k) is None]


def _run(op, kernel, *args, **kwargs):
    lz.reset_metrics()
    with lz.use(kernel):
        assert lz.which(op, *args, **kwargs) == kernel
        out = getattr(lz, op)(*args, **kwargs)
    assert lz.metrics()["calls"][op] == {kernel: 1}
    return out


def _close(out, ref64, base, what):
    """The flash-attention rule for elementwise ops: 2x the same-dtype baseline + floor."""
    err = (out.double() - ref64).abs().max().item()
    b = (base.double() - ref64).abs().max().item()
    assert out.dtype == base.dtype and err <= 2 * b + FLOOR[out.dtype], f"{what}: {err:.3g} vs {b:.3g}"


def _naive_rms(x, w, eps, offset):  # plain PyTorch in x's dtype
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * (offset + w) if w is not None else y


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", _available("rms_norm"))
@pytest.mark.parametrize("case", ["plain", "residual", "offset", "no_weight", "odd_3d"])
def test_rms_norm(kernel, case, dtype):
    g = torch.Generator().manual_seed(1)
    shape = (3, 5, 72) if case == "odd_3d" else (7, 96)
    x = torch.randn(*shape, generator=g).to(dtype)
    w = None if case == "no_weight" else (torch.randn(shape[-1], generator=g) * 0.5 + 1).to(dtype)
    r = torch.randn(*shape, generator=g).to(dtype) if case == "residual" else None
    offset = 1.0 if case == "offset" else 0.0
    out = _run("rms_norm", kernel, x, w, 1e-6, residual=r, offset=offset)
    xs = x + r if r is not None else x
    ref = reference.rms_norm(xs.double(), None if w is None else w.double(), 1e-6, offset=offset)
    base = _naive_rms(xs, w, 1e-6, offset)
    if r is not None:
        out, summed = out
        torch.testing.assert_close(summed, xs)
    _close(out, ref, base, f"{kernel} {case}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", _available("layer_norm"))
@pytest.mark.parametrize("case", ["plain", "residual", "no_affine", "no_bias"])
def test_layer_norm(kernel, case, dtype):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(6, 80, generator=g) * 3 + 1).to(dtype)
    w = None if case == "no_affine" else torch.randn(80, generator=g).to(dtype)
    b = None if case in ("no_affine", "no_bias") else torch.randn(80, generator=g).to(dtype)
    r = torch.randn(6, 80, generator=g).to(dtype) if case == "residual" else None
    out = _run("layer_norm", kernel, x, w, b, 1e-5, residual=r)
    xs = x + r if r is not None else x
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ref = F.layer_norm(xs.double(), (80,), d(w), d(b), 1e-5)
    base = F.layer_norm(xs, (80,), w, b, 1e-5)
    if r is not None:
        out, summed = out
        torch.testing.assert_close(summed, xs)
    _close(out, ref, base, f"{kernel} {case}")


def _hf_rope_inputs(b, s, d, rot, g):
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    pos = torch.arange(s).float()[None].expand(b, s) + torch.randint(0, 5, (b, 1), generator=g)
    freqs = pos[..., None] * inv                                  # (B, S, rot/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin(), freqs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", _available("rope"))
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("partial", [False, True])
def test_rope_matches_transformers_llama(kernel, layout, partial, dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(3)
    b, hq, hk, s, d = 2, 4, 2, 7, 64
    rot = 32 if partial else d
    cos, sin, _ = _hf_rope_inputs(b, s, d, rot, g)
    q = torch.randn(b, hq, s, d, generator=g).to(dtype)
    k = torch.randn(b, hk, s, d, generator=g).to(dtype)
    cos, sin = cos.to(dtype), sin.to(dtype)
    if layout == "bshd":
        oq, ok = _run("rope", kernel, q.transpose(1, 2), k.transpose(1, 2), cos, sin, layout="bshd")
        oq, ok = oq.transpose(1, 2), ok.transpose(1, 2)
    else:
        oq, ok = _run("rope", kernel, q, k, cos, sin)
    if partial:  # phi3-style partial rotary: the tail passes through
        rq, rk = apply_rotary_pos_emb(q[..., :rot].double(), k[..., :rot].double(), cos.double(), sin.double())
        rq, rk = torch.cat((rq, q[..., rot:].double()), -1), torch.cat((rk, k[..., rot:].double()), -1)
        bq, bk = apply_rotary_pos_emb(q[..., :rot], k[..., :rot], cos, sin)
        bq, bk = torch.cat((bq, q[..., rot:]), -1), torch.cat((bk, k[..., rot:]), -1)
    else:
        rq, rk = apply_rotary_pos_emb(q.double(), k.double(), cos.double(), sin.double())
        bq, bk = apply_rotary_pos_emb(q, k, cos, sin)
    _close(oq, rq, bq, f"{kernel} q")
    _close(ok, rk, bk, f"{kernel} k")


@pytest.mark.parametrize("kernel", _available("rope"))
def test_rope_interleaved_matches_gptj(kernel):
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb, create_sinusoidal_positions

    g = torch.Generator().manual_seed(4)
    b, h, s, d, rot = 2, 3, 6, 32, 16
    sincos = create_sinusoidal_positions(64, rot)[torch.arange(s)][None].expand(b, s, rot)
    sin, cos = torch.split(sincos, rot // 2, dim=-1)
    sin2, cos2 = sin.repeat_interleave(2, -1), cos.repeat_interleave(2, -1)  # (B, S, rot), pairs
    q = torch.randn(b, s, h, d, generator=g)                              # GPT-J: (B, S, H, D)
    k = torch.randn(b, s, h, d, generator=g)
    oq, ok = _run("rope", kernel, q, k, cos2, sin2, layout="bshd", interleaved=True)
    ref = lambda x: torch.cat((apply_rotary_pos_emb(x[..., :rot], sin, cos),  # noqa: E731
                               x[..., rot:]), -1)
    torch.testing.assert_close(oq, ref(q))
    torch.testing.assert_close(ok, ref(k))


def test_rope_accepts_2d_cos_sin():
    q, k = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    cos, sin = torch.randn(5, 8), torch.randn(5, 8)
    a = lz.rope(q, k, cos, sin)
    b = lz.rope(q, k, cos[None].expand(2, 5, 8), sin[None].expand(2, 5, 8))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,kw", [("swiglu", {}), ("geglu", {}), ("geglu", {"approximate": "tanh"})])
def test_gated(op, kw, dtype):
    g = torch.Generator().manual_seed(5)
    gate = (torch.randn(3, 5, 88, generator=g) * 2).to(dtype)
    up = torch.randn(3, 5, 88, generator=g).to(dtype)
    act = F.silu if op == "swiglu" else (lambda t: F.gelu(t, approximate=kw.get("approximate", "none")))
    for kernel in _available(op):
        out = _run(op, kernel, gate, up, **kw)
        _close(out, act(gate.double()) * up.double(), act(gate) * up, f"{kernel} {op}")


def _hf_filtered(logits, temperature, top_k, top_p, min_p):
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    x = logits.float()
    if temperature != 1.0:
        x = TemperatureLogitsWarper(temperature)(None, x)
    if top_k is not None:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p is not None:
        x = TopPLogitsWarper(top_p)(None, x)
    if min_p is not None:
        x = MinPLogitsWarper(min_p)(None, x)
    return x


@pytest.mark.parametrize("params", [
    dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8), dict(min_p=0.1),
    dict(temperature=1.3, top_k=20, top_p=0.9, min_p=0.05)], ids=str)
def test_sampling_filters_match_transformers(params):
    full = dict(temperature=1.0, top_k=None, top_p=None, min_p=None) | params
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(6)) * 3
    ours = reference.filter_logits(logits, **full)
    theirs = _hf_filtered(logits, **full)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    torch.testing.assert_close(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])


@pytest.mark.parametrize("kernel", _available("sample"))
def test_sample_kernels(kernel):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(7)) * 4
    greedy = _run("sample", kernel, logits, temperature=0.0)
    assert torch.equal(greedy, logits.argmax(-1))
    assert torch.equal(_run("sample", kernel, logits, top_k=1), logits.argmax(-1))
    a = _run("sample", kernel, logits, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = _run("sample", kernel, logits, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.long and a.shape == (6,)
    allowed = ~torch.isinf(reference.filter_logits(logits, top_p=0.9))
    assert allowed.gather(1, a[:, None]).all()


def test_sample_distribution():
    """Sampling follows softmax(logits / T) restricted to the kept tokens."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([lz.sample(logits, temperature=0.5, top_k=3, generator=gen) for _ in range(4000)])
    freq = torch.bincount(draws.flatten(), minlength=4).float() / 4000
    expect = torch.softmax(torch.tensor([2.0, 1.0, 0.0]) / 0.5, -1)
    assert freq[3] == 0
    torch.testing.assert_close(freq[:3], expect, atol=0.03, rtol=0)
