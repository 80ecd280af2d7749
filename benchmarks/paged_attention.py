"""Paged attention on the GPU: LayerZero's Triton split-KV kernel (triton.paged_attention) against
the reference (gathers pages, reads lengths on the host), SDPA on the same K/V gathered dense
beforehand (a baseline: what a dense cache would cost), and FlashInfer's paged kernels through
LayerZero (`lz.use("flashinfer")`) when flashinfer imports.

The goal shape is a decode step at batch 64 x 4096 keys, 32 query / 8 kv heads, d128, bf16, pages
of 16 in random order: the kernel must read K and V at >= 85% of the device copy bandwidth
measured in the same run (dst.copy_(src) of 1 GiB, read + written bytes / time, as
benchmarks/e2e_generate.py's copy_bandwidth). Also: 1 x 256, 8 x 2048, ragged lengths (uniform in
1..4096), and a speculative verify step (Sq = 4).

Timing: "graph" = GPU time per call replaying 10 calls captured in a CUDA graph (no host cost);
kernels that read values on the host (the reference; FlashInfer's plan in LayerZero's
flashinfer.* kernels) can't be captured and get "loop" = CUDA events around 20 back-to-back eager
calls (host time and syncs included; every kernel's loop time is printed too). FlashInfer's own
decode wrapper is also timed planned once, run() alone (graphed when it captures). Bandwidth =
bytes of K and V the rows hold (sum of lengths x kv heads x (D + Dv) x 2) / time. --sweep also times the Triton kernel at the goal shape over its tile / stage / split
constants (`layerzero/backends/_triton_paged_impl.py`; 72 configs, each compiled: minutes), to
pick its defaults on this GPU.

    PYTHONPATH=$PWD python benchmarks/paged_attention.py --json benchmarks/results/paged_attention_h100.json [--sweep]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_generate as G  # noqa: E402  (copy_bandwidth)

import layerzero as lz  # noqa: E402
from layerzero import reference, registry  # noqa: E402

HQ, HKV, D, PAGE, DT = 32, 8, 128, 16, torch.bfloat16
SHAPES = [  # (name, batch, keys per row, Sq, ragged lengths)
    ("decode 64x4096 (goal)", 64, 4096, 1, False),
    ("decode 1x256", 1, 256, 1, False),
    ("decode 8x2048", 8, 2048, 1, False),
    ("decode 64x(1..4096) ragged", 64, 4096, 1, True),
    ("verify 8x2048 Sq=4", 8, 2048, 4, False),
]


def loop_us(fn, n: int = 20, trials: int = 5) -> float:
    """Median over trials of CUDA-event time per call of n back-to-back calls (host included)."""
    for _ in range(3):
        fn()
    res = []
    for _ in range(trials):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(n):
            fn()
        e1.record()
        e1.synchronize()
        res.append(e0.elapsed_time(e1) / n * 1e3)
    return statistics.median(res)


def graph_us(fn, calls: int = 10) -> float:
    """GPU time per call: `calls` calls captured in one CUDA graph, replayed (raises if the call
    can't be captured)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return loop_us(g.replay) / calls


def make(b, n, sq, ragged, seed=0):
    """Pages of the rows in random order, q, lengths, and the dense K/V SDPA reads."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    per_row = n // PAGE
    pages = b * per_row
    kp = torch.randn(pages, PAGE, HKV, D, device="cuda", dtype=DT, generator=g)
    vp = torch.randn(pages, PAGE, HKV, D, device="cuda", dtype=DT, generator=g)
    table = torch.randperm(pages, device="cuda", generator=g).view(b, per_row).to(torch.int32)
    if ragged:
        lens = torch.randint(1, n + 1, (b,), device="cuda", generator=g, dtype=torch.int32)
    else:
        lens = torch.full((b,), n, device="cuda", dtype=torch.int32)
    q = torch.randn(b, HQ, sq, D, device="cuda", dtype=DT, generator=g)
    return q, kp, vp, table, lens


def via_lz(kernel, args):
    def f():
        with lz.use(kernel):
            return lz.paged_attention(*args)
    return f


def flashinfer_direct(args):
    """FlashInfer's own decode wrapper, planned once outside the timing (its run() alone: the
    number FlashInfer's ~91%-of-copy decode figure refers to), or None without flashinfer."""
    try:
        import flashinfer
    except Exception:      # not installed, or an ABI break
        return None
    from layerzero.paged import csr
    q, kp, vp, table, lens = args
    indptr, indices, last = csr(table, lens, PAGE)
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=HQ // HKV >= 4)
    w.plan(indptr, indices, last, HQ, HKV, D, PAGE, q_data_type=DT, kv_data_type=DT)
    q3 = q[:, :, 0].contiguous()                                          # (B, Hq, D)
    return lambda: w.run(q3, (kp, vp)).unsqueeze(2)


def kernels_for(args, sq, ragged):
    """name -> (callable, whether to try a CUDA graph). Kernels that read metadata on the host
    (the reference; FlashInfer's plan inside LayerZero's kernel) are timed eagerly only."""
    q, kp, vp, table, lens = args
    fns = {"triton.paged_attention": (via_lz("triton.paged_attention", args), True),
           "reference.paged_attention": (lambda: reference.paged_attention(*args), False)}
    if not ragged:     # SDPA on K/V gathered dense beforehand (all rows full: no mask for Sq = 1)
        k = reference.gather_pages(kp, table, table.shape[1]).contiguous()   # (B, Hkv, Sk, D)
        v = reference.gather_pages(vp, table, table.shape[1]).contiguous()
        sk = k.shape[2]
        mask = None if sq == 1 else reference.attention_allowed(sq, sk, is_causal=True, window=None,
                                                                causal_align="bottom_right", device="cuda")
        fns["torch sdpa (dense K/V)"] = (lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=False, enable_gqa=True), True)
    spec = lz.explain("paged_attention", *args).spec
    for kid in sorted(kk.id for kk in registry.op_kernels("paged_attention") if kk.id.startswith("flashinfer.")):
        kern = registry.get(kid)
        if registry.unavailable_reason(kern) is None and not kern.reasons(spec):
            fns[kid] = (via_lz(kid, args), False)
    if sq == 1:
        direct = flashinfer_direct(args)
        if direct is not None:
            fns["flashinfer decode run() (planned once)"] = (direct, True)
    return fns


