"""Where lz.generate's time goes on the 1B llama shape (bf16, CUDA), variant by variant, each
in this one process (dynamo reset and the model's loops dropped between variants):

  ttft      time to first token (generate(max_new_tokens=1)), the prefill graphed (default) and
            eager, and a cProfile of the eager one (host cost by function)
  step      128 + 128 greedy tokens: first call (compile + capture), tok/s, ms per graph replay,
            kernel time per step by kernel (torch.profiler over replays)
Variants of the step (--steps): cdt (inductor's coordinate-descent tuning: generation's
COMPILE_OPTIONS, the default at batch 1), plain (no inductor options: COMPILE_OPTIONS_BATCHED,
the default for larger batches), cdt-opaque (cdt with rms_norm and swiglu locked to LayerZero's
Triton kernels, custom ops inductor cannot fuse into the matrix-vector reductions that follow),
cdt-opaque-rope (rope too; since the "matvec" flag, cdt does this by itself), cdt-pdl / plain-pdl
(inductor's programmatic dependent launch on top: a kernel starts while the one before finishes),
cdt-separate / plain-separate (q/k/v and gate/up as separate products: generation.FUSE_SIBLINGS off),
plain-autotune / cdt-autotune (inductor's GEMM autotuning: its Triton matmul templates against cuBLAS
for each product, e.g. the batch-8 step's skinny products). The batch-1 loop's replay profile is also
in the output. --warmup-profile: each variant's first call (compile, tuning, capture) under cProfile,
by cumulative time in dynamo, inductor, Triton and benchmarking.

    PYTHONPATH=$PWD python3 scripts/generate_gpu_explore.py --batch 1 8 --steps cdt plain --json $OUT/x.json
"""
import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import e2e_transformers as E  # noqa: E402

import layerzero as lz  # noqa: E402
from layerzero import generation  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, nargs="+", default=[1])
ap.add_argument("--steps", nargs="*", default=["cdt"], choices=["cdt", "plain", "cdt-opaque", "cdt-opaque-rope", "cdt-pdl", "plain-pdl",
                                                         "cdt-separate", "plain-separate", "plain-autotune",
                                                         "cdt-autotune"])
ap.add_argument("--ttft", action="store_true")
ap.add_argument("--warmup-profile", action="store_true",
                help="run each variant's first call (compile, tuning, capture) under cProfile and print where it went")
ap.add_argument("--rows", type=int, default=14)
ap.add_argument("--json", default="")
args = ap.parse_args()

import transformers  # noqa: E402

out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
       "transformers": transformers.__version__, "runs": []}
print(out, flush=True)
shape = E.SHAPES["1b"]
model = E.build(shape, "cuda", torch.bfloat16)
lz.patch(model)
CDT = {"options": {"coordinate_descent_tuning": True}}
_prefill_graphed = generation._Loop._prefill_graphed


def save():
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


def fresh():
    torch._dynamo.reset()
    generation._LOOPS.pop(model, None)
    lz.unpatch(model)          # separate projections again (lz.generate fuses them once per patch)
    lz.patch(model)
    torch.cuda.synchronize()


def gen(ids, n, **extra):
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None,
              attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        return lz.generate(model, ids, **kw, **extra)


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    r = fn()
    torch.cuda.synchronize()
    return r, time.perf_counter() - t0


def kernels(loop, steps=10):
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            loop.graph.replay()
        torch.cuda.synchronize()
    ev = list(prof.key_averages())
    total = sum(e.device_time_total for e in ev) / steps
    count = sum(e.count for e in ev) / steps
    ev.sort(key=lambda e: -e.device_time_total)
    top = [(round(e.device_time_total / steps, 1), e.count / steps, e.key[:100]) for e in ev[: args.rows]]
    return round(total / 1e3, 4), count, top


