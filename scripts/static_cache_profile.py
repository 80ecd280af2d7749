"""Kernel time of transformers' static-cache decode (generate(cache_implementation="static"),
auto-compiled under no_grad) on the 1B llama shape, bf16: transformers' sdpa against lz.patch,
each in a process of its own (--one). Prints per variant the wall time per new token and the CUDA
kernel time per new token by kernel (torch.profiler over one 32-token generate after warm-up).

    PYTHONPATH=$PWD python3 scripts/static_cache_profile.py --batch 8
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--rows", type=int, default=14)
ap.add_argument("--one", choices=["sdpa", "lz"])
args = ap.parse_args()

if args.one is None:
    for v in ("sdpa", "lz"):
        r = subprocess.run([sys.executable, __file__, "--one", v, "--batch", str(args.batch), "--rows", str(args.rows)],
                           capture_output=True, text=True)
        print(r.stdout[-6000:], r.stderr[-1500:] if r.returncode else "", flush=True)
    sys.exit(0)

import e2e_transformers as E  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import layerzero as lz  # noqa: E402

model = E.build(E.SHAPES["1b"], "cuda", torch.bfloat16)
if args.one == "lz":
    lz.patch(model)
ids = torch.randint(1, 128256, (args.batch, 128), device="cuda")
new = 32
kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None,
          attention_mask=torch.ones_like(ids), cache_implementation="static")
with torch.no_grad():
    for _ in range(3):
        model.generate(ids, **kw)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, **kw)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.generate(ids, **kw)
        torch.cuda.synchronize()
ev = list(prof.key_averages())
ev.sort(key=lambda e: -e.device_time_total)
total = sum(e.device_time_total for e in ev) / new
print(json.dumps({"variant": args.one, "batch": args.batch, "wall_ms_per_token": round(wall * 1e3 / new, 3),
                  "kernel_ms_per_token": round(total / 1e3, 3),
                  "kernels_per_token": round(sum(e.count for e in ev) / new, 1)}))
for e in ev[: args.rows]:
    print(f"  {e.device_time_total / new:8.1f} us  x{e.count / new:6.1f}  {e.key[:100]}")
