"""The attention correctness grid on the GPU: every attention kernel available here, on every
grid call it accepts, against an fp32 reference under the flash-attention rule
(|out - ref| <= 2 |plain PyTorch in the same dtype - ref| + floor), proving which kernel ran.

Grid: fp16/bf16 x head_dim 64/128/256 and 80 x shapes (MHA, GQA, Sq < Sk, Sq > Sk, decode) x
features (plain, causal both alignments, windows, softcap, bool/float/empty-row masks, ALiBi,
sinks, non-contiguous bshd and strided inputs). Cheap kernels run all of it. Kernels that
compile per configuration run a covering subset (every feature, dtype, head_dim and shape at
least once): flash-attn-4 (CuTe DSL compile ~2-3 s per config), flex (torch.compile) and
FlashInfer (nvcc JIT, 12-70 s per variant: bf16 with head_dim 128 plus one fp16/64 call).
LZ_GPU_GRID=full runs everything for every kernel (much slower); LZ_GPU_GRID=quick trims the
cheap kernels to head_dim 128. A call a kernel refuses is counted with its reason; the table
goes to $LZ_GPU_REPORT (JSON) when set.
"""
from __future__ import annotations

import json
import math
import os
import time
import zlib

import pytest
import torch

import layerzero as lz
from layerzero import reference, registry

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16]
HEAD_DIMS = [64, 128, 256, 80]
SHAPES = {"mha": (2, 8, 8, 256, 256), "gqa": (2, 8, 2, 200, 200), "sq<sk": (2, 8, 2, 64, 320),
          "sq>sk": (1, 4, 4, 300, 120), "decode": (4, 8, 2, 1, 513)}
FEATURES = ["plain", "causal_tl", "causal_br", "window_causal", "window_2sided", "softcap",
            "bool_mask", "empty_rows", "float_mask", "alibi", "sinks", "bshd_packed", "strided"]
FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
COMPILING = {"flash_attn.fa4", "torch.flex", "flashinfer.prefill", "flashinfer.decode"}
REPORT: dict = {}


def grid_cases(kernel: str) -> list[tuple]:
    """(feature, dtype, head_dim, shape name) for `kernel` (see the module docstring)."""
    mode = os.environ.get("LZ_GPU_GRID", "default")
    full = [(f, dt, d, s) for s in SHAPES for d in HEAD_DIMS for dt in DTYPES for f in FEATURES]
    if mode == "full":
        return full
    if kernel.startswith("flashinfer."):
        shapes = ["decode"] if kernel.endswith("decode") else ["gqa", "sq<sk"]
        feats = ["plain", "causal_br", "window_causal", "softcap", "bool_mask", "empty_rows", "bshd_packed"]
        cases = [(f, torch.bfloat16, 128, s) for s in shapes for f in feats]
        return cases + [("causal_br", torch.float16, 64, shapes[0])]
    if kernel in COMPILING:          # flex: every feature once; FA4: 7 more (dtype x head_dim)
        names = list(SHAPES)
        feats = FEATURES if kernel == "torch.flex" else FEATURES + FEATURES[:7]
        return [(f, DTYPES[j % 2], HEAD_DIMS[j % 4], names[j % 5]) for j, f in enumerate(feats)]
    if mode == "quick":
        return [c for c in full if c[2] == 128]
    return full


