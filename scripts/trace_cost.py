"""What tracing costs torch.compile on a patched model, against the unpatched one: the 1B llama
shape of benchmarks/e2e_transformers.py (random weights, bf16, CPU is enough: no kernel runs that
matters) under transformers' static-cache generate() with a CompileConfig on the eager backend
(dynamo's tracing alone, as in the warm-up of transformers' auto-compile and of lz.generate's
compiled step): dynamo's seconds by phase and the bytecode instructions it traced, by file (the
logging that counts them about doubles the seconds: --no-count for the time alone). Each variant
in its own process.

    PYTHONPATH=$PWD python3 scripts/trace_cost.py [--layers 16] [--variants plain lz]
"""
import argparse
import collections
import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def child(variant: str, layers: int, count: bool) -> dict:
    import logging

    import torch
    import torch._logging

    sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))
    import e2e_transformers as E
    from torch._dynamo.utils import compile_times
    from transformers import CompileConfig

    import layerzero as lz

    counts = collections.Counter()
    where = [None]

    class Count(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            m = re.search(r"TRACE starts_line (\S+):\d+ in", msg)
            if m:
                f = m.group(1)
                where[0] = f.split("site-packages/")[-1].split(os.path.dirname(HERE) + "/")[-1]
            elif msg.startswith("TRACE ") and where[0]:
                counts[where[0]] += 1

    if count:
        torch._logging.set_logs(trace_bytecode=True, trace_source=True)
        for name in ("torch._dynamo", "torch.__trace_bytecode", "torch.__trace_source"):
            lg = logging.getLogger(name)
            lg.addHandler(Count())
            lg.propagate = False
    shape = dict(E.SHAPES["1b"], num_hidden_layers=layers)
    model = E.build(shape, "cpu", torch.bfloat16)
    if variant == "lz":
        lz.patch(model)
    cc = CompileConfig(backend="eager", mode=None, fullgraph=True)
    cc._compile_all_devices = True          # transformers compiles on CUDA only by default
    model.generation_config.compile_config = cc
    ids = torch.randint(3, 1000, (1, 8))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                       cache_implementation="static", pad_token_id=0)
    phases = {}
    for line in compile_times(repr="str", aggregate=True).splitlines():
        name, _, value = line.partition(",")
        if name in ("_compile.compile_inner", "bytecode_tracing", "build_guards"):
            phases[name] = float(value)
    return {"variant": variant, "layers": layers, "seconds": phases,
            "instructions": sum(counts.values()), "by_file": dict(counts.most_common(12))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--variants", nargs="+", default=["plain", "lz"], choices=["plain", "lz"])
    ap.add_argument("--no-count", action="store_true",
                    help="time only: without the per-instruction logging, which slows tracing about 2x")
    ap.add_argument("--json", default="")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(child(args.one, args.layers, not args.no_count)))
        return
    rows = []
    for v in args.variants:
        out = subprocess.run([sys.executable, __file__, "--one", v, "--layers", str(args.layers)]
                             + (["--no-count"] if args.no_count else []),
                             capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        print(f"{v:6s} {row['layers']} layers: {row['instructions']:7d} instructions traced, "
              f"bytecode tracing {row['seconds'].get('bytecode_tracing', 0):.2f} s", flush=True)
        for f, n in list(row["by_file"].items())[:8]:
            print(f"         {n:7d}  {f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
