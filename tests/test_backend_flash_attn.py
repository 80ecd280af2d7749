"""flash-attn adapters (FA2, FA3, FA4) on the CPU, through stand-in modules that compute in
flash-attn's own conventions: lz.attention's result must match the reference, the translated
arguments must be what flash-attn expects, and unsupported calls must be refused with reasons."""
from __future__ import annotations

import pytest
import torch

import layerzero as lz
from layerzero import reference
from layerzero.backends import flash_attn as fa
from backend_standins import flash_attn_modules, use_standins

KERNELS = ("flash_attn.fa2", "flash_attn.fa3", "flash_attn.fa4")


@pytest.fixture
def calls(monkeypatch):
    calls = []
    use_standins(monkeypatch, flash_attn_modules(calls), KERNELS)
    return calls


def qkv(b=2, hq=4, hk=2, sq=5, sk=9, d=16, layout="bhsd", dtype=torch.float16):
    g = torch.Generator().manual_seed(sq * 31 + sk)

    def t(h, s):
        shape = (b, h, s, d) if layout == "bhsd" else (b, s, h, d)
        return torch.randn(shape, generator=g).to(dtype)
    return t(hq, sq), t(hk, sk), t(hk, sk)


@pytest.mark.parametrize("sq,sk,causal,window,align,expect", [
    (4, 4, True, None, "top_left", (True, -1, 0)),            # Sq == Sk: alignments agree
    (2, 4, True, None, "bottom_right", (True, -1, 0)),
    (4, 2, True, None, "top_left", (False, -1, 2)),            # top-left causal, Sq > Sk: shifted
    (2, 5, False, (3, -1), "top_left", (False, 6, -1)),        # left bound moves by Sk - Sq
    (3, 3, True, (2, 5), "top_left", (False, 2, 0)),           # causal caps the right bound
    (3, 3, False, None, "top_left", (False, -1, -1)),
])
def test_fa_window_translation(sq, sk, causal, window, align, expect):
    assert fa.fa_window(sq, sk, causal, window, align) == expect


def test_fa_window_rejects_what_fa_cannot_express():
    why = fa.fa_window(2, 4, True, None, "top_left")            # top-left causal with a KV cache
    assert isinstance(why, str) and "bottom_right" in why
    assert isinstance(fa.fa_window(2, 4, False, (1, 1), "top_left"), str)


CASES = [  # (kernel, lz.attention kwargs, shape kwargs)
    ("flash_attn.fa2", dict(is_causal=True, causal_align="bottom_right"), {}),
    ("flash_attn.fa2", dict(is_causal=True), dict(sq=9, sk=4)),                 # top-left, Sq > Sk
    ("flash_attn.fa2", dict(window=(2, 1), causal_align="bottom_right", softcap=5.0), {}),
    ("flash_attn.fa2", dict(window=(3, -1)), dict(sq=5, sk=9)),                    # top-left, shifted
    ("flash_attn.fa4", dict(is_causal=True, window=(6, -1)), dict(sq=9, sk=5)),    # both bounds shift
    ("flash_attn.fa2", dict(alibi_slopes="alibi", is_causal=True, causal_align="bottom_right", scale=0.3), {}),
    ("flash_attn.fa2", dict(is_causal=True, layout="bshd"), dict(sq=6, sk=6, layout="bshd")),
    ("flash_attn.fa3", dict(window=(3, -1), softcap=2.0), dict(sq=7, sk=7)),
    ("flash_attn.fa3", dict(is_causal=True, causal_align="bottom_right"), dict(hk=1)),  # MQA
    ("flash_attn.fa4", dict(is_causal=True, causal_align="bottom_right", sinks="sinks"), {}),
    ("flash_attn.fa4", dict(window=(2, 0)), dict(sq=8, sk=8, d=24)),
    ("flash_attn.fa4", dict(softcap=3.0), dict(sq=1, sk=12, hq=8, hk=2)),         # decode step
]


