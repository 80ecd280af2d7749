"""Greedy generate() with transformers' static cache (auto-compiled under no_grad) of the
llama-shaped 1B model of e2e_transformers.py: transformers' sdpa vs lz.patch(model).

Each variant runs in its own process, as it would run alone (LayerZero's patching and dynamo's
caches stay out of the other's way). Per variant: one generate() compiles (its wall time is
reported as the compile), then --iters generate() calls are timed (wall clock, synchronised);
tokens/s of the new tokens, dynamo's compiled frames and graph breaks, and LayerZero's kernels.
Prints the ratio tok/s(layerzero) / tok/s(sdpa) when both ran. Writes JSON (--json PATH).
--tiny: a tiny fp32 model on CPU with the eager backend (a smoke run; no timing claims).

    PYTHONPATH=$PWD python3 benchmarks/static_generate.py --json $OUT/static_generate.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("sdpa", "layerzero")


def one(variant: str, args) -> dict:
    import torch._dynamo

    import e2e_transformers as E
    import layerzero as lz

    if args.tiny:
        shape, device, dtype = E.TINY, "cpu", torch.float32
    else:
        shape, device, dtype = E.SHAPES["1b"], "cuda", torch.bfloat16
    model = E.build(shape, device, dtype)
    E.set_variant(model, variant)
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (1, args.prompt), device=device, generator=g)
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
               pad_token_id=0, eos_token_id=None, cache_implementation="static")
    if args.tiny:  # auto-compile needs CUDA unless told otherwise; inductor is too slow here
        from transformers import CompileConfig
        gen["compile_config"] = CompileConfig(backend="eager")
        gen["compile_config"]._compile_all_devices = True

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def run():
        with torch.no_grad():  # transformers' auto-compile engages under no_grad, not inference_mode
            return model.generate(input_ids=ids, **gen)

    torch._dynamo.utils.counters.clear()
    t0 = time.perf_counter()
    run()
    sync()
    compile_s = time.perf_counter() - t0
    lz.reset_metrics()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        run()
    sync()
    per = (time.perf_counter() - t0) / args.iters
    c = torch._dynamo.utils.counters
    return {"variant": variant, "compile_and_first_s": round(compile_s, 2),
            "ms_per_generate": round(per * 1e3, 2), "tok_per_s": round(args.new_tokens / per, 1),
            "unique_graphs": c["stats"].get("unique_graphs", 0),
            "graph_breaks": sum(c["graph_break"].values()),
            "kernels": {op: sorted(ks) for op, ks in lz.metrics()["calls"].items()}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json", default="")
    ap.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args(argv)
    if args.tiny:
        args.prompt, args.new_tokens, args.iters = 8, 4, 1
    elif not torch.cuda.is_available():
        sys.exit("needs CUDA (or --tiny)")
    if args.one:
        print(json.dumps(one(args.one, args)))
        return {}
    rows = {}
    base = [sys.executable, os.path.abspath(__file__), "--prompt", str(args.prompt),
            "--new-tokens", str(args.new_tokens), "--iters", str(args.iters)] + (["--tiny"] if args.tiny else [])
    for v in args.variants:
        p = subprocess.run(base + ["--one", v], capture_output=True, text=True)
        if p.returncode:
            sys.exit(f"{v} failed:\n{p.stderr[-3000:]}")
        rows[v] = json.loads(p.stdout.strip().splitlines()[-1])
        r = rows[v]
        print(f"  {v:<10} {r['tok_per_s']:8.1f} tok/s  ({r['ms_per_generate']} ms a generate(); first "
              f"call with compile {r['compile_and_first_s']} s; {r['unique_graphs']} compiled frames, "
              f"{r['graph_breaks']} graph breaks) {r['kernels'] or ''}", flush=True)
    out = {"device": "cpu" if args.tiny else torch.cuda.get_device_name(), "torch": torch.__version__,
           "prompt": args.prompt, "new_tokens": args.new_tokens, "variants": rows}
    if len(rows) == 2:
        out["ratio_tok_s"] = round(rows["layerzero"]["tok_per_s"] / rows["sdpa"]["tok_per_s"], 3)
        print(f"  tok/s(layerzero) / tok/s(sdpa) = {out['ratio_tok_s']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
