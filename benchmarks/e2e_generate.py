"""Greedy generate() of the llama-shaped 1B model of e2e_transformers.py: transformers' sdpa vs
lz.patch(model), side by side in one run.

A prompt of --prompt tokens, --new-tokens new tokens (min = max, so every run decodes as many),
DynamicCache, bf16, random weights, batch 1, torch.inference_mode. Rounds alternate the variants
(switched in place on one model, order reversed every other round); each round warms the variant
with one generate() and times --iters of them (wall clock, synchronised). A variant's time is the
median of its rounds. Prints ms per generate() and per new token, the ratio t(layerzero)/t(sdpa),
whether the two variants produced the same tokens (bf16 kernels round differently, so greedy
tokens of a random-weight model may part after a few steps; fp32 identity is a test), and the
kernels LayerZero ran. Writes JSON (--json PATH).
--tiny: a tiny fp32 model on CPU (a smoke run for tests; no timing claims); tokens must match.

    PYTHONPATH=$PWD python3 benchmarks/e2e_generate.py --json $OUT/e2e_generate.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_transformers as E  # noqa: E402

import layerzero as lz  # noqa: E402

VARIANTS = ("sdpa", "layerzero")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    if args.tiny:
        shape, device, dtype = E.TINY, "cpu", torch.float32
        args.prompt, args.new_tokens, args.rounds, args.iters = 8, 4, 2, 1
    elif not torch.cuda.is_available():
        sys.exit("needs CUDA (or --tiny)")
    else:
        shape, device, dtype = E.SHAPES["1b"], "cuda", torch.bfloat16
    model = E.build(shape, device, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (1, args.prompt), device=device, generator=g)
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
               pad_token_id=0, eos_token_id=None)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def run():
        with torch.inference_mode():
            return model.generate(input_ids=ids, **gen)

    times, tokens = {v: [] for v in VARIANTS}, {}
    for r in range(args.rounds):
        for name in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            E.set_variant(model, name)
            run()
            sync()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                tokens[name] = run()
            sync()
            times[name].append((time.perf_counter() - t0) / args.iters * 1e3)
    E.set_variant(model, "layerzero")
    lz.reset_metrics()
    run()
    kernels = {op: sorted(ks) for op, ks in lz.metrics()["calls"].items()}
    lz.unpatch(model)
    med = {v: statistics.median(t) for v, t in times.items()}
    a, b = tokens["sdpa"], tokens["layerzero"]
    differ = (a != b).nonzero()
    result = {
        "benchmark": "e2e_generate", "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "dtype": str(dtype)[6:], "prompt": args.prompt, "new_tokens": args.new_tokens,
        "rounds_ms": {v: [round(x, 2) for x in t] for v, t in times.items()},
        "median_ms": {v: round(m, 2) for v, m in med.items()},
        "per_new_token_ms": {v: round(m / args.new_tokens, 3) for v, m in med.items()},
        "ratio": round(med["layerzero"] / med["sdpa"], 3),
        "same_tokens": bool(torch.equal(a, b)),
        "first_differing_position": int(differ[0, 1]) if len(differ) else None,
        "kernels": kernels,
    }
    print(f"generate on {result['device']}, torch {result['torch']}, transformers {result['transformers']}: "
          f"{args.prompt}-token prompt + {args.new_tokens} new tokens, {result['dtype']}")
    for v in VARIANTS:
        print(f"  {v:10s} {med[v]:8.1f} ms  ({result['per_new_token_ms'][v]:.3f} ms a new token)  "
              f"rounds: {' '.join(f'{x:.1f}' for x in times[v])}")
    print(f"  t(layerzero) / t(sdpa) = {result['ratio']:.3f}; same tokens: {result['same_tokens']}"
          f" (first differing position {result['first_differing_position']}); kernels: {kernels}")
    if args.tiny and not result["same_tokens"]:
        raise AssertionError("fp32 greedy tokens differ between sdpa and layerzero")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
