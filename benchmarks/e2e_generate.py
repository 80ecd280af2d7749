"""Greedy generate() of the llama-shaped 1B model of e2e_transformers.py: transformers' sdpa and
LayerZero, with transformers' default DynamicCache and its static cache, and lz.generate.

bf16, random weights, CUDA. Variants, each in a process of its own (a process holding patched and
unpatched models shares LayerZero's module-level swaps, and dynamo's caches would carry over):
  sdpa             transformers' sdpa, DynamicCache, model.generate
  sdpa-static      sdpa, cache_implementation="static" (transformers compiles the decode step:
                   torch.compile, mode "reduce-overhead", on CUDA under torch.no_grad, not under
                   torch.inference_mode; so every variant runs under torch.no_grad)
  lz-patch         lz.patch(model), DynamicCache
  lz-patch-static  lz.patch(model) + cache_implementation="static"
  lz-generate      lz.patch(model), then lz.generate(model, input_ids, **same kwargs); "not
                   available" (no process started) while layerzero has no lz.generate
Configs: batch --batch (1 8) x prompt/new tokens --shapes (128x128 2048x256). Greedy, min_new_tokens
= max_new_tokens (every run decodes as many tokens), eos_token_id=None, pad_token_id=0, an
all-ones attention_mask, prompt ids drawn from a generator seeded per config (the same prompts for
every variant). A child runs its variant's configs one after another on one model; before each it
resets dynamo (torch._dynamo.reset(): compiles from scratch, as a fresh process would) and drops
the static-cache length transformers keeps from earlier calls (so a 128-token config doesn't reuse
a 2304-long cache).
Per variant and config: the first generate() is the warm-up; its wall time (compile / CUDA-graph
capture included) is `warmup_s` (the first config of a process also pays the process's first
cuBLAS/kernel loads; inductor's on-disk caches make a second run's compile shorter). Then --iters
generate() calls, each timed alone (torch.cuda.synchronize() before and after), median: tok/s =
batch * new / seconds (prefill included), ms per new token = seconds / new, and the decode step
(seconds - TTFT) / (new - 1). TTFT: a generate() with max_new_tokens = min_new_tokens = 1, one
untimed then the median of --iters. Also dynamo's compiled frames (counters["stats"]
["unique_graphs"]) and graph breaks over the config's calls, and the kernels LayerZero ran
(lz.metrics()["calls"], reset before the warm-up: compiled steps don't count calls at replay, so
the kernels picked while tracing are in it).
Roofline: one decode step reads every weight once, so with the device's copy bandwidth BW
(measured in this run, in the parent process before the children: dst.copy_(src) of a 1 GiB
tensor timed with CUDA events, (bytes read + written) / time, best of 10) and the model's weight
bytes a step reads W (numel * element_size over model.parameters(), tied weights once, less the
input embedding table, of which a step reads B rows; measured in the children; 2.47 GB for the 1B,
issue 13's figure), roofline tok/s for batch B = B * BW / W, and % of roofline = tok/s / roofline.
W counts no K/V cache reads (`kv_bytes_last_step` in the JSON: 0.6 GB at 2048 + 256 tokens, batch 8), and tok/s
includes the prefill (`decode_step_ms` leaves it out).
Prints a line per variant and config, then tok/s / tok/s(sdpa-static) side by side per config, and
whether each variant's tokens equal sdpa's (bf16 kernels round differently, so greedy tokens of a
random-weight model may part after some steps; fp32 identity is asserted with --tiny). Writes JSON
(--json PATH). A variant whose process fails is reported (error and stderr's end) and the others
still run; the run then exits with an error after writing the JSON. Every config of a static
variant and of lz-generate compiles anew (tens of seconds each): where one command's time is
bounded, split the run with --variants / --shapes.
--tiny: E.TINY in fp32 on CPU, prompt 8 + 4 new tokens, batch 1 and 2, 1 iteration, the static
variants compiled with CompileConfig(backend="eager") (transformers compiles only on accelerators
unless told), the processes run at once (a smoke run for tests, about 30 s on two CPU cores; no
timing claims); every variant that ran must produce sdpa's tokens.

    PYTHONPATH=$PWD python3 benchmarks/e2e_generate.py --json $OUT/e2e_generate.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_transformers as E  # noqa: E402
from _children import compare_tokens, finish, variant_results  # noqa: E402

import layerzero as lz  # noqa: E402

VARIANTS = ("sdpa", "sdpa-static", "lz-patch", "lz-patch-static", "lz-generate")
BASE = "sdpa-static"          # the ratios' denominator
SHAPES = ("128x128", "2048x256")
BATCHES = (1, 8)


def read_per_step(model) -> int:
    """Weight bytes a decode step reads: every parameter (tied ones once) but the input embedding
    table, of which a step reads only the batch's rows (unless it is tied to the output layer)."""
    seen, total = set(), 0
    for p in model.parameters():   # by storage: tied weights once, however they are tied
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    if out is None or out.weight.data_ptr() != emb.data_ptr():
        total -= emb.numel() * emb.element_size()
    return total


