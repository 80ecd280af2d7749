"""xFormers adapter: bias-object translation, GQA in the 5-D form, aligned tensor biases and
zeroed empty rows, through a stand-in; and the GPU host's real state "installed, but its C++
ops don't load" reported as unavailable, through an on-disk stand-in probed in a subprocess."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch

import layerzero as lz
from layerzero import control, probe, reference, registry
from backend_standins import module, use_standins


class _Bias:
    def materialize(self, shape, dtype=torch.float32, device="cpu"):
        sq, sk = shape[-2:]
        i = torch.arange(sq)[:, None]
        j = torch.arange(sk)[None]
        return torch.zeros(shape, dtype=dtype).masked_fill(~self.keep(i, j, sk - sq), float("-inf"))


class LowerTriangularMask(_Bias):
    def keep(self, i, j, shift):
        return j <= i


class LowerTriangularFromBottomRightMask(_Bias):
    def keep(self, i, j, shift):
        return j <= i + shift


class LowerTriangularFromBottomRightLocalAttentionMask(_Bias):
    def __init__(self, window_size):
        self.window_size = window_size

    def keep(self, i, j, shift):
        return (j <= i + shift) & (j >= i + shift - self.window_size + 1)


class LocalAttentionFromBottomRightMask(_Bias):
    def __init__(self, window_left, window_right):
        self.window_left, self.window_right = window_left, window_right

    def keep(self, i, j, shift):
        return (j >= i + shift - self.window_left) & (j <= i + shift + self.window_right)


def _xformers(calls):
    def mea(q, k, v, attn_bias=None, p=0.0, scale=None, **kw):
        calls.append(dict(q=q, k=k, attn_bias=attn_bias))
        if q.dim() == 5:                                    # (B, M, G, H, K) -> (B, M, G*H, K)
            assert k.stride(3) == 0, "K is broadcast over the group, not copied"
            q, k, v = (t.flatten(2, 3) for t in (q, k, v))
        b, sq, h, _ = q.shape
        sk = k.shape[1]
        if isinstance(attn_bias, torch.Tensor):
            assert attn_bias.stride(-2) % 8 == 0, "xFormers needs an aligned bias"
            bias = attn_bias.reshape(b, h, sq, sk).float()
        elif attn_bias is not None:
            bias = attn_bias.materialize((b, h, sq, sk))
        else:
            bias = None
        out = reference.attention(q.float(), k.float(), v.float(), attn_mask=bias, scale=scale, layout="bshd")
        if bias is not None:                                # what the kernel writes there: unspecified
            out = out.masked_fill(torch.isneginf(bias).all(-1).transpose(1, 2)[..., None], float("nan"))
        return out.to(q.dtype)

    ab = module("xformers.ops.fmha.attn_bias", LowerTriangularMask=LowerTriangularMask,
                LowerTriangularFromBottomRightMask=LowerTriangularFromBottomRightMask,
                LowerTriangularFromBottomRightLocalAttentionMask=LowerTriangularFromBottomRightLocalAttentionMask,
                LocalAttentionFromBottomRightMask=LocalAttentionFromBottomRightMask)
    fmha = module("xformers.ops.fmha", attn_bias=ab)
    ops = module("xformers.ops", memory_efficient_attention=mea, fmha=fmha)
    return {"xformers": module("xformers", ops=ops), "xformers.ops": ops, "xformers.ops.fmha": fmha,
            "xformers.ops.fmha.attn_bias": ab}


@pytest.fixture
def calls(monkeypatch):
    calls = []
    use_standins(monkeypatch, _xformers(calls), ("xformers.mea",))
    return calls


def qkv(b=2, hq=4, hk=4, sq=6, sk=10, d=16, layout="bhsd"):
    g = torch.Generator().manual_seed(sq * 13 + sk + hk)
    return tuple(torch.randn((b, h, s, d) if layout == "bhsd" else (b, s, h, d), generator=g).half()
                 for h, s in ((hq, sq), (hk, sk), (hk, sk)))


CASES = [  # (lz.attention kwargs, shape, expected bias)
    (dict(is_causal=True), {}, "LowerTriangularMask"),
    (dict(is_causal=True, causal_align="bottom_right"), {}, "LowerTriangularFromBottomRightMask"),
    (dict(is_causal=True, window=(3, -1), causal_align="bottom_right"), {}, "LowerTriangularFromBottomRightLocalAttentionMask"),
    (dict(window=(2, 1)), dict(sq=8, sk=8), "LocalAttentionFromBottomRightMask"),
    (dict(window=(2, 1)), {}, "Tensor"),                     # top-left window, Sq != Sk: a tensor
    (dict(alibi_slopes="alibi", is_causal=True), dict(hk=2), "Tensor"),
    (dict(attn_mask="padding"), dict(hk=1, layout="bshd"), "Tensor"),
    ({}, dict(hk=2), "NoneType"),
]


@pytest.mark.parametrize("kw,shape,bias", CASES, ids=[c[2] + str(i) for i, c in enumerate(CASES)])
def test_translation(calls, kw, shape, bias):
    q, k, v = qkv(**shape)
    layout = shape.get("layout", "bhsd")
    kw = dict(kw, layout=layout)
    b, hq = q.shape[0], q.shape[1] if layout == "bhsd" else q.shape[2]
    sq = q.shape[2] if layout == "bhsd" else q.shape[1]
    if kw.get("alibi_slopes") == "alibi":
        kw["alibi_slopes"] = torch.rand(hq)
    if kw.get("attn_mask") == "padding":
        m = torch.ones(b, 1, 1, k.shape[1 if layout == "bshd" else 2], dtype=torch.bool)
        m[0, ..., :4] = False                               # left padding of request 0
        kw["attn_mask"] = m
    with lz.use("xformers.mea"):
        out = lz.attention(q, k, v, **kw)
    assert lz.metrics()["calls"]["attention"] == {"xformers.mea": 1}
    assert type(calls[-1]["attn_bias"]).__name__ == bias
    assert calls[-1]["q"].dim() == (5 if shape.get("hk", 4) != hq else 4)
    ref = reference.attention(q.float(), k.float(), v.float(),
                              **{n: (x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x)
                                 for n, x in kw.items()})
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_fully_masked_rows_are_zero(calls):
    q, k, v = qkv(sq=5, sk=5)
    m = torch.ones(5, 5, dtype=torch.bool)
    m[1] = False
    with lz.use("xformers.mea"):
        out = lz.attention(q, k, v, attn_mask=m)
    assert (out[:, :, 1] == 0).all() and torch.isfinite(out).all()


def test_refuses_softcap_and_sinks(calls):
    q, k, v = qkv()
    for kw, why in ((dict(softcap=3.0), "softcap"), (dict(sinks=torch.zeros(4)), "sinks")):
        c = {c.kernel: c for c in lz.explain("attention", q, k, v, **kw).candidates}["xformers.mea"]
        assert c.status == "rejected" and why in c.reasons[0]



def test_installed_but_ops_dont_load_is_unavailable(tmp_path, monkeypatch):
    """The GPU host's xFormers 0.0.35: imports, then every call raises "No operator found"."""
    pkg = tmp_path / "xformers"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "ops" / "__init__.py").write_text(textwrap.dedent('''
        def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
            raise NotImplementedError("No operator found for `memory_efficient_attention_forward` "
                                      "with inputs: query: shape=(1, 16, 2, 64) (built for torch 2.10)")
    '''))
    for name in [m for m in sys.modules if m == "xformers" or m.startswith("xformers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("LAYERZERO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LAYERZERO_PROBE", "1")
    monkeypatch.setattr(registry, "_module_reasons", {})
    monkeypatch.delitem(probe.NEEDS, "xformers.ops")        # pretend a GPU is there
    control.changed()
    info = {k.id: k for k in lz.kernels("attention")}["xformers.mea"]
    assert not info.available
    assert "No operator found" in info.reason and "subprocess probe" in info.reason
    assert "xformers.ops" not in sys.modules, "the broken package was never imported in-process"
    q = torch.randn(1, 2, 4, 8)
    assert lz.which("attention", q, q, q) != "xformers.mea"
    control.changed()
