"""Dispatch overhead: t(lz.attention) / t(F.scaled_dot_product_attention) on one CPU thread.

The call is (1, 2, 4, 8) float32 causal, with the decision already cached. Goal: <= 1.3.
Timings interleave the two functions over several rounds and take each one's median, so drift
on a busy machine hits both alike. Prints the ratio and writes JSON (--json PATH).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import layerzero as lz


def per_call_us(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=5000, help="calls per round")
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--json", default="benchmarks/overhead.json", help="where to write results")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=g) for _ in range(3))
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    lz_call = lambda: lz.attention(q, k, v, is_causal=True)  # noqa: E731
    torch.testing.assert_close(lz_call(), sdpa())
    kernel = lz.which("attention", q, k, v, is_causal=True)
    for f in (sdpa, lz_call):
        per_call_us(f, args.calls // 4)  # warm-up
    t_sdpa, t_lz = [], []
    for _ in range(args.rounds):
        t_sdpa.append(per_call_us(sdpa, args.calls))
        t_lz.append(per_call_us(lz_call, args.calls))
    a, b = statistics.median(t_sdpa), statistics.median(t_lz)
    result = {"benchmark": "overhead", "shape": [1, 2, 4, 8], "dtype": "float32", "causal": True,
              "kernel": kernel, "sdpa_us": round(a, 3), "lz_us": round(b, 3),
              "ratio": round(b / a, 3), "goal": 1.3, "torch": torch.__version__,
              "python": platform.python_version(), "machine": platform.machine(), "threads": 1}
    print(f"F.scaled_dot_product_attention: {a:.2f} us/call")
    print(f"lz.attention ({kernel}):    {b:.2f} us/call")
    print(f"ratio t(lz)/t(sdpa) = {b / a:.3f}  (goal <= 1.3)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
