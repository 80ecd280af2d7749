"""flashinfer.paged_decode / flashinfer.paged_prefill on the CPU, through FlashInfer stand-ins that
compute in FlashInfer's conventions (real multi-page CSR caches, bottom-right causal masks and
windows, NaN where FlashInfer's output is unspecified): results against
`reference.paged_attention`, the arguments handed to FlashInfer, one plan per step, refusals."""
from __future__ import annotations

import importlib
import sys
import threading

import pytest
import torch

import layerzero as lz
from layerzero import reference, registry
from layerzero.backends import flashinfer as fib
from layerzero.backends import flashinfer_paged as fp
from layerzero.paged import csr
from backend_standins import flashinfer_module, module, use_standins

warmup = importlib.import_module("layerzero.warmup")  # lz.warmup is the function
DECODE, PREFILL = "flashinfer.paged_decode", "flashinfer.paged_prefill"


class JitSpec:
    """flashinfer.jit.core.JitSpec with every module built (test_jit_variant covers builds)."""

    def build_and_load(self):
        return self


def _install(monkeypatch, mod, core_jitspec=JitSpec):
    core = module("flashinfer.jit.core", JitSpec=core_jitspec)
    use_standins(monkeypatch, {"flashinfer": mod, "flashinfer.jit.core": core,
                               "flashinfer.jit": module("flashinfer.jit", core=core)}, (DECODE, PREFILL))
    monkeypatch.setattr(fib, "WORKSPACE_BYTES", 1024)
    monkeypatch.setattr(fib, "_standin_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(fp, "_plans", type(fp._plans)())
    monkeypatch.setattr(warmup, "_builds", {})


@pytest.fixture
def calls(monkeypatch):
    calls = []
    _install(monkeypatch, flashinfer_module(calls))
    return calls


def paged(lens=(11, 1, 4), ps=4, hq=4, hk=2, d=64, sq=1, layout="bhsd", dtype=torch.float16, seed=0):
    """Rows of lens[b] keys in pages of ps, in random page order, two spare pages and a spare
    table column; unused slots (spare pages, the tails of last pages) hold NaN.
    -> q, k_pages, v_pages, page_table (int32), seq_lens (int32)."""
    g = torch.Generator().manual_seed(seed)
    per_row = [-(-n // ps) for n in lens]
    n_pages = sum(per_row) + 2
    order = torch.randperm(n_pages, generator=g).tolist()
    kv = [torch.full((n_pages, ps, hk, d), float("nan")) for _ in range(2)]
    table = torch.full((len(lens), max(per_row) + 1), -1, dtype=torch.int32)
    for row, (n, pages) in enumerate(zip(lens, per_row)):
        ids = [order.pop() for _ in range(pages)]
        table[row, :pages] = torch.tensor(ids, dtype=torch.int32)
        for t in range(n):
            for x in kv:
                x[ids[t // ps], t % ps] = torch.randn(hk, d, generator=g)
    q = torch.randn(len(lens), hq, sq, d, generator=g)
    q = q if layout == "bhsd" else q.transpose(1, 2).contiguous()
    return q.to(dtype), kv[0].to(dtype), kv[1].to(dtype), table, torch.tensor(lens, dtype=torch.int32)


def expected(q, kp, vp, table, lens, **kw):
    f = lambda t: t.float()                                                     # noqa: E731
    return reference.paged_attention(f(q), f(kp), f(vp), table, lens, **kw)


def run(kernel, q, kp, vp, table, lens, **kw):
    with lz.use(kernel):
        assert lz.which("paged_attention", q, kp, vp, table, lens, **kw) == kernel
        return lz.paged_attention(q, kp, vp, table, lens, **kw)


CASES = {
    "gqa_causal": dict(),
    "mqa_scale_bf16": dict(hq=8, hk=1, scale=0.3, dtype=torch.bfloat16),   # tensor-core decode
    "window_causal": dict(window=(3, 0)),
    "window_noncausal": dict(window=(2, -1), is_causal=False),
    "causal_window_right": dict(window=(4, 2)),                             # causal bound is tighter
    "softcap_d128": dict(softcap=5.0, d=128),
    "noncausal": dict(is_causal=False),
}


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("sq", [1, 3])
@pytest.mark.parametrize("ps", [1, 16])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(calls, case, ps, sq, layout):
    c = dict(CASES[case])
    kw = {n: c.pop(n) for n in ("scale", "window", "softcap", "is_causal") if n in c}
    lens = (2 * ps + 3, 1, ps)                   # several pages, one key (left-padded for Sq 3), one page
    q, kp, vp, table, lens = paged(lens, ps=ps, sq=sq, layout=layout, **c)
    kernel = DECODE if sq == 1 else PREFILL
    lz.reset_metrics()
    out = run(kernel, q, kp, vp, table, lens, layout=layout, **kw)
    assert lz.metrics()["calls"]["paged_attention"] == {kernel: 1}
    assert any(x["api"] == kernel[17:] + ".run" for x in calls)
    ref = expected(q, kp, vp, table, lens, layout=layout, **kw)
    assert out.shape == ref.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    if kw.get("is_causal", True) and sq > 1:     # row 1's first two queries precede its one key
        row1 = out[1, :, :2] if layout == "bhsd" else out[1, :2]
        assert not row1.any()


@pytest.mark.parametrize("sq", [1, 3])
def test_arguments_handed_to_flashinfer(calls, sq):
    q, kp, vp, table, lens = paged((9, 2, 16), ps=4, hq=8, hk=2, sq=sq, layout="bshd")
    run(DECODE if sq == 1 else PREFILL, q, kp, vp, table, lens, layout="bshd", window=(5, -1),
        softcap=7.0, scale=0.25)
    kind = "decode" if sq == 1 else "prefill"
    init, plan, runs = (next(x for x in reversed(calls) if x["api"] == f"{kind}.{a}")
                        for a in ("init", "plan", "run"))
    assert init["kv_layout"] == plan["kv_layout"] == "NHD"
    indptr, indices, last = csr(table, lens, 4)
    assert plan["indptr"].tolist() == indptr.tolist() == [0, 3, 4, 8]
    assert plan["indices"].tolist() == indices.tolist()
    assert plan["last_page_len"].tolist() == last.tolist() == [1, 2, 4]
    assert (plan["page_size"], plan["num_qo_heads"], plan["num_kv_heads"], plan["head_dim"]) == (4, 8, 2, 64)
    assert (plan["window_left"], plan["logits_soft_cap"], plan["sm_scale"]) == (5, 7.0, 0.25)
    assert plan["q_data_type"] == plan["kv_data_type"] == torch.float16
    assert runs["kv"][0] is kp and runs["kv"][1] is vp                   # the pools themselves
    assert runs["q"].shape == (3 * sq, 8, 64)
    if sq == 1:
        assert init["use_tensor_cores"] is True                              # 4 query heads per kv head
    else:
        assert init["backend"] == fp.PREFILL_BACKEND and plan["causal"] is True
        assert plan["qo_indptr"].tolist() == [0, 3, 6, 9] and plan["head_dim_vo"] == 64


@pytest.mark.parametrize("is_causal", [True, False])
def test_queries_without_keys_are_zeros_not_flashinfers_nan(calls, is_causal):
    q, kp, vp, table, lens = paged((0, 2, 9), sq=4)
    out = run(PREFILL, q, kp, vp, table, lens, is_causal=is_causal)
    run_out = [x for x in calls if x["api"] == "prefill.run"]
    assert run_out and torch.isfinite(out).all()
    assert not out[0].any()                                  # a row holding no key
    if is_causal:
        assert not out[1, :, :2].any() and out[1, :, 2:].abs().sum() > 0
    torch.testing.assert_close(out.float(), expected(q, kp, vp, table, lens, is_causal=is_causal),
                               atol=2e-2, rtol=2e-2)
    q1 = q[:, :, :1].contiguous()
    out1 = run(DECODE, q1, kp, vp, table, lens)
    assert torch.isfinite(out1).all() and not out1[0].any()


def test_a_batch_holding_no_key_plans_nothing(calls):
    q, kp, vp, table, lens = paged((0, 0), sq=2)
    with lz.use(PREFILL):
        assert lz.which("paged_attention", q, kp, vp, table, lens) == PREFILL   # (its dry run plans)
        calls.clear()
        out = lz.paged_attention(q, kp, vp, table, lens)
    assert torch.isfinite(out).all() and not out.any()
    assert not [x for x in calls if x["api"] in ("prefill.plan", "prefill.run")]


def _count(calls, api):
    return sum(x["api"] == api for x in calls)


def test_one_plan_per_step_reused_across_layers(calls):
    q, kp, vp, table, lens = paged((5, 2, 7), ps=4)
    g = torch.Generator().manual_seed(9)
    noise = lambda t: t + torch.randn(t.shape, generator=g).to(t.dtype)         # noqa: E731
    layers = [(noise(kp), noise(vp)) for _ in range(3)]          # each layer's pools, same pages

    def step(n_layers):
        calls.clear()
        for kp_l, vp_l in layers[:n_layers]:
            out = lz.paged_attention(q, kp_l, vp_l, table, lens)
            torch.testing.assert_close(out.float(), expected(q, kp_l, vp_l, table, lens), atol=2e-2, rtol=2e-2)
        return _count(calls, "decode.plan"), _count(calls, "decode.run")

    with lz.use(DECODE):
        assert lz.which("paged_attention", q, kp, vp, table, lens) == DECODE   # (its dry run plans apart)
        assert step(3) == (1, 3)
        assert step(3) == (0, 3)                  # same tensors, same versions: still planned
        # next step: each row's next key written into its pages, lens bumped in place
        for row, n in enumerate(lens.tolist()):
            page, slot = int(table[row, n // 4]), n % 4
            for x in (t for pools in layers for t in pools):
                x[page, slot] = torch.randn(x.shape[2:], generator=g).to(x.dtype)
        lens += 1
        assert step(2) == (1, 2)
        # row 0's first page moves to a spare page, the old one is overwritten: table bumped only
        spare = sorted(set(range(kp.shape[0])) - set(table[table >= 0].tolist()))[0]
        old = int(table[0, 0])
        for x in (t for pools in layers for t in pools):
            x[spare] = x[old]
            x[old] = float("nan")
        table[0, 0] = spare
        assert step(3) == (1, 3)
        assert len(fp._plans) == 1                                        # one wrapper throughout
        # equal values in other tensors: the plan can't know they are equal without reading them
        # (another table's storage: a wrapper of its own, so two caches in turn don't re-plan)
        lz.paged_attention(q, *layers[0], table.clone(), lens.clone())
        lz.paged_attention(q, *layers[0], table, lens.clone())
        assert _count(calls, "decode.plan") == 2 + 1 and len(fp._plans) == 2


def test_inference_tensors_have_no_version_and_replan_every_call(calls):
    with torch.inference_mode():
        q, kp, vp, table, lens = paged((5, 2), ps=4)
        for _ in range(3):
            out = run(DECODE, q, kp, vp, table, lens)
    torch.testing.assert_close(out.float(), expected(q, kp, vp, table, lens), atol=2e-2, rtol=2e-2)
    assert _count(calls, "decode.plan") >= 3


def test_values_flashinfer_would_read_out_of_bounds_raise(calls):
    q, kp, vp, table, lens = paged((5, 2), ps=4)
    bad = lens.clone()
    bad[1] = 99
    with pytest.raises(ValueError, match=r"seq_lens holds 5\.\.99; allowed: 0\.\.12"):
        fp.paged_decode(q, kp, vp, table, bad, None, True, None, None, None, "bhsd")
    t = table.clone()
    t[0, 0] = 40
    with pytest.raises(ValueError, match="allowed page ids: 0..4"):
        fp.paged_decode(q, kp, vp, t, lens, None, True, None, None, None, "bhsd")


@pytest.mark.parametrize("kernel,shape,kw,reason", [
    (DECODE, {}, dict(sinks=True), "sinks"),
    (PREFILL, dict(sq=3), dict(sinks=True), "sinks"),
    (PREFILL, dict(sq=3), dict(window=(2, 3), is_causal=False), "right bound"),
    (DECODE, dict(d=96), {}, "head_dim"),
    (PREFILL, dict(sq=3, dtype=torch.float32), {}, "takes float16, bfloat16"),
    (DECODE, {}, dict(grad=True), "forward-only"),
    (DECODE, dict(sq=3), {}, "one query per row"),
])
def test_refusals(calls, kernel, shape, kw, reason):
    q, kp, vp, table, lens = paged(**shape)
    kw = dict(kw)
    if kw.pop("sinks", False):
        kw["sinks"] = torch.zeros(q.shape[1], dtype=q.dtype)
    if kw.pop("grad", False):
        q.requires_grad_()
    c = {c.kernel: c for c in lz.explain("paged_attention", q, kp, vp, table, lens, **kw).candidates}
    assert c[kernel].status == "rejected" and reason in "; ".join(c[kernel].reasons), c[kernel].reasons


def test_traced_calls_go_to_a_capturable_kernel(calls):
    spec = lz.explain("paged_attention", *paged()).spec._replace(device="cuda", sm=90)
    assert fp.supports_decode(spec) == []
    why = fp.supports_decode(spec._replace(flags=spec.flags | {"traced"}))
    assert len(why) == 1 and "CUDA graph" in why[0]


def test_window_right_bound_is_moot_for_decode(calls):
    q, kp, vp, table, lens = paged()
    out = run(DECODE, q, kp, vp, table, lens, window=(2, 3), is_causal=False)
    torch.testing.assert_close(out.float(), expected(q, kp, vp, table, lens, window=(2, 3), is_causal=False),
                               atol=2e-2, rtol=2e-2)


def test_off_cuda_and_without_flashinfer():
    q, kp, vp, table, lens = paged()
    spec = lz.explain("paged_attention", q, kp, vp, table, lens).spec
    assert "needs a CUDA device" in fp.supports_decode(spec)[0]
    if "flashinfer" not in sys.modules:
        for kid in (DECODE, PREFILL):
            assert "flashinfer" in registry.unavailable_reason(registry.get(kid))


def test_priority_on_cuda_above_triton_and_reference(calls):
    q, kp, vp, table, lens = paged()
    spec = lz.explain("paged_attention", q, kp, vp, table, lens).spec._replace(device="cuda", sm=90)
    prio = {k.id: (k.priority(spec) if callable(k.priority) else k.priority)
            for k in registry.op_kernels("paged_attention")}
    assert prio[DECODE] == 70 and prio[PREFILL] == 65
    assert min(prio[DECODE], prio[PREFILL]) > max(v for k, v in prio.items() if not k.startswith("flashinfer."))


def test_traced_calls_see_one_opaque_op(calls):
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, kp, vp, table, lens = paged(sq=3)
    real = (q.transpose(1, 2), kp, vp, table, lens)                              # q (B, Sq, Hq, D)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in real]
        out = fp.paged_op(*fake, False, True, -1, None, None)
    assert out.shape == (3, 3, 4, 64) and not calls


def test_jit_variant_not_built_runs_elsewhere_until_built(monkeypatch):
    calls, built, release, started = [], set(), threading.Event(), threading.Event()

    class Jit:
        def __init__(self, name):
            self.name = name

        @property
        def is_compiled(self):
            return self.name in built

        def build_and_load(self):
            if self.name not in built:
                started.set()
                assert release.wait(10), "test never released the build"
                built.add(self.name)
            return self

    mod = flashinfer_module(calls)

    class Decode(mod.BatchDecodeWithPagedKVCacheWrapper):
        def plan(self, *args, logits_soft_cap=None, **kw):
            Jit(f"batch_decode_cap{bool(logits_soft_cap)}").build_and_load()
            return super().plan(*args, logits_soft_cap=logits_soft_cap, **kw)

    mod.BatchDecodeWithPagedKVCacheWrapper = Decode
    _install(monkeypatch, mod, Jit)
    q, kp, vp, table, lens = paged()
    first = lz.explain("paged_attention", q, kp, vp, table, lens, softcap=20.0)
    why = {c.kernel: c for c in first.candidates}[DECODE].reasons
    assert first.chosen != DECODE and "paged_decode" in why[0] and "softcap" in why[0], why
    assert started.wait(10)          # the build now sits in plan(), as nvcc would: other calls run
    q3 = paged(sq=3)[0]
    torch.testing.assert_close(run(PREFILL, q3, kp, vp, table, lens).float(),
                               expected(q3, kp, vp, table, lens), atol=2e-2, rtol=2e-2)
    assert not built
    release.set()
    for b in list(warmup._builds.values()):
        assert b.done.wait(10)
    assert lz.which("paged_attention", q, kp, vp, table, lens, softcap=20.0) == DECODE
    assert built == {"batch_decode_capTrue"}
