"""Priorities per GPU generation and per call shape (a callable priority, the core hook in
select.py's score), and the CUDA reasons of the SDPA kernels, on described calls (no GPU)."""
from __future__ import annotations

import warnings

import pytest
import torch

import layerzero as lz
from layerzero import reference, registry
from layerzero.backends import priorities, torch_sdpa
from layerzero.call import CallSpec
from layerzero.policy import Policy, from_dict
from layerzero.select import select


def attn(sm=90, b=4, hq=32, hk=32, sq=2048, sk=2048, d=128, dtype=torch.bfloat16, **kw):
    return CallSpec("attention", "cuda", sm, dtype, b, hq, hk, sq, sk, d, d, **kw)


def pretend_available(monkeypatch):
    monkeypatch.setattr(registry, "unavailable_reason", lambda k: None)
    monkeypatch.setattr(torch_sdpa, "_gate", lambda spec, backend, repeat_kv=False: ())


@pytest.mark.parametrize("spec,kind", [
    (attn(causal=True), "prefill"),
    (attn(b=1, hq=8, hk=8, sq=128, sk=128), "small"),
    (attn(b=64, hq=32, hk=8, sq=1, sk=4096), "decode"),
    (attn(window=(128, 0)), "feature"),
    (attn(softcap=True), "feature"),
    (attn(mask="bool"), "feature"),
    (attn(causal=True, causal_align="bottom_right", sq=512, sk=4096), "feature_small"),
    (attn(b=1, causal=True, causal_align="bottom_right", sq=4096, sk=8192), "feature"),
    (attn(b=32, hk=8, sq=1, sk=8192, window=(4096, -1), causal_align="bottom_right"), "feature_decode"),
    (attn(b=2, hq=16, hk=16, sq=1024, sk=1024, d=64, alibi=True), "feature_small"),
    (attn(b=4, hk=8, mask="bool", causal=True, sq=2048, sk=2048), "feature"),   # flex skips tiles
    (attn(b=1, hq=32, hk=8, sq=2048, sk=2048, softcap=True), "feature"),
    (attn(b=64, hk=8, sq=512, sk=512, causal=True), "small"),               # short keys
    (attn(b=8, hk=8, sq=1, sk=2304, mask="bool", flags=frozenset({"traced"})), "decode"),
    (attn(b=8, hk=8, sq=1, sk=2304, mask="bool", softcap=True, flags=frozenset({"traced"})), "feature_decode"),
    (attn(b=4, hq=8, hk=8, d=256), "small"),                                # d256 without causal
    (attn(b=1, hq=16, hk=16, sq=4096, sk=4096, d=256, causal=True), "prefill"),
    (attn(causal=True, causal_align="bottom_right"), "prefill"),           # Sq == Sk: same mask
])
def test_call_kind(spec, kind):
    assert priorities.call_kind(spec) == kind


@pytest.mark.parametrize("spec,winner", [
    (attn(causal=True), "flash_attn.fa4"),                                    # FIELD-NOTES row 1
    (attn(sm=100, b=2, hq=24, hk=24, sq=4096, sk=4096), "flash_attn.fa4"),
    (attn(sm=80, causal=True), "flash_attn.fa2"),                             # Ampere: no FA3/FA4
    (attn(b=1, hq=8, hk=8, sq=128, sk=128), "torch.sdpa"),                    # launch overhead
    (attn(b=64, hq=32, hk=8, sq=1, sk=4096), "torch.sdpa"),                   # decode (row 5)
    (attn(sm=80, b=64, hq=32, hk=8, sq=1, sk=4096), "torch.sdpa"),            # Ampere: not cuDNN
    (attn(window=(256, 0), causal=True), "flash_attn.fa4"),
    (attn(alibi=True, causal=True), "flash_attn.fa2"),                        # only FA2 has ALiBi
    (attn(b=8, hq=32, hk=8, sq=1, sk=8192, window=(1024, -1), causal_align="bottom_right"),
     "flashinfer.decode"),                                                   # split-KV decode
    (attn(b=8, hq=32, hk=8, sq=8, sk=4096, causal=True, causal_align="bottom_right"),
     "flash_attn.fa4"),                                                      # speculative verify
    (attn(b=1, hq=32, hk=8, sq=512, sk=8192, causal=True, causal_align="bottom_right"),
     "flash_attn.fa4"),                                                      # small chunked prefill
    (attn(b=2, hq=16, hk=16, sq=1024, sk=1024, d=64, alibi=True), "flash_attn.fa2"),  # native ALiBi
    (attn(b=4, hq=32, hk=8, mask="bool", causal=True), "torch.flex"),
    (attn(b=64, hq=32, hk=8, sq=512, sk=512, causal=True), "torch.sdpa"),
])
def test_h100_defaults_pick_the_measured_winner(monkeypatch, spec, winner):
    pretend_available(monkeypatch)
    d = select(spec, registry.op_kernels("attention"), Policy())
    assert d.chosen == winner, str(d)