@pytest.mark.parametrize("kernel,kw,shape", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_through_standin(calls, kernel, kw, shape, dtype):
    q, k, v = qkv(dtype=dtype, **shape)
    hq = q.shape[1] if shape.get("layout", "bhsd") == "bhsd" else q.shape[2]
    kw = dict(kw)
    if kw.get("alibi_slopes") == "alibi":
        kw["alibi_slopes"] = torch.rand(hq) * 0.5 + 0.1
    if kw.get("sinks") == "sinks":
        kw["sinks"] = torch.randn(hq)
    with lz.use(kernel):
        assert lz.which("attention", q, k, v, **kw) == kernel
        out = lz.attention(q, k, v, **kw)
    assert lz.metrics()["calls"]["attention"] == {kernel: 1}
    c = calls[-1]
    assert c["api"] == kernel.split(".")[1]
    assert c["q"].shape[1] == (q.shape[2] if kw.get("layout", "bhsd") == "bhsd" else q.shape[1]), "FA gets (B, S, H, D)"
    assert c["softmax_scale"] == pytest.approx(kw.get("scale", q.shape[-1] ** -0.5))
    ref = reference.attention(q.float(), k.float(), v.float(),
                              **{n: (x.float() if isinstance(x, torch.Tensor) else x) for n, x in kw.items()})
    assert out.shape == ref.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_fa4_gets_none_for_unbounded_and_split_kv_only_on_sm100(calls, monkeypatch):
    q, k, v = qkv(sq=1, sk=12)
    with lz.use("flash_attn.fa4"):
        lz.attention(q, k, v, window=(4, -1), causal_align="bottom_right")
    assert calls[-1]["window_size"] == (4, None)
    assert calls[-1]["num_splits"] == 1            # FA4 asserts "SplitKV not supported on SM 9.0"
    monkeypatch.setattr(fa, "device_sm", lambda device: 100)
    fa.fa4(q, k, v, None, False, None, 0.0, None, None, None, None, "bhsd", "top_left")
    assert calls[-1]["num_splits"] == 0            # Blackwell: FA4's split-KV heuristic for decode


def test_fa2_alibi_is_fp32(calls):
    q, k, v = qkv(sq=6, sk=6)
    with lz.use("flash_attn.fa2"):
        lz.attention(q, k, v, alibi_slopes=torch.rand(4).half())
    assert calls[-1]["alibi_slopes"].dtype == torch.float32


@pytest.mark.parametrize("kernel,kw,shape,reason", [
    ("flash_attn.fa2", dict(is_causal=True), dict(sq=2, sk=5), "bottom_right"),
    ("flash_attn.fa2", dict(attn_mask="mask"), {}, "attn_mask"),
    ("flash_attn.fa2", dict(alibi_slopes="alibi"), dict(sq=3, sk=5), "ALiBi"),
    ("flash_attn.fa2", dict(sinks="sinks"), {}, "sinks"),
    ("flash_attn.fa3", dict(alibi_slopes="alibi"), {}, "ALiBi"),
    ("flash_attn.fa3", dict(dropout_p=0.1), {}, "dropout"),
    ("flash_attn.fa3", {}, dict(d=20), "multiple of 8"),
    ("flash_attn.fa4", dict(attn_mask="mask"), {}, "attn_mask"),
    ("flash_attn.fa4", {}, dict(dtype=torch.float32), "float16"),
])
def test_refusals_name_the_reason(calls, kernel, kw, shape, reason):
    q, k, v = qkv(**shape)
    kw = dict(kw)
    if kw.get("attn_mask") == "mask":
        kw["attn_mask"] = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool)
    if kw.get("alibi_slopes") == "alibi":
        kw["alibi_slopes"] = torch.rand(q.shape[1])
    if kw.get("sinks") == "sinks":
        kw["sinks"] = torch.randn(q.shape[1])
    c = {c.kernel: c for c in lz.explain("attention", q, k, v, **kw).candidates}[kernel]
    assert c.status == "rejected" and reason in "; ".join(c.reasons)
    with pytest.raises(ValueError, match="can run"), lz.use(kernel):
        lz.attention(q, k, v, **kw)
    assert not calls, "a refused call must not reach flash-attn"


def test_forward_only(calls):
    q, k, v = (t.requires_grad_() for t in qkv())
    c = {c.kernel: c for c in lz.explain("attention", q, k, v).candidates}["flash_attn.fa2"]
    assert c.status == "rejected" and "forward-only" in c.reasons[0]


def test_custom_ops_trace_under_torch_compile(calls):
    q, k, v = (t.transpose(1, 2) for t in qkv(sq=6, sk=6))          # (B, S, H, D)

    def f(q, k, v):
        return torch.ops.layerzero.fa4(q, k, v, 0.25, True, -1, 0, 0.0, None, 1) * 2

    out = torch.compile(f, fullgraph=True, backend="eager")(q, k, v)
    ref = fa.fa4_op(q, k, v, 0.25, True, -1, 0, 0.0, None, 1) * 2
    torch.testing.assert_close(out, ref)
    for name in ("fa2", "fa3", "fa4"):
        assert hasattr(torch.ops.layerzero, name)


def test_eager_calls_skip_the_custom_op_and_traced_calls_take_it(calls, monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = qkv(sq=6, sk=6)
    through_op = []
    monkeypatch.setitem(fa._EAGER, fa.fa4_op, lambda *a: through_op.append("direct") or fa.fa4_impl(*a))
    fa.fa4(q, k, v, None, True, None, 0.0, None, None, None, None, "bhsd", "top_left")
    assert through_op == ["direct"] and len(calls) == 1               # the stand-in ran once
    with FakeTensorMode() as mode:                                     # e.g. export / make_fx
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        out = fa.fa4(fq, fk, fv, None, True, None, 0.0, None, None, None, None, "bhsd", "top_left")
    assert out.shape == q.shape and through_op == ["direct"] and len(calls) == 1   # fake impl only


def test_unavailable_without_the_package_and_never_imported():
    import sys

    for k in lz.kernels("attention"):
        if k.backend == "flash_attn" and "flash_attn" not in sys.modules:
            assert not k.available and k.reason
