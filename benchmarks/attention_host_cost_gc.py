"""Is lz.attention's extra host time on tiny calls inside the attention benchmark's process (~700k
Python objects after FA4/FlashInfer/flex load) garbage collection? Times the SDPA baseline and
lz.attention interleaved with gc on, after gc.freeze(), and with gc disabled.

    PYTHONPATH=$PWD python3 benchmarks/attention_host_cost_gc.py   # on the GPU host (~1 min)
"""
import sys, os, gc, time, statistics, argparse
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import torch, torch.nn.functional as F
import layerzero as lz
import attention as A
args = argparse.Namespace(dtype=torch.bfloat16, device="cuda", skip=set(), max_compile_s=75.0)
spent = {}
for c in A.CALLS:
    if c[0] in ("prefill 1x8k gqa causal", "sinks+window 1x4k d64", "decode window 32x8k", "padding mask 8x1k"):
        A.bench_call(*c, args, spent)     # loads FA4 / flex / FlashInfer as the benchmark does
print("tracked objects:", len(gc.get_objects()), "gc counts", gc.get_count(), "thresholds", gc.get_threshold())
def loop(fn, n=200):
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(n): fn()
    e1.record(); e1.synchronize(); return e0.elapsed_time(e1) / n * 1e3
for name in ("prefill 1x512 gqa causal", "decode 1x1k gqa", "prefill 16x512 d64"):
    c = [x for x in A.CALLS if x[0] == name][0]
    q, k, v, kw = A.make(c[2], c[3], torch.bfloat16, "cuda")
    base, _ = A.sdpa_baseline(q, k, v, kw)
    fns = {"sdpa": base, "lz": lambda: lz.attention(q, k, v, **kw)}
    for f in fns.values():
        for _ in range(10): f()
    for mode in ("gc on", "gc frozen", "gc disabled"):
        if mode == "gc frozen": gc.collect(); gc.freeze()
        if mode == "gc disabled": gc.disable()
        res = {n: [] for n in fns}
        for _ in range(15):
            for n, f in fns.items(): res[n].append(loop(f))
        med = {n: statistics.median(v) for n, v in res.items()}
        print(f"{name:28s} {mode:12s} sdpa {med['sdpa']:6.2f} us  lz {med['lz']:6.2f} us  ratio sdpa/lz {med['sdpa']/med['lz']:.3f}")
    gc.enable(); gc.unfreeze()