def parse_shape(s: str) -> tuple[int, int]:
    try:
        prompt, new = (int(x) for x in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {s!r} is not PROMPTxNEW, e.g. 128x128") from None
    if prompt < 1 or new < 1:
        raise argparse.ArgumentTypeError(f"shape {s!r}: prompt and new tokens must be >= 1")
    return prompt, new


def key(batch: int, prompt: int, new: int) -> str:
    return f"b{batch} {prompt}x{new}"


def copy_bandwidth(device: str) -> float:
    """Bytes per second of dst.copy_(src) (read + written): a 1 GiB tensor timed with CUDA events
    on CUDA (64 MiB and the wall clock on CPU), best of 10 after 3 warm-up copies."""
    n = 1 << 30 if device == "cuda" else 1 << 26
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    best = float("inf")
    for _ in range(10):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t0)
    del src, dst
    if device == "cuda":
        torch.cuda.empty_cache()
    return 2 * n / best


def one(variant: str, args) -> dict:
    """The child process of `variant`: every config, one after another, on one model."""
    import torch._dynamo

    if variant == "lz-generate" and getattr(lz, "generate", None) is None:
        return {"variant": variant, "not_available": "this layerzero has no lz.generate"}
    if args.tiny:
        shape, device, dtype = E.TINY, "cpu", torch.float32
    else:
        shape, device, dtype = E.SHAPES["1b"], "cuda", torch.bfloat16
    cuda = device == "cuda"
    model = E.build(shape, device, dtype)
    weight_bytes = read_per_step(model)
    E.set_variant(model, "layerzero" if variant.startswith("lz-") else "sdpa")
    static = variant.endswith("-static")
    extra = {"cache_implementation": "static"} if static else {}
    if static and args.tiny:   # auto-compile needs CUDA unless told otherwise; inductor is too slow here
        from transformers import CompileConfig
        extra["compile_config"] = CompileConfig(backend="eager")
        extra["compile_config"]._compile_all_devices = True
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    kv_per_token = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * head_dim * dtype.itemsize

    def sync():
        if cuda:
            torch.cuda.synchronize()

    rows = []
    for prompt, new in args.shapes:
        for batch in args.batch:
            torch._dynamo.reset()
            for attr in ("_previous_max_cache_length", "_cache"):   # the static cache (length) kept
                model.__dict__.pop(attr, None)                        # by this or older transformers
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            g = torch.Generator(device=device).manual_seed(prompt * 1000 + batch)
            ids = torch.randint(1, shape["vocab_size"], (batch, prompt), device=device, generator=g)
            mask = torch.ones_like(ids)

            def generate(n: int):
                kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                          eos_token_id=None, attention_mask=mask, **extra)
                with torch.no_grad():  # transformers' auto-compile engages under no_grad, not inference_mode
                    if variant == "lz-generate":
                        return lz.generate(model, ids, **kw)
                    return model.generate(input_ids=ids, **kw)

            def timed(n: int):
                sync()
                t0 = time.perf_counter()
                out = generate(n)
                sync()
                return out, time.perf_counter() - t0

            torch._dynamo.utils.counters.clear()
            lz.reset_metrics()
            out, warmup_s = timed(new)
            times = []
            for _ in range(args.iters):
                out, s = timed(new)
                times.append(s)
            kernels = {op: sorted(ks) for op, ks in lz.metrics()["calls"].items()}
            if tuple(out.shape) != (batch, prompt + new):
                raise RuntimeError(f"{variant} {key(batch, prompt, new)}: generate() returned shape "
                                   f"{tuple(out.shape)}, not {(batch, prompt + new)}")
            timed(1)
            ttft = statistics.median(timed(1)[1] for _ in range(args.iters))
            c = torch._dynamo.utils.counters
            sec = statistics.median(times)
            rows.append({
                "variant": variant, "batch": batch, "prompt": prompt, "new_tokens": new,
                "first_in_process": not rows, "warmup_s": round(warmup_s, 3),
                "generate_ms": [round(t * 1e3, 3) for t in times], "median_ms": round(sec * 1e3, 3),
                "tok_per_s": round(batch * new / sec, 2), "ms_per_new_token": round(sec * 1e3 / new, 4),
                "decode_step_ms": round((sec - ttft) * 1e3 / (new - 1), 4) if new > 1 else None,
                "ttft_ms": round(ttft * 1e3, 3),
                "kv_bytes_last_step": batch * (prompt + new - 1) * kv_per_token,
                "unique_graphs": c["stats"].get("unique_graphs", 0),
                "graph_breaks": sum(c["graph_break"].values()),
                "kernels": kernels,
                "tokens": out[:, prompt:].tolist(),
            })
    return {"variant": variant, "weight_bytes": weight_bytes, "rows": rows}


