"""Where a torch.compile'd forward spends its GPU time, kernel by kernel: the prefill of the
llama shapes of `benchmarks/e2e_transformers.py` or the Flux-shaped step of
`benchmarks/e2e_diffusers.py`, one variant per process (LayerZero's module swaps are process-wide).

  --model 1b | 8b8 | flux
  --variant base (torch.compile alone) | layerzero (lz.patch, then compile) | layerzero-fused
            (q/k/v and gate/up as one product each; llama shapes only)

Builds the model as the benchmark does (same seeds), compiles it (inductor, default mode), runs it
--warmup times under inference_mode, then profiles --iters forwards (torch.profiler, CUDA
activity) and prints: ms a forward (CUDA events, median), kernel ms a forward, kernels a forward,
the top --rows kernels by time (us a forward, calls a forward, name), the time by kind (GEMM,
attention, Triton, other) and, for the llama shapes, TFLOP/s of the forward's products and
attention. Writes JSON with --json.

    PYTHONPATH=/tmp/site:$PWD python3 scripts/compile_profile.py --model 1b --variant base --json $OUT/p.json
"""
import argparse
import json
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))

import e2e_transformers as E  # noqa: E402  (its shapes, build, prefill and time_ms)

import layerzero as lz  # noqa: E402


def kind(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("sdpa", "flash", "fmha", "attention", "attn")) and not n.startswith("triton_"):
        return "attention"
    if any(s in n for s in ("gemm", "nvjet", "cutlass", "splitk", "sm90_xmma", "cublas")):
        return "gemm"
    if n.startswith("triton_") or "triton" in n:
        return "triton"
    return "other"


def llama_flop(shape: dict) -> float:
    """FLOP of one prefill: the products (last position's logits only) and causal attention."""
    h, n, L = shape["hidden_size"], shape["tokens"], shape["num_hidden_layers"]
    d = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * d
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * shape["intermediate_size"]
    products = 2 * n * per_layer * L + 2 * h * shape["vocab_size"]
    attention = 4 * n * n * d * shape["num_attention_heads"] / 2 * L
    return products + attention


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["1b", "8b8", "flux"], default="1b")
    ap.add_argument("--variant", choices=["base", "layerzero", "layerzero-fused"], default="base")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    if args.model == "flux":
        import e2e_diffusers as D

        if args.variant == "layerzero-fused":
            raise ValueError("--variant layerzero-fused: llama shapes only")
        model, inputs = D.build(D.FULL, "cuda", torch.bfloat16)
        if args.variant == "layerzero":
            lz.patch(model)
        compiled = torch.compile(model)

        def step():
            return compiled(**inputs, return_dict=False)[0]
        flop = None
    else:
        shape = E.SHAPES[args.model]
        model = E.build(shape, "cuda", torch.bfloat16)
        ids = torch.randint(0, shape["vocab_size"], (1, shape["tokens"]), device="cuda",
                            generator=torch.Generator("cuda").manual_seed(1))
        if args.variant != "base":
            E.set_variant(model, args.variant)
        compiled = torch.compile(model)

        def step():
            return E.prefill(compiled, ids)
        flop = llama_flop(shape)

    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        ms = E.time_ms(step, args.iters, cuda=True)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.iters):
                step()
            torch.cuda.synchronize()
    n = args.iters
    ev = [e for e in prof.key_averages() if e.device_time_total > 0]
    ev.sort(key=lambda e: -e.device_time_total)
    total_us = sum(e.device_time_total for e in ev) / n
    by_kind: dict = {}
    for e in ev:
        k = kind(e.key)
        by_kind[k] = by_kind.get(k, 0.0) + e.device_time_total / n
    res = {"model": args.model, "variant": args.variant, "device": torch.cuda.get_device_name(),
           "torch": torch.__version__, "ms": round(statistics.median(ms), 3),
           "kernel_ms": round(total_us / 1e3, 3), "kernels": sum(e.count for e in ev) / n,
           "by_kind_us": {k: round(v, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
           "top": [(round(e.device_time_total / n, 1), e.count / n, e.key[:140]) for e in ev[: args.rows]],
           "lz_calls": {op: sorted(k) for op, k in lz.metrics()["calls"].items()}}
    if flop:
        res["tflop"] = round(flop / 1e12, 3)
        res["tflop_per_s"] = round(flop / (res["ms"] * 1e-3) / 1e12, 1)
    print(json.dumps({k: v for k, v in res.items() if k != "top"}), flush=True)
    for us, count, name in res["top"]:
        print(f"  {us:9.1f} us  x{count:5.1f}  [{kind(name)}] {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
