"""Where a captured lz.generate decode step spends its time (1B llama shape, bf16): kernel time
per step by kernel (torch.profiler over graph replays) against the wall time of a replay.
--mode / --cdt: torch.compile mode and inductor's coordinate_descent_tuning for the step
(without --cdt the step compiles with neither, whatever generation.COMPILE_OPTIONS says).

    PYTHONPATH=$PWD python3 scripts/generate_gpu_profile.py --batch 1
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import e2e_transformers as E  # noqa: E402

import layerzero as lz  # noqa: E402
from layerzero import generation  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--mode", default=None)
ap.add_argument("--cdt", action="store_true")
ap.add_argument("--rows", type=int, default=22)
args = ap.parse_args()
generation.COMPILE_OPTIONS.clear()
if args.mode:
    generation.COMPILE_OPTIONS["mode"] = args.mode
if args.cdt:
    generation.COMPILE_OPTIONS["options"] = {"coordinate_descent_tuning": True}
shape = E.SHAPES["1b"]
model = E.build(shape, "cuda", torch.bfloat16)
ids = torch.randint(0, shape["vocab_size"], (args.batch, 128), device="cuda")
kw = dict(max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0, eos_token_id=None)
t0 = time.perf_counter()
lz.generate(model, ids, **kw)
torch.cuda.synchronize()
print(f"first call {time.perf_counter() - t0:.1f} s", flush=True)
for _ in range(2):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    lz.generate(model, ids, **kw)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
print(f"generate: {dt * 1e3:.1f} ms, {args.batch * 128 / dt:.1f} tok/s", flush=True)
loop = next(iter(generation._LOOPS[model].values()))
assert loop.graph not in (None, False), loop.graph
n = 50


def rewind():  # back to just after a prefill: the graph's buffers, room for 127 steps
    with torch.no_grad():
        loop.prefill(ids, None, False, False)


rewind()
torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(n):
    loop.graph.replay()
torch.cuda.synchronize()
step = (time.perf_counter() - t0) / n
print(f"replay: {step * 1e3:.3f} ms a step ({args.batch / step:.0f} tok/s)", flush=True)
from torch.profiler import ProfilerActivity, profile  # noqa: E402
rewind()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(10):
        loop.graph.replay()
    torch.cuda.synchronize()
ev = [e for e in prof.key_averages()]
total = sum(e.device_time_total for e in ev) / 10
count = sum(e.count for e in ev) / 10
print(f"kernel time {total / 1e3:.3f} ms a step over {count:.0f} kernels")
ev.sort(key=lambda e: -e.device_time_total)
for e in ev[: args.rows]:
    print(f"  {e.device_time_total / 10:8.1f} us  x{e.count / 10:5.1f}  {e.key[:110]}")