for b in args.batch:
    g = torch.Generator(device="cuda").manual_seed(b)
    ids = torch.randint(1, shape["vocab_size"], (b, 128), device="cuda", generator=g)
    if args.ttft:
        fresh()
        gen(ids, 1)
        row = {"what": "ttft", "batch": b}
        for mode in ("graphed", "eager"):
            if mode == "eager":
                generation._Loop._prefill_graphed = lambda self, ids: False
            gen(ids, 1)
            t = [timed(lambda: gen(ids, 1))[1] for _ in range(10)]
            row[mode + "_ms"] = round(statistics.median(t) * 1e3, 3)
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(5):
            gen(ids, 1)
        torch.cuda.synchronize()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
        row["eager_profile"] = s.getvalue()[-6000:]
        generation._Loop._prefill_graphed = _prefill_graphed
        print(row["what"], b, row["graphed_ms"], row["eager_ms"], flush=True)
        print(row["eager_profile"][:3000], flush=True)
        out["runs"].append(row)
        save()
    for variant in args.steps:
        fresh()
        for opts in (generation.COMPILE_OPTIONS, generation.COMPILE_OPTIONS_BATCHED):
            opts.clear()
            if variant.startswith("cdt"):
                opts.update(CDT)
            if variant.endswith("autotune"):            # inductor's GEMM autotuning (Triton templates vs cuBLAS)
                opts.setdefault("options", {})
                opts["options"] = {**opts["options"], "max_autotune_gemm": True,
                                   "max_autotune_gemm_backends": "TRITON,ATEN"}
            if variant.endswith("pdl"):                 # programmatic dependent launch (sm90+)
                opts.setdefault("options", {})
                opts["options"] = {**opts["options"], "triton.enable_pdl": True}
        generation.FUSE_SIBLINGS = not variant.endswith("separate")
        for op in ("rms_norm", "swiglu", "rope"):
            lz.unlock(op)
        if variant.startswith("cdt-opaque"):       # LayerZero's Triton kernels: opaque to inductor
            lz.lock("rms_norm", "triton.rms_norm")
            lz.lock("swiglu", "triton.swiglu")
            if variant.endswith("rope"):
                lz.lock("rope", "triton.rope")
        lz.reset_metrics()
        try:
            if args.warmup_profile:
                pr = cProfile.Profile()
                pr.enable()
            _, first = timed(lambda: gen(ids, 128))
            if args.warmup_profile:
                pr.disable()
                text = io.StringIO()
                stats = pstats.Stats(pr, stream=text)
                stats.sort_stats("cumulative").print_stats(
                    "inductor|_dynamo|triton|benchmark|layerzero|generation", 60)
                stats.sort_stats("tottime").print_stats(25)     # where the main process waits
                warm_profile = text.getvalue()
                print(warm_profile, flush=True)
            times = [timed(lambda: gen(ids, 128))[1] for _ in range(5)]
            _, ttft = timed(lambda: gen(ids, 1))
            ttft = statistics.median(timed(lambda: gen(ids, 1))[1] for _ in range(5))
            gen(ids, 128)
            loop = next(lp for k, lp in generation._LOOPS[model].items() if lp.graph not in (None, False))
            def rewind():  # back to just after a prefill: room for 127 steps
                with torch.no_grad():
                    loop.prefill(ids, torch.ones_like(ids), 128, b, False, False, True)

            row = {"what": "step", "variant": variant, "batch": b, "first_call_s": round(first, 2),
                   **({"warmup_profile": warm_profile} if args.warmup_profile else {}),
                   "tok_per_s": round(b * 128 / statistics.median(times), 1),
                   "generate_ms": round(statistics.median(times) * 1e3, 2), "ttft_ms": round(ttft * 1e3, 2)}
            print(row, flush=True)
            rewind()
            n = 100
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                loop.graph.replay()
            torch.cuda.synchronize()
            replay = (time.perf_counter() - t0) / n
            rewind()
            ktime, kcount, top = kernels(loop)
            row.update({"replay_ms": round(replay * 1e3, 4), "kernel_ms": ktime, "kernels": kcount, "top": top,
                   "fallbacks": lz.metrics()["fallbacks"],
                   "calls": {op: sorted(ks) for op, ks in lz.metrics()["calls"].items()}})
        except Exception:  # noqa: BLE001 - report and go on
            import traceback
            row = {"what": "step", "variant": variant, "batch": b, "error": traceback.format_exc()[-3000:]}
        print({k: v for k, v in row.items() if k != "top"}, flush=True)
        for t in row.get("top", []):
            print("   ", t, flush=True)
        out["runs"].append(row)
        save()