def run_shape(name, b, n, sq, ragged, copy_bw):
    args = make(b, n, sq, ragged)
    q, kp, vp, table, lens = args
    nbytes = int(lens.sum()) * HKV * 2 * D * kp.element_size()
    ref = reference.paged_attention(q.float(), kp.float(), vp.float(), table, lens)
    row = {"name": name, "batch": b, "keys": n, "sq": sq, "ragged": ragged, "kv_bytes": nbytes,
           "lz_picks": lz.explain("paged_attention", *args).chosen, "kernels": {}}
    print(f"== {name}: {nbytes / 1e6:.1f} MB of K+V, lz picks {row['lz_picks']}")
    for kname, (fn, graphable) in kernels_for(args, sq, ragged).items():
        try:
            out = fn()
            torch.cuda.synchronize()
            loop = loop_us(fn)
        except Exception as e:  # a kernel that can't run this shape: say why, go on
            print(f"   {kname:38s} raised {type(e).__name__}: {str(e)[:120]}")
            row["kernels"][kname] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        err = (out.float() - ref).abs().max().item()
        graph = None
        if graphable:
            try:
                graph = graph_us(fn)
            except Exception as e:     # not capturable: the eager time stands
                torch.cuda.synchronize()
                print(f"   {kname:38s} not capturable: {type(e).__name__}: {str(e)[:100]}")
        us = graph if graph is not None else loop
        bw = nbytes / (us * 1e-6)
        row["kernels"][kname] = {"us": us, "method": "graph" if graph is not None else "loop",
                                 "loop_us": loop, "graph_us": graph, "GBps": bw / 1e9,
                                 "pct_copy": 100 * bw / copy_bw, "maxerr": err}
        print(f"   {kname:38s} {us:9.1f} us ({'graph' if graph is not None else 'loop '})  "
              f"{bw / 1e9:7.0f} GB/s  {100 * bw / copy_bw:5.1f}% of copy  eager loop {loop:8.1f} us  "
              f"maxerr {err:.3g}")
    return row


def sweep(copy_bw):
    """The Triton kernel at the goal shape over its constants (graph-timed)."""
    from layerzero.backends import _triton_paged_impl as T
    args = make(64, 4096, 1, False)
    nbytes = int(args[4].sum()) * HKV * 2 * D * 2
    fn = registry.get("triton.paged_attention").fn
    keep = {n: getattr(T, n) for n in ("_NUM_STAGES", "_TILE_BYTES", "_WAVES", "_NUM_WARPS")}
    rows = []
    print("== sweep at the goal shape (stages, tile bytes -> BLOCK_N, programs per SM, warps)")
    for stages, tile, waves, warps in itertools.product((3, 5, 6), (8192, 16384, 32768), (2, 4, 8, 16), (4, 8)):
        T._NUM_STAGES, T._TILE_BYTES, T._WAVES, T._NUM_WARPS = stages, tile, waves, warps
        T._plans.clear()
        T._split_launch.entries.clear()
        T._merge_launch.entries.clear()
        try:
            us = graph_us(lambda: fn(*args))
        except Exception as e:   # e.g. out of shared memory
            print(f"   stages {stages} tile {tile} waves {waves} warps {warps}: {type(e).__name__}")
            continue
        splits = next(iter(T._plans.values()))[2][1]
        pct = 100 * nbytes / (us * 1e-6) / copy_bw
        rows.append({"stages": stages, "tile_bytes": tile, "waves": waves, "warps": warps,
                     "splits": splits, "us": us, "pct_copy": pct})
        print(f"   stages {stages} tile {tile:5d} waves {waves:2d} warps {warps} (splits {splits:2d}): "
              f"{us:7.1f} us  {pct:5.1f}% of copy")
    for n, v in keep.items():
        setattr(T, n, v)
    T._plans.clear()
    T._split_launch.entries.clear()
    T._merge_launch.entries.clear()
    best = min(rows, key=lambda r: r["us"]) if rows else None
    print(f"   best: {best}")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--sweep", action="store_true", help="also sweep the Triton kernel's constants")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/paged_attention.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    copy_bw = G.copy_bandwidth("cuda")
    dev = torch.cuda.get_device_name()
    print(f"{dev}: copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + written); goal: triton.paged_attention "
          f">= 85% of it at the goal shape")
    res = {"device": dev, "torch": torch.__version__, "copy_GBps": copy_bw / 1e9, "shapes": []}
    try:
        import triton
        res["triton"] = triton.__version__
    except ImportError:
        pass
    with torch.no_grad():      # not inference_mode: FlashInfer's kernel would re-plan every call
        for shape in SHAPES:
            res["shapes"].append(run_shape(*shape, copy_bw))
        goal = res["shapes"][0]["kernels"].get("triton.paged_attention", {})
        if "pct_copy" in goal:
            print(f"goal: {goal['pct_copy']:.1f}% of copy bandwidth ({'met' if goal['pct_copy'] >= 85 else 'NOT met'})")
        if a.sweep:
            res["sweep"] = sweep(copy_bw)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