def test_measured_h100_rules(monkeypatch):
    """From benchmarks/attention.py on the H100: FA4 loses below ~1.2e11 FLOP (launch cost), and
    FlashInfer's per-call custom-mask plan loses to flex / SDPA on padding masks."""
    pretend_available(monkeypatch)
    kernels = registry.op_kernels("attention")
    small = attn(b=1, hq=32, hk=8, causal=True)                     # 1x2k GQA causal
    assert priorities.call_kind(small) == "small"
    assert select(small, kernels, Policy()).chosen == "torch.sdpa"   # F.sdpa itself (cuDNN on Hopper)
    assert select(attn(b=4, causal=True), kernels, Policy()).chosen == "flash_attn.fa4"
    d = select(attn(b=8, sq=1024, sk=1024, mask="bool"), kernels, Policy())
    scores = {c.kernel: c.score for c in d.candidates if c.score is not None}
    assert scores["flashinfer.prefill"] < scores["torch.flex"]


def test_small_masked_calls_prefer_sdpa_with_its_cached_mask_over_flex(monkeypatch):
    pretend_available(monkeypatch)
    spec = attn(b=2, hq=16, hk=16, sq=1024, sk=1024, d=64, alibi=True)     # ALiBi 2x1k d64
    d = select(spec, registry.op_kernels("attention"), from_dict({"deny": [{"kernel": "flash_attn.fa2"}]}))
    assert d.chosen == "torch.sdpa", str(d)


def test_feature_calls_prefer_flex_over_sdpa_with_a_materialised_mask(monkeypatch):
    pretend_available(monkeypatch)
    spec = attn(mask="bool")
    d = select(spec, registry.op_kernels("attention"), Policy())
    scores = {c.kernel: c.score for c in d.candidates if c.score is not None}
    assert scores["torch.flex"] > scores["torch.sdpa_cudnn"] > scores["torch.sdpa"]


def test_float32_masked_calls_go_to_the_efficient_kernel_not_flex(monkeypatch):
    """flex runs float32 products without tensor cores: a speculative verify step (8 rows x 2
    queries over 392 masked keys) took 2.0 ms a call on the H200; SDPA's efficient kernel takes
    the mask. A call only flex can run (softcap) still goes to flex."""
    pretend_available(monkeypatch)
    kernels = registry.op_kernels("attention")
    verify = attn(b=8, hq=32, hk=8, sq=2, sk=392, d=64, dtype=torch.float32, mask="bool")
    assert select(verify, kernels, Policy()).chosen == "xformers.mea"        # the same CUTLASS kernel
    no_xformers = from_dict({"deny": [{"kernel": "xformers.*"}]})
    assert select(verify, kernels, no_xformers).chosen == "torch.sdpa_efficient"
    assert select(verify._replace(dtype=torch.bfloat16), kernels, Policy()).chosen == "torch.flex"
    soft = attn(b=1, hq=8, hk=8, sq=512, sk=512, d=64, dtype=torch.float32, softcap=30.0)
    d = select(soft, kernels, from_dict({"deny": [{"kernel": "flash_attn.*"}, {"kernel": "flashinfer.*"}]}))
    assert d.chosen == "torch.flex", str(d)


def test_cpu_priorities_unchanged():
    spec = CallSpec("attention", "cpu", 0, torch.float32, 1, 2, 2, 4, 4, 8, 8)
    got = {k.id: (k.priority(spec) if callable(k.priority) else k.priority)
           for k in registry.op_kernels("attention")}
    assert {k: got[k] for k in ("torch.sdpa", "torch.sdpa_flash", "torch.sdpa_cudnn",
                                "torch.sdpa_efficient", "torch.sdpa_math")} == \
        {"torch.sdpa": 50, "torch.sdpa_flash": 45, "torch.sdpa_cudnn": 48,
         "torch.sdpa_efficient": 30, "torch.sdpa_math": 20}


