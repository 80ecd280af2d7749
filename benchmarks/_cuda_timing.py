"""Timing helpers shared by the GPU-only micro-benchmarks (run on the GPU host)."""
from __future__ import annotations

import statistics
import time

import torch


def cuda_time(fns: dict, iters: int = 20, trials: int = 7) -> dict:
    """name -> median microseconds of GPU time per call (CUDA events around `iters` calls),
    over `trials` interleaved rounds in rotated order, after 3 warm-up calls each."""
    res = {k: [] for k in fns}
    for f in fns.values():
        for _ in range(3):
            f()
    torch.cuda.synchronize()
    names = list(fns)
    for t in range(trials):
        for k in names[t % len(names):] + names[:t % len(names)]:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(iters):
                fns[k]()
            e1.record()
            e1.synchronize()
            res[k].append(e0.elapsed_time(e1) / iters * 1e3)
    return {k: statistics.median(v) for k, v in res.items()}


def host_per_call(fn, n: int = 2000) -> float:
    """Wall microseconds per call of `n` back-to-back calls, synchronised at the end (host-bound
    calls: the host's cost per call)."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def show(title: str, r: dict, unit: str = "us") -> None:
    print(f"== {title}")
    for k, v in r.items():
        print(f"   {k:40s} {v:10.1f} {unit}")
