"""Host cost of how F.scaled_dot_product_attention is called, for tiny host-bound calls under
no_grad on the GPU host: keyword arguments only, positional defaults, a functools.partial with
enable_gqa (torch.sdpa's plain path), and lz.attention; then a cProfile of lz.attention.
Wall time per call of 2000 calls, median of 9 interleaved rounds, GC off.

    PYTHONPATH=$PWD python3 benchmarks/attention_sdpa_args.py
"""
import cProfile
import functools
import gc
import os
import pstats
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import layerzero as lz  # noqa: E402
from layerzero import dispatch  # noqa: E402
from _cuda_timing import host_per_call  # noqa: E402

DEV, BF = "cuda", torch.bfloat16
gqa = functools.partial(F.scaled_dot_product_attention, enable_gqa=True)

for name, (b, hq, hk, sq, sk, d), causal in (("1x512 gqa causal", (1, 32, 8, 512, 512, 128), True),
                                            ("decode 1x1k gqa", (1, 32, 8, 1, 1024, 128), False)):
    q = torch.randn(b, hq, sq, d, device=DEV, dtype=BF)
    k, v = torch.randn(b, hk, sk, d, device=DEV, dtype=BF), torch.randn(b, hk, sk, d, device=DEV, dtype=BF)
    with torch.no_grad():
        lz.attention(q, k, v, is_causal=causal)
        print(name, "lz picks", lz.which("attention", q, k, v, is_causal=causal), "grad", torch.is_grad_enabled())
        fns = {"F.sdpa kw": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True),
               "F.sdpa pos": lambda: F.scaled_dot_product_attention(q, k, v, None, 0.0, causal, enable_gqa=True),
               "partial": lambda: gqa(q, k, v, None, 0.0, causal),
               "lz.attention": lambda: lz.attention(q, k, v, is_causal=causal)}
        for f in fns.values():
            for _ in range(50):
                f()
        gc.collect()
        gc.disable()
        res = {kk: [] for kk in fns}
        for _ in range(9):
            for kk, f in fns.items():
                res[kk].append(host_per_call(f))
        gc.enable()
        for kk, vv in res.items():
            print(f"   {kk:14s} {statistics.median(vv):7.2f} us   (min {min(vv):.2f})")
        key = next(kk for kk in dispatch.fast if kk[0] == "attention" and kk[1] == q.shape and kk[2] == k.shape
                   and kk[12] is False)
        e = dispatch.fast[key]
        print("   entry plain:", e.plain, "kernel", e.kernel_id, "grad_ok", e.grad_ok)
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(5000):
            lz.attention(q, k, v, is_causal=causal)
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(6)