def _fmt_row(r: dict) -> str:
    pct = f"{r['roofline_pct']:5.1f}%" if "roofline_pct" in r else "  n/a"
    step = f"{r['decode_step_ms']:.3f}" if r["decode_step_ms"] is not None else "n/a"
    return (f"  {r['variant']:<16} {key(r['batch'], r['prompt'], r['new_tokens']):<13} "
            f"{r['tok_per_s']:9.1f} tok/s  {r['ms_per_new_token']:7.3f} ms/token  step {step:>7} ms  "
            f"{pct} of roofline  TTFT {r['ttft_ms']:8.2f} ms  warm-up {r['warmup_s']:6.2f} s  "
            f"{r['unique_graphs']} frames {r['graph_breaks']} breaks  {r['kernels'] or ''}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--batch", nargs="+", type=int, default=None, help="batch sizes (default 1 8; --tiny 1 2)")
    ap.add_argument("--shapes", nargs="+", type=parse_shape, default=None,
                    help="PROMPTxNEW token counts (default 128x128 2048x256; --tiny 8x4)")
    ap.add_argument("--iters", type=int, default=None, help="timed generate() calls (default 3; --tiny 1)")
    ap.add_argument("--tiny", action="store_true", help="tiny fp32 model on CPU (smoke run)")
    ap.add_argument("--json", default="")
    ap.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args(argv)
    if args.tiny:
        args.batch, args.shapes, args.iters = args.batch or [1, 2], args.shapes or [(8, 4)], args.iters or 1
    else:
        args.batch = args.batch or list(BATCHES)
        args.shapes = args.shapes or [parse_shape(s) for s in SHAPES]
        args.iters = args.iters or 3
        if not torch.cuda.is_available():
            sys.exit("needs CUDA (or --tiny)")
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args)), flush=True)
        return {}
    args.variants = list(dict.fromkeys(args.variants))
    device = "cpu" if args.tiny else "cuda"
    import transformers

    bandwidth = copy_bandwidth(device)
    result = {
        "benchmark": "e2e_generate", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "layerzero": lz.__version__, "dtype": "float32" if args.tiny else "bfloat16",
        "model": "tiny" if args.tiny else "1b", "iters": args.iters,
        "copy_bandwidth_GBps": round(bandwidth / 1e9, 1), "bandwidth_measured_in": "parent",
        "roofline": "batch * copy_bandwidth / weight_bytes (weight_bytes: what a decode step reads, the input embedding table left out)",
        "weight_bytes": None, "variants": {}, "rows": [], "ratio_vs_" + BASE: {},
    }
    print(f"generate() on {result['device']}, torch {result['torch']}, transformers {result['transformers']}, "
          f"{result['dtype']}, {result['model']} model; copy bandwidth {result['copy_bandwidth_GBps']} GB/s "
          f"(measured here); configs {' '.join(key(b, p, n) for p, n in args.shapes for b in args.batch)}")

    script = os.path.abspath(__file__)
    base = [sys.executable, script, "--iters", str(args.iters), "--batch", *map(str, args.batch),
            "--shapes", *(f"{p}x{n}" for p, n in args.shapes)] + (["--tiny"] if args.tiny else [])
    cmds = {}
    for v in args.variants:
        if v == "lz-generate" and getattr(lz, "generate", None) is None:
            result["variants"][v] = {"status": "not available", "why": "this layerzero has no lz.generate"}
            print(f"  {v:<16} not available: this layerzero has no lz.generate", flush=True)
        else:
            cmds[v] = base + ["--one", v]
    tokens, errors = {}, []
    for v, res in variant_results(cmds, args.tiny, result, errors, 16):
        if "not_available" in res:
            result["variants"][v] = {"status": "not available", "why": res["not_available"]}
            print(f"  {v:<16} not available: {res['not_available']}", flush=True)
            continue
        if result["weight_bytes"] is None:
            result["weight_bytes"] = res["weight_bytes"]
        elif result["weight_bytes"] != res["weight_bytes"]:
            raise RuntimeError(f"{v}: {res['weight_bytes']} weight bytes, others {result['weight_bytes']}")
        result["variants"][v] = {"status": "ok", "configs": len(res["rows"])}
        for r in res["rows"]:
            k = key(r["batch"], r["prompt"], r["new_tokens"])
            tokens[v, k] = r.pop("tokens")
            roof = r["batch"] * bandwidth / res["weight_bytes"]
            r["roofline_tok_per_s"] = round(roof, 1)
            r["roofline_pct"] = round(100 * r["tok_per_s"] / roof, 2)
            result["rows"].append(r)
            print(_fmt_row(r), flush=True)

    # tokens vs sdpa's, ratios vs sdpa-static's tok/s
    mismatches = []
    for r in result["rows"]:
        k = key(r["batch"], r["prompt"], r["new_tokens"])
        if ("sdpa", k) in tokens:
            why = compare_tokens(r, "sdpa", tokens["sdpa", k], tokens[r["variant"], k])
            if why:
                mismatches.append(f"{r['variant']} {k} ({why})")
    configs = [key(b, p, n) for p, n in args.shapes for b in args.batch]
    by = {(r["variant"], key(r["batch"], r["prompt"], r["new_tokens"])): r for r in result["rows"]}
    ran = [v for v in args.variants if result["variants"].get(v, {}).get("status") == "ok"]
    if ran:
        print(f"tok/s / tok/s({BASE}); weights {result['weight_bytes'] / 1e9:.3f} GB ({result['weight_bytes']} bytes), "
              f"roofline tok/s = batch x {result['copy_bandwidth_GBps']} GB/s / weights")
        print(f"  {'config':<13} {'roofline':>9} " + " ".join(f"{v:>16}" for v in ran))
        for k in configs:
            denom = by.get((BASE, k))
            ratios = {v: round(by[v, k]["tok_per_s"] / denom["tok_per_s"], 3)
                      for v in ran if denom and (v, k) in by}
            result["ratio_vs_" + BASE][k] = ratios
            roof = next((by[v, k]["roofline_tok_per_s"] for v in ran if (v, k) in by), None)
            print(f"  {k:<13} {roof if roof is not None else 'n/a':>9} "
                  + " ".join(f"{ratios[v]:>16.3f}" if v in ratios else f"{'n/a':>16}" for v in ran))
    if "sdpa" in ran:
        print("  same tokens as sdpa: " + ("all" if not mismatches else "not " + "; ".join(mismatches)))
    return finish(result, args.json, errors, args.tiny, mismatches, "sdpa")


if __name__ == "__main__":
    main()