def test_norm_priority_by_size():
    p = registry.get("triton.rms_norm").priority
    big = CallSpec("rms_norm", "cuda", 90, torch.bfloat16, batch=16384, head_dim=4096)
    assert p(big) > 50 > p(big._replace(batch=8))              # torch.rms_norm is 50
    assert p(big._replace(flags=frozenset({"residual"}))) > registry.get("liger.rms_norm").priority(big)
    assert p(big._replace(device="cpu", sm=0)) == 1


@pytest.mark.parametrize("rows,hidden,winner", [
    (2048, 2048, "torch.rms_norm"),     # 4M elements: two cheap torch launches (19.9 vs 47.5 us)
    (8192, 4096, "triton.rms_norm"),    # 32M: one fused pass (98.1 vs 131.5 us), H100 measured
])
def test_residual_rms_norm_by_size(monkeypatch, rows, hidden, winner):
    pretend_available(monkeypatch)
    spec = CallSpec("rms_norm", "cuda", 90, torch.bfloat16, batch=rows, head_dim=hidden,
                    flags=frozenset({"residual"}))
    assert select(spec, registry.op_kernels("rms_norm"), Policy()).chosen == winner


def test_register_takes_a_callable_priority_and_rejects_junk():
    with pytest.raises(TypeError, match="priority"):
        registry.register("swiglu", "junk.x", lambda g, u: g, priority="high")
    with pytest.raises(TypeError, match="priority"):
        registry.register("swiglu", "junk.x", lambda g, u: g, priority=True)


# ---- SDPA's CUDA reasons (static part; the torch gate needs a GPU and runs on the host) -------

@pytest.mark.parametrize("kernel,spec,reason", [
    ("torch.sdpa_flash", attn(mask="bool"), "explicit mask"),
    ("torch.sdpa_flash", attn(dtype=torch.float32), "float16"),
    ("torch.sdpa_flash", attn(causal=True, sq=16, sk=64), "Sq != Sk"),
    ("torch.sdpa_flash", attn(sm=75), "sm80"),
    ("torch.sdpa_cudnn", attn(dropout=True), "1/16"),
    ("torch.sdpa_cudnn", attn(sq=1, sk=1), "length 1"),
    ("torch.sdpa_cudnn", attn(d=100), "multiples of 8"),
    ("torch.sdpa_efficient", attn(d=100), "multiples of 8"),
    ("torch.sdpa_efficient", attn(softcap=True), "softcap"),
])
def test_sdpa_cuda_static_reasons(kernel, spec, reason):
    r = registry.get(kernel).reasons(spec)
    assert any(reason in x for x in r), r


def test_sdpa_flash_takes_dropout_on_cuda_only():
    assert not registry.get("torch.sdpa_flash").reasons(attn(dropout=True))
    cpu = CallSpec("attention", "cpu", 0, torch.float32, 1, 2, 2, 4, 4, 8, 8, dropout=True)
    assert registry.get("torch.sdpa_flash").reasons(cpu)


