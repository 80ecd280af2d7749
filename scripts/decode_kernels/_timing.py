"""Timing helpers of the decode-kernel scripts here: microseconds per call inside one CUDA graph,
and (benchmarks/e2e_generate.py's) the device's copy bandwidth."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
from e2e_generate import copy_bandwidth  # noqa: E402

__all__ = ["copy_bandwidth", "graph_us"]


def graph_us(calls, reps_min=48, replays=10):
    """Microseconds per call of the callables in `calls`, cycled inside one CUDA graph."""
    n = max(reps_min, len(calls))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3):
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n):
            calls[i % len(calls)]()
    g.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(replays):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        best = min(best, e0.elapsed_time(e1) * 1e3 / n)
    del g
    return best