def make_call(feature, dtype, d, shape, device="cuda"):
    """(q, k, v, kwargs) for one grid call; tensors in `dtype`, kwargs' tensors on the device."""
    b, hq, hk, sq, sk = SHAPES[shape]
    g = torch.Generator(device=device).manual_seed(zlib.crc32(f"{feature}/{d}/{shape}".encode()))

    def rn(*s):
        return torch.randn(*s, generator=g, device=device, dtype=torch.float32).to(dtype)
    kw: dict = {}
    if feature == "bshd_packed":            # views into one (B, S, H, D) buffer: non-contiguous
        if sq == sk:
            qkv = rn(b, sq, hq + 2 * hk, d)
            q, k, v = qkv.split([hq, hk, hk], dim=2)
        else:
            q = rn(b, sq, hq, d)
            k, v = rn(b, sk, 2 * hk, d).split([hk, hk], dim=2)
        return q, k, v, {"layout": "bshd", "is_causal": True, "causal_align": "bottom_right"}
    if feature == "strided":                 # rows of a wider buffer: stride(-2) = 2 * D
        q, k, v = (rn(b, h, s, 2 * d)[..., :d] for h, s in ((hq, sq), (hk, sk), (hk, sk)))
        return q, k, v, {"is_causal": sq == sk}
    q, k, v = rn(b, hq, sq, d), rn(b, hk, sk, d), rn(b, hk, sk, d)
    if feature == "causal_tl":
        kw = {"is_causal": True}
    elif feature == "causal_br":
        kw = {"is_causal": True, "causal_align": "bottom_right"}
    elif feature == "window_causal":         # mistral-style sliding window
        kw = {"is_causal": True, "window": (48, 0), "causal_align": "bottom_right"}
    elif feature == "window_2sided":
        kw = {"window": (32, 16)}
    elif feature == "softcap":               # gemma-2
        kw = {"is_causal": True, "softcap": 20.0, "scale": 0.2}
    elif feature == "bool_mask":             # left padding of request 0
        m = torch.ones(b, 1, 1, sk, dtype=torch.bool, device=device)
        m[0, ..., : sk // 4] = False
        kw = {"attn_mask": m}
    elif feature == "empty_rows":
        m = torch.rand(b, 1, sq, sk, generator=g, device=device) > 0.3
        m[:, :, :: 3] = False                # every third query attends nothing -> zeros
        kw = {"attn_mask": m}
    elif feature == "float_mask":
        kw = {"attn_mask": (torch.rand(b, hq, sq, sk, generator=g, device=device) * 4 - 2).to(dtype)}
    elif feature == "alibi":
        kw = {"alibi_slopes": torch.tensor([2 ** (-8 * (i + 1) / hq) for i in range(hq)], device=device),
              "is_causal": True}
    elif feature == "sinks":
        kw = {"sinks": torch.randn(hq, generator=g, device=device), "is_causal": True,
              "causal_align": "bottom_right"}
    return q, k, v, kw


def _f32(kw):
    return {n: (x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x)
            for n, x in kw.items()}


def check_rule(out, q, k, v, kw):
    """None if out passes the flash-attention rule, else a description of the miss."""
    ref = reference.attention(q.float(), k.float(), v.float(), **_f32(kw))
    base = reference.attention(q, k, v, **kw, upcast=False)
    if out.shape != ref.shape or out.dtype != q.dtype:
        return f"shape/dtype {tuple(out.shape)} {out.dtype}, expected {tuple(ref.shape)} {q.dtype}"
    if not torch.isfinite(out).all():
        return "non-finite output"
    err = (out.float() - ref).abs().max().item()
    b = (base.float() - ref).abs().max().item()
    bound = 2 * b + FLOOR[q.dtype]
    return None if err <= bound else f"error {err:.3g} > 2 x {b:.3g} + {FLOOR[q.dtype]:g}"


ATTN = [k.id for k in registry.op_kernels("attention") if k.id != "reference.attention"]


@pytest.fixture(scope="module", autouse=True)
def report():
    yield REPORT
    path = os.environ.get("LZ_GPU_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                       "torch": torch.__version__, "kernels": REPORT}, f, indent=1)


@pytest.mark.parametrize("kernel", ATTN)
def test_attention_grid(kernel):
    info = {k.id: k for k in lz.kernels("attention")}[kernel]
    if not info.available:
        REPORT[kernel] = {"available": False, "reason": info.reason}
        pytest.skip(f"{kernel} unavailable: {info.reason}")
    rep = {"available": True, "ran": 0, "passed": 0, "refused": {}, "failed": [], "seconds": 0.0}
    REPORT[kernel] = rep
    t0 = time.perf_counter()
    for feature, dtype, d, shape in grid_cases(kernel):
        q, k, v, kw = make_call(feature, dtype, d, shape)
        name = f"{feature}/{str(dtype)[6:]}/d{d}/{shape}"
        if kernel.startswith("flashinfer."):  # a variant not yet built is refused until built
            lz.warmup("attention", q, k, v, **kw)
        cand = {c.kernel: c for c in lz.explain("attention", q, k, v, **kw).candidates}[kernel]
        if cand.status not in ("eligible", "chosen"):
            why = (cand.reasons or [cand.status])[0][:120]
            rep["refused"][why] = rep["refused"].get(why, 0) + 1
            continue
        lz.reset_metrics()
        rep["ran"] += 1
        try:
            with lz.use(kernel):
                out = lz.attention(q, k, v, **kw)
            torch.cuda.synchronize()
            ran = lz.metrics()["calls"].get("attention", {})
            miss = None if ran == {kernel: 1} else f"ran {ran}, not {kernel}"
            miss = miss or check_rule(out, q, k, v, kw)
        except Exception as e:  # noqa: BLE001 - recorded, then asserted below
            miss = f"raised {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if miss:
            rep["failed"].append(f"{name}: {miss}")
        else:
            rep["passed"] += 1
    rep["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"\n{kernel}: {rep['passed']}/{rep['ran']} passed in {rep['seconds']} s; refused "
          f"{sum(rep['refused'].values())} ({'; '.join(list(rep['refused'])[:4])})")
    assert rep["ran"] > 0, f"{kernel} accepted none of the grid's calls: {rep['refused']}"
    assert not rep["failed"], "\n".join(rep["failed"][:30])


def test_selection_on_this_gpu_prefers_fa4_for_big_prefill():
    """H100/B200 defaults: flash-attn-4 for large plain prefill when it's installed; SDPA's
    default for decode (FIELD-NOTES' table)."""
    sm = torch.cuda.get_device_capability()
    q = torch.randn(4, 32, 2048, 128, device="cuda", dtype=torch.bfloat16)
    chosen = lz.which("attention", q, q, q, is_causal=True)
    fa4 = {k.id: k for k in lz.kernels("attention")}["flash_attn.fa4"]
    if fa4.available and sm[0] in (9, 10):
        assert chosen == "flash_attn.fa4", str(lz.explain("attention", q, q, q, is_causal=True))
    qd = torch.randn(64, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    kd = torch.randn(64, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)
    assert lz.which("attention", qd, kd, kd).startswith("torch.sdpa")


def test_fa4_custom_op_compiles_fullgraph():
    info = {k.id: k for k in lz.kernels("attention")}["flash_attn.fa4"]
    if not info.available:
        pytest.skip(info.reason)
    q = torch.randn(2, 256, 8, 128, device="cuda", dtype=torch.bfloat16)

    def f(q):
        return torch.ops.layerzero.fa4(q, q, q, 1 / math.sqrt(128), True, -1, 0, 0.0, None, 1).float().sum()

    assert torch.allclose(torch.compile(f, fullgraph=True)(q), f(q), rtol=1e-3)


def test_sdpa_reasons_come_from_torch_on_this_gpu():
    """torch's own gates refine the static reasons: a float32 call is refused by flash and cuDNN,
    taken by efficient; an fp16 call with a mask is refused by flash."""
    q = torch.randn(1, 4, 64, 64, device="cuda")
    by = {c.kernel: c for c in lz.explain("attention", q, q, q).candidates}
    assert by["torch.sdpa_flash"].status == "rejected" and by["torch.sdpa_efficient"].status != "rejected"
    h = q.half()
    m = torch.ones(64, 64, dtype=torch.bool, device="cuda")
    by = {c.kernel: c for c in lz.explain("attention", h, h, h, attn_mask=m).candidates}
    assert by["torch.sdpa_flash"].status == "rejected"
    assert by["torch.sdpa"].status in ("chosen", "eligible"), by["torch.sdpa"].reasons


def _flex_check(q, k, v, kw, grad=False):
    """torch.flex runs the call (no fallback) within the flash-attention rule, gradients too."""
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    lz.reset_metrics()
    with lz.use("torch.flex"):
        out = lz.attention(q, k, v, **kw)
    torch.cuda.synchronize()
    assert lz.metrics()["calls"]["attention"] == {"torch.flex": 1}
    assert lz.metrics()["fallbacks"] == {}
    miss = check_rule(out.detach(), q.detach(), k.detach(), v.detach(), kw)
    assert miss is None, miss
    if grad:
        go = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), go)
        ins = [t.detach().float().requires_grad_() for t in (q, k, v)]
        ref = torch.autograd.grad(reference.attention(*ins, **_f32(kw)), ins, go.float())
        for name, a, r in zip("qkv", got, ref):
            rel = (a.float() - r).abs().max().item() / r.abs().max().item()
            assert rel < 0.02, f"d{name}: relative error {rel:.3g}"


@pytest.mark.parametrize("d", [80, 96, 192, 256])
def test_flex_takes_head_dims_beyond_powers_of_two(d):
    """Issue 12: softcap/sinks calls with head_dim 80..256 ran the reference; flex takes them
    (H200, torch 2.11), backward included."""
    if torch.cuda.get_device_capability()[0] < 9 and d > 128:
        pytest.skip("head_dim > 128 in flex needs Hopper's shared memory")
    q, k, v = (torch.randn(2, h, 256, d, device="cuda", dtype=torch.bfloat16) for h in (8, 2, 2))
    sinks = torch.randn(8, device="cuda")
    _flex_check(q, k, v, {"is_causal": True, "softcap": 30.0, "sinks": sinks}, grad=d == 256)


def test_flex_short_queries_with_a_large_gqa_group():
    """Sq < 128 with a block mask and Sq x group > 128 went to inductor's flex-decoding kernel,
    which had no config for it (NoValidChoicesError, a runtime fallback every call): it takes
    the main kernel now."""
    q = torch.randn(2, 8, 64, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 256, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    _flex_check(q, k, v, {"is_causal": True, "causal_align": "bottom_right", "window": (64, -1),
                          "softcap": 30.0})


def test_feature_calls_reach_a_fast_kernel():
    """benchmarks/attention_features.py's 120 calls: the reference is chosen only for the
    combinations docs/backends.md lists (softcap or sinks together with a float mask)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[2] / "benchmarks" / "attention_features.py"
    spec = importlib.util.spec_from_file_location("attention_features", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    wrong = []
    for desc, build in mod.make_calls(120, 12, "cuda"):
        q, k, v, kw = build("cuda")
        if desc["grad"]:
            q.requires_grad_()
        chosen = lz.which("attention", q, k, v, **kw)
        listed = (desc.get("softcap") or desc.get("sinks")) and desc.get("mask") == "float_full"
        if (chosen == "reference.attention") != bool(listed):
            wrong.append(f"{chosen}: {desc}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("kernel", ["torch.sdpa_efficient", "torch.sdpa_flash", "torch.sdpa_cudnn"])
def test_fused_sdpa_kernels_take_a_last_dim_that_is_not_contiguous(kernel):
    """q/k/v whose last dim has a stride (a Conv1d's (B, C, S) output viewed as heads: squeezebert)
    pass LayerZero's eligibility, which reads shapes only; SDPA's gate refuses them ("No
    available kernel"), so the adapters copy such views instead of failing over to another kernel."""
    info = {k.id: k for k in lz.kernels("attention")}[kernel]
    if not info.available:
        pytest.skip(f"{kernel} unavailable: {info.reason}")
    g = torch.Generator(device="cuda").manual_seed(3)

    def strided(*shape):   # (B, H, S, D) with stride(-1) == S
        x = torch.randn(*shape[:2], shape[3], shape[2], generator=g, device="cuda", dtype=torch.bfloat16)
        return x.transpose(-1, -2)

    q, k, v = strided(2, 8, 128, 64), strided(2, 8, 128, 64), strided(2, 8, 128, 64)
    assert q.stride(-1) != 1
    lz.reset_metrics()
    with lz.use(kernel):
        out = lz.attention(q, k, v, is_causal=True)
    torch.cuda.synchronize()
    assert lz.metrics()["calls"].get("attention") == {kernel: 1}, lz.metrics()
    assert not lz.metrics()["fallbacks"], lz.metrics()["fallbacks"]
    assert check_rule(out, q, k, v, {"is_causal": True}) is None