def test_sdpa_math_fallback_is_visible(monkeypatch):
    """When no fused SDPA kernel takes a call (e.g. enable_gqa with a mask on a torch whose
    efficient kernel lacks GQA), torch.sdpa is refused with the reason; sdpa_math stays explicit."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch_sdpa, "_gate", lambda spec, backend, repeat_kv=False:
                        () if repeat_kv else (f"torch: {backend} says no",))
    spec = attn(hk=8, mask="bool")
    r = registry.get("torch.sdpa").reasons(spec)
    assert r and "math kernel" in r[0] and "enable_gqa with a mask" in r[0]
    assert not registry.get("torch.sdpa_math").reasons(spec)
    assert not registry.get("torch.sdpa_efficient").reasons(spec)   # repeats K/V heads itself


def test_has_empty_rows_matches_the_materialised_mask():
    from layerzero import reference
    import itertools
    for sq, sk, causal, window, align in itertools.product(
            (1, 3, 8), (1, 4, 8), (False, True), (None, (0, 0), (2, -1), (-1, 1), (1, 0), (3, 2)),
            ("top_left", "bottom_right")):
        if not causal and window is None:
            continue
        allowed = reference.attention_allowed(sq, sk, is_causal=causal, window=window,
                                              causal_align=align, device="cpu")
        want = bool((~allowed.any(-1)).any())
        assert torch_sdpa.has_empty_rows(sq, sk, causal, window, align) == want, (sq, sk, causal, window, align)


def test_shape_masks_are_cached_per_shape_and_alibi_slopes():
    q = torch.randn(1, 2, 4, 8)
    m1, _ = torch_sdpa.shape_mask(q, 4, 6, True, None, None, "bottom_right")
    m2, _ = torch_sdpa.shape_mask(q, 4, 6, True, None, None, "bottom_right")
    assert m1 is m2
    slopes = torch.tensor([0.5, 0.25])
    b1, _ = torch_sdpa.shape_mask(q, 4, 4, False, None, slopes, "top_left")
    assert torch_sdpa.shape_mask(q, 4, 4, False, None, slopes, "top_left")[0] is b1
    slopes.mul_(2)                                   # an in-place edit: the bias is rebuilt
    b2, _ = torch_sdpa.shape_mask(q, 4, 4, False, None, slopes, "top_left")
    assert b2 is not b1 and torch.allclose(b2, 2 * b1)
    other = torch.tensor([0.5, 0.25])                # another tensor, same values: its own entry
    assert torch_sdpa.shape_mask(q, 4, 4, False, None, other, "top_left")[0] is not b1


def test_alibi_slopes_made_under_inference_mode_are_not_cached():
    """An inference tensor has no version counter (an in-place edit can't be seen): no cache, and
    lz.attention still runs on SDPA (no fallback) and matches the reference."""
    with torch.inference_mode():
        q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
        slopes = torch.tensor([0.5, 0.25])
        m1, _ = torch_sdpa.shape_mask(q, 5, 5, False, None, slopes, "top_left")
        assert torch_sdpa.shape_mask(q, 5, 5, False, None, slopes, "top_left")[0] is not m1
        lz.reset_metrics()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = lz.attention(q, k, v, alibi_slopes=slopes)
        assert lz.metrics()["fallbacks"] == {}
        ref = reference.attention(q.double(), k.double(), v.double(), alibi_slopes=slopes.double())
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_cudnn_plain_path_calls_the_aten_op_directly(monkeypatch):
    seen = []

    def op(q, k, v, bias, lse, p, causal, debug, *, scale=None):
        seen.append((bias, lse, p, causal, debug, scale))
        return (q * 2, None)
    monkeypatch.setattr(torch_sdpa, "_CUDNN_OP", op)
    monkeypatch.setattr(torch_sdpa, "TORCH", (2, 11))
    run = torch_sdpa.plain_cudnn(attn(hk=8, causal=True))
    q = torch.randn(1, 4, 3, 8)
    assert torch.equal(run(q, q, q, None, 0.0, True), q * 2)
    assert torch.equal(run(q, q, q, None, 0.0, False, scale=0.5), q * 2)
    assert seen == [(None, False, 0.0, True, False, None), (None, False, 0.0, False, False, 0.5)]
    qg = q.clone().requires_grad_()
    run(qg, q, q, None, 0.0, True)
    assert seen[-1][1] is True                                  # backward needs the log-sum-exp
    assert torch_sdpa.plain_cudnn(attn(dropout=True)) is None
    assert torch_sdpa.plain_cudnn(attn(hk=8)._replace(device="cpu", sm=0)) is None
    monkeypatch.setattr(torch_sdpa, "TORCH", (2, 10))            # GQA K/V as they are: 2.11+
    assert torch_sdpa.plain_cudnn(attn(hk=8)) is None and torch_sdpa.plain_cudnn(attn()) is not None


def test_shape_mask_cache_is_bounded_in_bytes(monkeypatch):
    monkeypatch.setattr(torch_sdpa, "_MASKS", {})
    monkeypatch.setattr(torch_sdpa, "MASK_CACHE_TOTAL_BYTES", 3 * 64 * 64)   # three 64x64 bool masks
    q = torch.randn(1, 1, 64, 8)
    for sk in range(64, 70):
        torch_sdpa.shape_mask(q, 64, sk, True, None, None, "bottom_right")
    sizes = [m.numel() for m, _ in torch_sdpa._MASKS.values()]
    assert sum(sizes) <= 3 * 64 * 64 and len(sizes) == 2                      # the newest ones kept
    assert list(torch_sdpa._MASKS)[-1][1] == 69


def test_shape_masks_are_not_cached_while_traced(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode
    monkeypatch.setattr(torch_sdpa, "_MASKS", {})
    with FakeTensorMode() as mode:
        q = mode.from_tensor(torch.randn(1, 2, 4, 8))
        m, empty = torch_sdpa.shape_mask(q, 4, 6, True, None, None, "bottom_right")
        assert m.shape == (4, 6) and not empty
    assert torch_sdpa._MASKS == {}                   # no fake tensor kept for eager calls


@pytest.mark.parametrize("op", sorted(priorities.TRACED_FUSABLE))
def test_traced_calls_of_fusable_ops_take_the_plain_pytorch_form(monkeypatch, op):
    """Traced by torch.compile, a norm / RoPE / gated activation goes to its reference kernel,
    which inductor fuses with its neighbours, not to an opaque Triton/Liger/FlashInfer op; the
    same call run eagerly keeps the GPU kernels."""
    pretend_available(monkeypatch)
    rows = dict(batch=8192, head_dim=4096)
    if op == "rope":
        rows = dict(batch=8, num_heads=32, num_kv_heads=8, seq_len_q=2048, seq_len_k=2048, head_dim=128)
    eager = CallSpec(op, "cuda", 90, torch.bfloat16, **rows)
    traced = eager._replace(flags=eager.flags | {"traced"})
    kernels = registry.op_kernels(op)
    assert select(eager, kernels, Policy()).chosen != f"reference.{op}"
    assert select(traced, kernels, Policy()).chosen == f"reference.{op}"
    assert priorities.reference(traced._replace(op="attention")) == 0


def test_a_compiled_call_is_described_as_traced():
    from layerzero import compiled

    lz.reset_metrics()
    x, w = torch.randn(4, 64), torch.randn(64)
    out = torch.compile(lambda x, w: lz.rms_norm(x, w), backend="eager", fullgraph=True)(x, w)
    torch.testing.assert_close(out, reference.rms_norm(x, w))
    assert "reference.rms_norm" in lz.metrics()["calls"]["rms_norm"]
    assert "traced" in compiled.TRACED


@pytest.mark.parametrize("op", ["rms_norm", "rope", "swiglu", "geglu"])
def test_a_matvec_graph_takes_the_opaque_triton_kernels(monkeypatch, op):
    """lz.generate's batch-1 step is traced with the flag "matvec" (inductor turns its products
    into reductions and would fuse a norm or gate into every program of the one that reads it):
    there LayerZero's Triton custom ops go first on CUDA; elsewhere (no flag, or CPU) nothing
    changes."""
    pretend_available(monkeypatch)
    rows = dict(batch=1, head_dim=2048)
    if op == "rope":
        rows = dict(batch=1, num_heads=32, num_kv_heads=8, seq_len_q=1, seq_len_k=1, head_dim=64)
    traced = CallSpec(op, "cuda", 90, torch.bfloat16, flags=frozenset({"traced"}), **rows)
    matvec = traced._replace(flags=traced.flags | {"matvec"})
    kernels = registry.op_kernels(op)
    assert select(traced, kernels, Policy()).chosen == f"reference.{op}"
    assert select(matvec, kernels, Policy()).chosen == f"triton.{op}"
    cpu = matvec._replace(device="cpu", sm=0)
    assert select(cpu, kernels, Policy()).chosen == select(traced._replace(device="cpu", sm=0), kernels,
                                                           Policy()).chosen


def test_trace_flags_reach_the_spec_of_calls_traced_inside_the_block(monkeypatch):
    from layerzero import compiled, dispatch

    seen = []
    real = dispatch.decide
    monkeypatch.setattr(dispatch, "decide", lambda spec: seen.append(spec.flags) or real(spec))
    x, w = torch.randn(4, 64), torch.randn(64)
    torch._dynamo.reset()
    with compiled.trace_flags("matvec"):
        torch.compile(lambda x, w: lz.rms_norm(x, w), backend="eager", fullgraph=True)(x, w)
    assert seen and all({"traced", "matvec"} <= f for f in seen)
    seen.clear()
    torch._dynamo.reset()
    torch.compile(lambda x, w: lz.rms_norm(x, w) * 2, backend="eager", fullgraph=True)(x, w)
    assert seen and all("traced" in f and "matvec" not in f for f in seen)
