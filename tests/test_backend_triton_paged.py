"""triton.paged_attention (LayerZero's own split-KV paged kernel) runs for real on the CPU under
TRITON_INTERPRET=1, in a subprocess so that no other test sees the variable (as
test_backend_triton.py does). Every case is checked against reference.paged_attention in float64
and a float64 dense recomputation row by row, under the flash-attention rule; lz.metrics proves
the kernel ran. Cases: random page order, page sizes 1/4/16, MHA, GQA 2/4 and MQA, causal or
not, windows, softcap, sinks, Sq 1/3/16, left-padded queries and empty rows (exact zeros),
fp32/fp16 (the interpreter truncates bf16: bf16 is the GPU test's), both layouts, int64 metadata,
K/V as strided views of one (pages, 2, page_size, H, D) pool, several key splits, tiles and query
blocks. On the GPU host the last test checks bf16 at the benchmark's shape inside a CUDA graph."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import layerzero as lz
from layerzero.backends import triton_paged
from layerzero.call import CallSpec

SCRIPT = textwrap.dedent("""
    import os, math, sys, torch
    assert os.environ["TRITON_INTERPRET"] == "1"
    sys.path.insert(0, TESTS)
    from test_paged_attention import _dense_reference     # the row-by-row dense oracle
    import layerzero as lz
    from layerzero import reference
    from layerzero.backends import triton_paged as TP, _triton_paged_impl as T
    FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
    launches = []                                  # (kernel name, grid) of every launch

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append((self.kernel.__name__, tuple(grid)))
            return self.kernel[grid]
    for launch in (T._split_launch, T._merge_launch):
        launch.kernel = Spy(launch.kernel)

    def paged(b=3, hq=4, hkv=2, sq=1, d=16, dv=16, page=4, lens=(9, 1, 14), dtype=torch.float32,
              idx=torch.int32, fused=False, strided=False, seed=0, extra_pages=1):
        \"\"\"Pages in random order; unused slots and pages hold NaN. fused: K and V are strided
        views of one (num_pages, 2, page, Hkv, max(d, dv)) pool; strided: so are the page table and
        the lengths.\"\"\"
        g = torch.Generator().manual_seed(seed)
        per_row = [-(-n // page) for n in lens]
        num = sum(per_row) + 2
        order = torch.randperm(num, generator=g).tolist()
        if fused:
            pool = torch.full((num, 2, page, hkv, max(d, dv)), float("nan"), dtype=dtype)
            kp, vp = pool[:, 0, :, :, :d], pool[:, 1, :, :, :dv]
        else:
            kp = torch.full((num, page, hkv, d), float("nan"), dtype=dtype)
            vp = torch.full((num, page, hkv, dv), float("nan"), dtype=dtype)
        table = torch.full((b, 2 * (max(per_row) + extra_pages)), -1, dtype=idx)[:, ::2]
        table = table if strided else table.contiguous()
        dense = []
        for row, (n, pages) in enumerate(zip(lens, per_row)):
            ids = [order.pop() for _ in range(pages)]
            k = torch.randn(n, hkv, d, generator=g).to(dtype)
            v = torch.randn(n, hkv, dv, generator=g).to(dtype)
            for t in range(n):
                kp[ids[t // page], t % page] = k[t]
                vp[ids[t // page], t % page] = v[t]
            table[row, :pages] = torch.tensor(ids, dtype=idx)
            dense.append((k, v))
        q = torch.randn(b, hq, sq, d, generator=g).to(dtype)
        lens = torch.tensor([x for n in lens for x in (n, -5)], dtype=idx)[::2]
        return q, kp, vp, table, lens if strided else lens.contiguous(), dense

    def check(what, op_kw, dtypes=(torch.float32,), layouts=("bhsd",), splits=None, **shape):
        n = 0
        for dt in dtypes:
            for layout in layouts:
                q, kp, vp, table, lens, dense = paged(dtype=dt, **shape)
                kw = dict(op_kw)
                if kw.get("sinks") == "yes":
                    kw["sinks"] = torch.randn(2 * q.shape[1], generator=torch.Generator().manual_seed(3)).to(dt)[::2]
                ref_kw = dict(is_causal=kw.get("is_causal", True), window=kw.get("window"),
                              softcap=kw.get("softcap"), scale=kw.get("scale"), sinks=kw.get("sinks"))
                dense64 = _dense_reference(q, dense, True, **ref_kw)
                base = _dense_reference(q, dense, False, **ref_kw)
                d = lambda t: t.double() if isinstance(t, torch.Tensor) else t
                ref64 = reference.paged_attention(q.double(), kp.double(), vp.double(), table, lens,
                                                  **{k: d(v) for k, v in kw.items()})
                assert (ref64 - dense64).abs().max() < 1e-9, what       # the two oracles agree
                qq = q if layout == "bhsd" else q.transpose(1, 2).contiguous()
                lz.reset_metrics()
                del launches[:]
                with lz.use("triton.paged_attention"):
                    assert lz.which("paged_attention", qq, kp, vp, table, lens, layout=layout, **kw) == "triton.paged_attention"
                    out = lz.paged_attention(qq, kp, vp, table, lens, layout=layout, **kw)
                assert lz.metrics()["calls"]["paged_attention"] == {"triton.paged_attention": 1}, what
                assert out.shape == qq.shape[:3] + (vp.shape[3],) and out.dtype == dt, what
                out = out if layout == "bhsd" else out.transpose(1, 2)
                err = (out.double() - ref64).abs().max().item()
                b = (base.double() - ref64).abs().max().item()
                assert torch.isfinite(out).all(), what
                assert err <= 2 * b + FLOOR[dt], f"{what} {dt} {layout}: error {err:.3g} vs baseline {b:.3g}"
                if kw.get("is_causal", True):          # queries before a row's first key: exact zeros
                    for row, n_keys in enumerate(lens.tolist()):
                        assert not out[row, :, :max(0, q.shape[2] - n_keys)].any(), what
                names = [k for k, _ in launches]
                if splits is not None:                 # (split grid, merged?) as planned
                    assert launches[0][1][1] == splits, (what, launches)
                    assert names == (["_split_kernel"] if splits == 1 else ["_split_kernel", "_merge_kernel"]), names
                n += 1
        return n

    n = 0
    # the direct path (one split: small tables), BLOCK_N 64 / 128 from the head dims
    n += check("plain gqa2", {}, dtypes=(torch.float32, torch.float16), layouts=("bhsd", "bshd"), sq=3, splits=1)
    n += check("decode page 1 mha", {}, sq=1, page=1, hq=2, hkv=2, lens=(5, 1, 3), splits=1)
    # bf16: the interpreter truncates fp32 -> bf16 (GPUs round) and the kernel multiplies in fp32
    # there (its bf16 tl.dot is wrong): a smoke check of that path; bf16 proper is the GPU test's
    n += check("bf16 under the interpreter", dict(window=(6, 0)), dtypes=(torch.bfloat16,), sq=3)
    n += check("window softcap sinks gqa4", dict(window=(3, 0), softcap=5.0, sinks="yes"), hq=4, hkv=1,
               sq=3, dtypes=(torch.float32, torch.float16))
    n += check("left padded + empty row", {}, sq=16, lens=(9, 2, 0), page=16, layouts=("bshd",))
    n += check("noncausal both sides, int64 strided meta, fused pool, dv 8",
               dict(is_causal=False, window=(2, 1), scale=0.3), sq=3, dv=8, idx=torch.int64, fused=True,
               strided=True)
    n += check("window sides past any row (clamped)", dict(is_causal=False, window=(10**12, 10**12)), sq=3)
    T._OFF32_LIMIT = 0                             # 64-bit page offsets (pools past 2**31 elements)
    n += check("noncausal left padded, 64-bit offsets", dict(is_causal=False), sq=3, lens=(1, 0, 5))
    T._OFF32_LIMIT = 1 << 31
    n += check("d 80 / dv 48", dict(window=(5, -1)), sq=1, d=80, dv=48, hq=8, hkv=2, lens=(40, 7, 33), page=16)
    # several splits and tiles: BLOCK_N 16, a split per 16 keys of capacity, 64 "SMs"
    T._TILE_BYTES, T._MIN_SPLIT_KEYS, T._CPU_SMS = 16 * 16 * 4, 16, 64
    T._plans.clear()
    n += check("splits decode gqa4", {}, hq=8, hkv=2, sq=1, lens=(70, 3, 0, 33), b=4, page=4,
               dtypes=(torch.float32, torch.float16), splits=4)
    n += check("splits window right, causal", dict(window=(20, 4)), hq=4, hkv=2, sq=3,
               lens=(70, 3, 40), page=16, layouts=("bhsd", "bshd"), splits=6)
    n += check("splits softcap sinks mqa", dict(softcap=2.0, sinks="yes", is_causal=False), hq=4, hkv=1, sq=1,
               lens=(50, 0, 17), page=1, extra_pages=80, strided=True, splits=8)
    n += check("splits window only (rows shorter than the window)", dict(is_causal=False, window=(4, 30)),
               hq=2, hkv=2, sq=3, lens=(45, 2, 20), page=4, dtypes=(torch.float16,), splits=3)
    # several query blocks: G * Sq = 32 rows in blocks of 16
    T._MAX_BLOCK_M = 16
    T._plans.clear()
    n += check("query blocks sq 16", dict(window=(9, 0)), hq=2, hkv=1, sq=16, lens=(40, 5, 18), page=4)
    assert launches[0][1] == (3, 2, 2), launches          # (B * Hkv, splits, m_blocks)

    # splits are a function of shapes: other lengths, same plan and grid
    q, kp, vp, table, lens, _ = paged(b=4, lens=(70, 3, 0, 33), page=4, hq=8, hkv=2)
    T._plans.clear()
    grids = []
    for new in (lens, torch.tensor([1, 0, 0, 2], dtype=torch.int32), torch.tensor([72, 72, 72, 72], dtype=torch.int32)):
        del launches[:]
        TP.paged_attention(q, kp, vp, table, new)
        grids.append(launches[:])
    assert grids[0] == grids[1] == grids[2] and len(T._plans) == 1, grids

    # torch.compile traces the kernel as one custom-op call (no graph break: nothing read on the host)
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(nd.target) for nd in gm.graph.nodes if nd.op == "call_function")
        return gm.forward
    f = torch.compile(lambda q, kp, vp, t, l: TP.paged_attention(q, kp, vp, t, l, None, True, (5, 0), 3.0),
                      fullgraph=True, backend=backend)
    out = f(q, kp, vp, table, lens)
    assert any("triton_paged_attention" in t for t in targets), targets
    ref = reference.paged_attention(q, kp, vp, table, lens, window=(5, 0), softcap=3.0)
    assert (out - ref).abs().max() < 1e-5

    # selection under the interpreter: available, picked by lz.use only, reasons for the rest
    d = lz.explain("paged_attention", q, kp, vp, table, lens)
    assert d.chosen == "reference.paged_attention", d
    cand = {c.kernel: c for c in d.candidates}["triton.paged_attention"]
    assert cand.status != "unavailable" and cand.reasons == [], cand
    q65 = torch.randn(4, 8, 65, 16)
    cand = {c.kernel: c for c in lz.explain("paged_attention", q65, kp, vp, table, lens).candidates}
    assert any("Sq <= 64" in r for r in cand["triton.paged_attention"].reasons), cand
    cand = {c.kernel: c for c in lz.explain("paged_attention", q.double(), kp.double(), vp.double(), table,
                                             lens).candidates}
    assert any("float64" in r for r in cand["triton.paged_attention"].reasons), cand
    print("OK", n)
""").replace("TESTS", repr(os.path.dirname(os.path.abspath(__file__))))


def test_paged_kernel_under_interpreter(tmp_path):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", LAYERZERO_CACHE_DIR=str(tmp_path), LAYERZERO_PROBE="0")
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]


def _spec(**kw):
    base = dict(op="paged_attention", device="cuda", sm=90, dtype=torch.bfloat16, batch=64, num_heads=32,
                num_kv_heads=8, seq_len_q=1, seq_len_k=4096, head_dim=128, head_dim_v=128,
                layout="bhsd", causal=True, causal_align="bottom_right", page_size=16)
    return CallSpec(**{**base, **kw})


def test_supports_reasons_and_priority(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert triton_paged.supports(_spec()) == []
    assert triton_paged.supports(_spec(seq_len_q=64, window=(128, 0), softcap=True, sinks=True,
                                       dtype=torch.float16, head_dim=256, head_dim_v=80)) == []
    for kw, words in ((dict(device="cpu", sm=0), "needs a CUDA device"), (dict(sm=75), "sm80+"),
                      (dict(dtype=torch.float64), "float64"), (dict(grad=True), "forward-only"),
                      (dict(head_dim=512, head_dim_v=512), "head_dim <= 256"),
                      (dict(seq_len_q=65), "Sq <= 64")):
        reasons = triton_paged.supports(_spec(**kw))
        assert len(reasons) == 1 and words in reasons[0], (kw, reasons)
    k = lz.registry.get("triton.paged_attention")
    assert k.priority(_spec()) == 60 and k.priority(_spec(device="cpu", sm=0)) == -1   # reference: 0


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="a GPU (or the interpreter) is here")
def test_explain_lists_it_unavailable_on_cpu():
    q = torch.randn(2, 4, 1, 16)
    kp = vp = torch.randn(4, 4, 2, 16)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    d = lz.explain("paged_attention", q, kp, vp, table, torch.tensor([5, 8], dtype=torch.int32))
    cand = {c.kernel: c for c in d.candidates}["triton.paged_attention"]
    assert d.chosen == "reference.paged_attention"
    assert cand.status == "unavailable" and "CUDA GPU" in cand.reasons[0], cand
    assert "triton.paged_attention" in str(d)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_goal_shape_bf16_and_cuda_graph():
    """bf16 at the benchmark's decode shape (64 rows of up to 4096 keys, 32/8 heads, d128, pages
    of 16 in random order) against the reference, then the same call captured in a CUDA graph
    and replayed after the lengths and the queries changed in place."""
    from layerzero import reference
    dev, dt, b, hq, hkv, d, page, n = "cuda", torch.bfloat16, 64, 32, 8, 128, 16, 4096
    g = torch.Generator(device=dev).manual_seed(0)
    pages = b * n // page
    kp = torch.randn(pages, page, hkv, d, device=dev, dtype=dt, generator=g)
    vp = torch.randn(pages, page, hkv, d, device=dev, dtype=dt, generator=g)
    table = torch.randperm(pages, device=dev, generator=g).view(b, n // page).to(torch.int32)
    lens = torch.randint(1, n + 1, (b,), device=dev, generator=g, dtype=torch.int32)
    lens[0] = n
    q = torch.randn(b, hq, 1, d, device=dev, dtype=dt, generator=g)
    lz.reset_metrics()
    with lz.use("triton.paged_attention"):
        out = lz.paged_attention(q, kp, vp, table, lens)
    assert lz.metrics()["calls"]["paged_attention"] == {"triton.paged_attention": 1}
    ref = reference.paged_attention(q.float(), kp.float(), vp.float(), table, lens)
    base = reference.paged_attention(q, kp, vp, table, lens)           # bf16 inputs, fp32 math
    err, berr = (out.float() - ref).abs().max().item(), (base.float() - ref).abs().max().item()
    assert err <= 2 * berr + 1.6e-2, (err, berr)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), lz.use("triton.paged_attention"):
        lz.paged_attention(q, kp, vp, table, lens)                     # warm: compile outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), lz.use("triton.paged_attention"):
        out_g = lz.paged_attention(q, kp, vp, table, lens)
    lens.copy_(torch.randint(1, n + 1, (b,), device=dev, generator=g, dtype=torch.int32))
    q.copy_(torch.randn(q.shape, device=dev, dtype=dt, generator=g))
    graph.replay()
    ref = reference.paged_attention(q.float(), kp.float(), vp.float(), table, lens)
    assert (out_g.float() - ref).abs().max().item() <= 2 * berr + 1.6e-2
