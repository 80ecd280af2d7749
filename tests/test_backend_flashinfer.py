"""FlashInfer adapters on the CPU through a stand-in that computes in FlashInfer's conventions
(per-request NHD/HND tensors, paged caches with one page per request, bottom-right masks,
custom masks, cos/sin caches): results must match the reference, plans must be reused."""
from __future__ import annotations

import sys

import pytest
import torch

import layerzero as lz
from layerzero import reference
from layerzero.backends import flashinfer as fib
from backend_standins import flashinfer_module, module, use_standins

KERNELS = ("flashinfer.prefill", "flashinfer.decode", "flashinfer.rms_norm", "flashinfer.rope",
           "flashinfer.sample")


class JitSpec:
    """flashinfer.jit.core.JitSpec for a FlashInfer whose modules are all built already
    (tests/test_background_build.py covers builds)."""

    def build_and_load(self):
        return self


@pytest.fixture
def calls(monkeypatch):
    calls = []
    core = module("flashinfer.jit.core", JitSpec=JitSpec)
    use_standins(monkeypatch, {"flashinfer": flashinfer_module(calls), "flashinfer.jit.core": core,
                               "flashinfer.jit": module("flashinfer.jit", core=core)}, KERNELS)
    monkeypatch.setattr(fib, "WORKSPACE_BYTES", 1024)
    monkeypatch.setattr(fib, "_plans", type(fib._plans)())
    monkeypatch.setattr(fib, "_workspaces", {})
    monkeypatch.setattr(fib, "_standin_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(sys.modules["layerzero.warmup"], "_builds", {})
    return calls


def qkv(b=2, hq=4, hk=2, sq=5, sk=9, d=64, layout="bhsd", dtype=torch.float16):
    g = torch.Generator().manual_seed(b * 100 + sq * 7 + sk)

    def t(h, s):
        return torch.randn((b, h, s, d) if layout == "bhsd" else (b, s, h, d), generator=g).to(dtype)
    return t(hq, sq), t(hk, sk), t(hk, sk)


def check(kernel, q, k, v, **kw):
    with lz.use(kernel):
        assert lz.which("attention", q, k, v, **kw) == kernel
        out = lz.attention(q, k, v, **kw)
    ref = reference.attention(q.float(), k.float(), v.float(),
                              **{n: (x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x)
                                 for n, x in kw.items()})
    assert out.shape == ref.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    return out


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("kw", [dict(is_causal=True, causal_align="bottom_right"),
                                dict(window=(3, -1), causal_align="bottom_right", softcap=4.0),
                                dict(window=(2, 0), causal_align="bottom_right", scale=0.2),
                                dict()])
def test_prefill(calls, b, layout, kw):
    q, k, v = qkv(b=b, layout=layout)
    check("flashinfer.prefill", q, k, v, layout=layout, **kw)
    api = "single_prefill" if b == 1 else "prefill.run"
    assert any(c["api"] == api for c in calls)
    plan = [c for c in calls if c["api"] in ("single_prefill", "prefill.plan")][-1]
    assert plan["kv_layout"] == ("HND" if layout == "bhsd" else "NHD")
    assert plan["causal"] == (kw.get("is_causal", False) or kw.get("window", (0, -1))[1] == 0)
    assert plan["window_left"] == kw.get("window", (-1, -1))[0]
    # an HND K/V never reaches flashinfer 0.7.2's fa3 prefill, which dies with SIGFPE on it (H100)
    made = [c for c in calls if c["api"] in ("single_prefill", "prefill.init")][-1]
    assert made["backend"] == ("fa2" if layout == "bhsd" else "auto")


def test_batch_plan_is_reused(calls):
    q, k, v = qkv(b=3)
    lz.explain("attention", q, k, v, is_causal=True, causal_align="bottom_right")
    assert calls and not fib._plans      # the variant's dry run planned, and cached nothing
    calls.clear()
    for _ in range(3):
        check("flashinfer.prefill", q, k, v, is_causal=True, causal_align="bottom_right")
    assert [c["api"] for c in calls].count("prefill.plan") == 1
    assert [c["api"] for c in calls].count("prefill.run") == 3


@pytest.mark.parametrize("b", [1, 3])
def test_bool_mask_with_empty_rows_gives_zeros(calls, b):
    q, k, v = qkv(b=b, sq=6, sk=6)
    mask = torch.rand(b, 1, 6, 6, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[:, :, 2] = False                                     # query 2 attends nothing
    out = check("flashinfer.prefill", q, k, v, attn_mask=mask, is_causal=True)  # top-left, folded in
    assert (out[:, :, 2] == 0).all()
    assert any(c.get("custom_mask") is not None for c in calls)


@pytest.mark.parametrize("b", [1, 4])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_decode(calls, b, layout):
    q, k, v = qkv(b=b, hq=8, hk=2, sq=1, sk=17, layout=layout)
    for kw in (dict(window=(5, -1)), dict(is_causal=True)):     # the variants' dry runs first
        lz.explain("attention", q, k, v, layout=layout, causal_align="bottom_right", **kw)
    calls.clear()
    check("flashinfer.decode", q, k, v, layout=layout, window=(5, -1), causal_align="bottom_right")
    check("flashinfer.decode", q, k, v, layout=layout, is_causal=True, causal_align="bottom_right")
    apis = [c["api"] for c in calls]
    assert ("single_decode" in apis) if b == 1 else (apis.count("decode.plan") == 2)


@pytest.mark.parametrize("kernel,kw,shape,reason", [
    ("flashinfer.prefill", dict(is_causal=True), dict(sq=3, sk=7), "bottom-right"),
    ("flashinfer.prefill", dict(window=(2, 3), causal_align="bottom_right"), {}, "right bound"),
    ("flashinfer.prefill", dict(attn_mask="float"), {}, "boolean"),
    ("flashinfer.prefill", dict(alibi_slopes="alibi"), {}, "ALiBi"),
    ("flashinfer.prefill", {}, dict(d=80), "head_dim"),
    ("flashinfer.prefill", dict(is_causal=True, causal_align="bottom_right"), dict(sq=9, sk=4), "Sq <= Sk"),
    ("flashinfer.decode", {}, dict(sq=2), "one query"),
    ("flashinfer.decode", dict(is_causal=True), dict(sq=1, sk=8), "bottom-right"),
])
def test_refusals(calls, kernel, kw, shape, reason):
    q, k, v = qkv(**shape)
    kw = dict(kw)
    if kw.get("attn_mask") == "float":
        kw["attn_mask"] = torch.zeros(q.shape[2], k.shape[2])
    if kw.get("alibi_slopes") == "alibi":
        kw["alibi_slopes"] = torch.rand(q.shape[1])
    c = {c.kernel: c for c in lz.explain("attention", q, k, v, **kw).candidates}[kernel]
    assert c.status == "rejected" and reason in "; ".join(c.reasons)


def test_per_head_mask_raises_and_falls_back(calls):
    q, k, v = qkv(b=1, sq=4, sk=4)
    mask = torch.ones(1, 4, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="one mask for all heads"):
        fib.prefill(q, k, v, mask, False, None, 0.0, None, None, None, None, "bhsd", "top_left")


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm(calls, residual, offset):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 64, generator=g).half()
    w = torch.randn(64, generator=g)                            # fp32 weight, fp16 input
    r = torch.randn(3, 5, 64, generator=g).half() if residual else None
    with lz.use("flashinfer.rms_norm"):
        out = lz.rms_norm(x, w, 1e-6, residual=r, offset=offset)
    ref = reference.rms_norm(x.float(), w, 1e-6, None if r is None else r.float(), offset)
    for o, e in zip(out if residual else (out,), ref if residual else (ref,)):
        torch.testing.assert_close(o.float(), e, atol=2e-2, rtol=2e-2)
    assert calls[-1]["api"] == "rmsnorm" and calls[-1]["x"].shape == (15, 64)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("cos_shape", ["shared", "per_batch"])
def test_rope(calls, layout, interleaved, cos_shape):
    g = torch.Generator().manual_seed(5)
    b, s, d, rot = 2, 6, 32, 24                                  # partial rotary: 8 dims pass through
    q = torch.randn(b, 4, s, d, generator=g).half()
    k = torch.randn(b, 2, s, d, generator=g).half()
    if layout == "bshd":
        q, k = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
    ang = torch.rand(b if cos_shape == "per_batch" else 1, s, rot // 2, generator=g) * 6
    ang = ang.repeat_interleave(2, -1) if interleaved else torch.cat((ang, ang), -1)
    cos, sin = ang.cos(), ang.sin()
    if cos_shape == "shared":
        cos, sin = cos[0], sin[0]
    with lz.use("flashinfer.rope"):
        qo, ko = lz.rope(q, k, cos, sin, layout=layout, interleaved=interleaved)
    qr, kr = reference.rope(q.float(), k.float(), cos, sin, layout, interleaved)
    torch.testing.assert_close(qo.float(), qr, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(ko.float(), kr, atol=1e-2, rtol=1e-2)
    assert calls[-1]["is_neox"] is (not interleaved)


def test_sample_filters(calls):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    with lz.use("flashinfer.sample"):
        tok = lz.sample(logits, top_k=1)
        assert torch.equal(tok, logits.argmax(-1)) and tok.dtype == torch.long
        allowed = reference.filter_logits(logits, 0.7, 10, 0.9, 0.05) > float("-inf")
        for _ in range(5):
            t = lz.sample(logits, temperature=0.7, top_k=10, top_p=0.9, min_p=0.05)
            assert allowed.gather(1, t[:, None]).all()
    assert {"top_k_renorm", "top_p_renorm", "min_p_sampling"} <= {c["api"] for c in calls}
    c = {c.kernel: c for c in lz.explain("sample", logits, temperature=0.0).candidates}["flashinfer.sample"]
    assert c.status == "rejected"


def test_without_flashinfer_everything_is_unavailable():
    import sys

    if "flashinfer" not in sys.modules:
        for k in lz.kernels():
            if k.backend == "flashinfer":
                assert not k.available and "flashinfer" in k.reason
