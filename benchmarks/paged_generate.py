"""Greedy generate() of a batch of prompts of spread lengths: lz.generate with lz.PagedKVCache
against transformers' static cache (issue 15's GPU goal) and lz.generate's own static cache.

The llama-shaped 1B model of e2e_transformers.py (bf16, random weights, CUDA; max_position_embeddings
8192 here, so that 4000 + 256 positions fit), 32 prompts whose real lengths are spread evenly over
100..4000 tokens (linspace, rounded, in an order shuffled by a seeded generator; random ids, seeded),
left-padded to the longest with an attention mask; 256 new greedy tokens (min_new_tokens =
max_new_tokens: every run decodes as many), eos_token_id=None, pad_token_id=0. Variants, each in a
process of its own (LayerZero's patching and dynamo's caches stay out of each other's way), all
under torch.no_grad:
  sdpa-static  transformers' sdpa, cache_implementation="static" (transformers compiles the decode
               step itself: torch.compile "reduce-overhead", engaged under no_grad); its static
               cache is batch x (longest prompt + new tokens)
  lz-static    lz.patch(model) + lz.generate (its static cache, its compiled CUDA-graphed step)
  lz-paged     lz.patch(model) + lz.generate(..., cache=lz.PagedKVCache(model.config, page_size=16,
               num_pages=N, max_batch_size=32)) with N = sum over rows of ceil((prompt_b + 256) / 16),
               the pages the batch needs (a pool sized to the batch, as a server sizes it to its
               memory budget; None would grow it by doubling, up to 2x). cache.reset() before each
               call. Prefill eager (dense attention), decode steps in graph mode, compiled and
               CUDA-graphed when lz.paged_attention has a graph-safe kernel (else eager steps:
               `cuda_graph` false and lz.metrics' fallback counted)
Per variant: the first generate() is the warm-up (compile / capture included: `warmup_s`), then
--iters generate() calls timed alone (torch.cuda.synchronize() around each), median: tok/s =
batch * new / seconds (prefill included); TTFT = median of generate(max_new_tokens=1) (one untimed
first); decode step = (seconds - TTFT) / (new - 1). KV memory: the bytes of the cache's tensors
(static: every layer's K and V; paged: the pools, page tables and lengths), against the bytes of
the tokens the batch holds, sum over rows of (prompt_b + new) x layers x 2 x kv_heads x head_dim x
dtype size (goal: <= 1.1x). Decode roofline: copy bandwidth BW (measured in the parent, as in
e2e_generate.py) over the bytes a step must read, weights (e2e_generate.read_per_step) + K/V of the
tokens held on average over the decode; static caches read their full length (the mask hides the
padding, the reads happen). Also: the kernels LayerZero ran (lz.metrics()["calls"]; compiled steps
count their kernels once, when traced), fallbacks, whether the decode was a CUDA graph, and tokens
vs sdpa-static's (bf16 kernels round differently, random weights: greedy tokens may part after
some steps; fp32 identity is required with --tiny). Prints a line per variant and the goals
(tok/s >= 1.5x sdpa-static, memory <= 1.1x); writes JSON (--json PATH).

--tiny: E.TINY in fp32 on CPU, 4 prompts of 4..24 tokens, 6 new, page size 4, 1 iteration, the
static variant compiled with the eager backend, processes at once (a smoke run for tests; no
timing claims; every variant must give sdpa-static's tokens).

    PYTHONPATH=$PWD python3 benchmarks/paged_generate.py --json $OUT/paged_generate.json
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
import e2e_generate as G  # noqa: E402
import e2e_transformers as E  # noqa: E402
from _children import compare_tokens, finish, variant_results  # noqa: E402

import layerzero as lz  # noqa: E402

VARIANTS = ("sdpa-static", "lz-static", "lz-paged")
BASE = "sdpa-static"
GOAL_SPEED, GOAL_MEMORY = 1.5, 1.1


def setup(tiny: bool) -> dict:
    if tiny:
        return dict(shape=E.TINY, device="cpu", dtype=torch.float32, batch=4, lo=4, hi=24, new=6, page=4)
    return dict(shape=dict(E.SHAPES["1b"], tokens=4096), device="cuda", dtype=torch.bfloat16, batch=32,
                lo=100, hi=4000, new=256, page=16)


def prompts(s: dict):
    """(ids, mask, lengths): left-padded prompts of lengths spread evenly over lo..hi, shuffled."""
    g = torch.Generator().manual_seed(15)
    lengths = torch.linspace(s["lo"], s["hi"], s["batch"]).round().long()
    lengths = lengths[torch.randperm(s["batch"], generator=g)].tolist()
    longest = max(lengths)
    ids = torch.randint(1, s["shape"]["vocab_size"], (s["batch"], longest), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, longest - n:] = 1
    return ids.masked_fill(mask == 0, 0).to(s["device"]), mask.to(s["device"]), lengths


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def cache_bytes(cache) -> int:
    """Bytes of a cache's tensors: every layer's K and V (a paged cache's pools), plus a paged
    cache's page tables and lengths."""
    ts = [t for layer in cache.layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))]
    for g in getattr(cache, "groups", ()):
        ts += [g.table, g.seq_lens, g.cap]
    return tensor_bytes(ts)


def one(variant: str, args) -> dict:
    """The child process of `variant`."""
    import torch._dynamo

    from layerzero import generation as lzgen

    s = setup(args.tiny)
    cuda = s["device"] == "cuda"
    model = E.build(s["shape"], s["device"], s["dtype"])
    weight_bytes = G.read_per_step(model)
    E.set_variant(model, "layerzero" if variant.startswith("lz-") else "sdpa")
    ids, mask, lengths = prompts(s)
    new, batch = s["new"], s["batch"]
    extra, cache = {}, None
    if variant == "sdpa-static":
        extra["cache_implementation"] = "static"
        if args.tiny:   # transformers auto-compiles on accelerators only unless told; inductor is slow here
            from transformers import CompileConfig
            extra["compile_config"] = CompileConfig(backend="eager")
            extra["compile_config"]._compile_all_devices = True
    if variant == "lz-paged":
        pages = sum(-(-(n + new) // s["page"]) for n in lengths)
        cache = lz.PagedKVCache(model.config, page_size=s["page"], num_pages=pages, max_batch_size=batch)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def generate(n: int, **kw):
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None,
                  attention_mask=mask, **extra, **kw)
        with torch.no_grad():   # transformers' auto-compile engages under no_grad, not inference_mode
            if variant == "sdpa-static":
                return model.generate(input_ids=ids, **kw)
            if cache is not None:
                cache.reset()
                kw["cache"] = cache
            return lz.generate(model, ids, **kw)

    def timed(n: int, **kw):
        sync()
        t0 = time.perf_counter()
        out = generate(n, **kw)
        sync()
        return out, time.perf_counter() - t0

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    lz.reset_metrics()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    out, warmup_s = timed(new, return_dict_in_generate=True)
    kv_cache = out.cache if variant != "lz-static" else None
    loop = None
    if variant.startswith("lz-"):
        loop = next(lp for lp in lzgen._LOOPS[model].values() if cache is None or lp.cache is cache)
        kv_cache = loop.cache
    kv_bytes = cache_bytes(kv_cache)
    times = []
    for _ in range(args.iters):
        out, sec = timed(new)
        times.append(sec)
    metrics = lz.metrics()
    kernels = {op: sorted(ks) for op, ks in metrics["calls"].items()}
    graph = None if loop is None else bool(loop.graph)     # a captured CUDA graph (False: eager steps)
    timed(1)
    ttft = statistics.median(timed(1)[1] for _ in range(args.iters))
    sec = statistics.median(times)
    shape = s["shape"]
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    per_token = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * head_dim * s["dtype"].itemsize
    stored = sum(n + new for n in lengths) * per_token
    c = torch._dynamo.utils.counters
    return {"variant": variant, "weight_bytes": weight_bytes, "lengths": lengths, "batch": batch,
            "new_tokens": new, "warmup_s": round(warmup_s, 3), "generate_ms": [round(t * 1e3, 3) for t in times],
            "median_ms": round(sec * 1e3, 3), "tok_per_s": round(batch * new / sec, 2),
            "ttft_ms": round(ttft * 1e3, 3),
            "decode_step_ms": round((sec - ttft) * 1e3 / (new - 1), 4) if new > 1 else None,
            "kv_bytes": kv_bytes, "stored_bytes": stored, "kv_per_token": per_token,
            "kv_over_stored": round(kv_bytes / stored, 4),
            "kv_tokens_per_row": kv_bytes // per_token // batch,   # static: the length a step reads
            "cuda_graph": graph, "fallbacks": metrics.get("fallbacks", {}), "kernels": kernels,
            "unique_graphs": c["stats"].get("unique_graphs", 0), "graph_breaks": sum(c["graph_break"].values()),
            "tokens": out[:, ids.shape[1]:].tolist()}


def _fmt(r: dict) -> str:
    return (f"  {r['variant']:<12} {r['tok_per_s']:9.1f} tok/s  step {r['decode_step_ms']:.3f} ms "
            f"({r['decode_roofline_pct']:5.1f}% of its roofline)  TTFT {r['ttft_ms']:8.1f} ms  "
            f"warm-up {r['warmup_s']:6.1f} s  KV {r['kv_bytes'] / 1e9:.3f} GB = {r['kv_over_stored']:.3f}x "
            f"stored  cuda_graph={r['cuda_graph']}  fallbacks={r['fallbacks'] or '{}'}  "
            f"{r['unique_graphs']} frames {r['graph_breaks']} breaks  {r['kernels']}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--iters", type=int, default=None, help="timed generate() calls (default 3; --tiny 1)")
    ap.add_argument("--tiny", action="store_true", help="tiny fp32 model on CPU (smoke run)")
    ap.add_argument("--json", default="")
    ap.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)   # the child process
    args = ap.parse_args(argv)
    args.iters = args.iters or (1 if args.tiny else 3)
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("needs CUDA (or --tiny)")
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args)), flush=True)
        return {}
    import transformers

    s = setup(args.tiny)
    bandwidth = G.copy_bandwidth(s["device"])
    result = {"benchmark": "paged_generate", "device": torch.cuda.get_device_name() if not args.tiny else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__, "dtype": str(s["dtype"]),
              "model": "tiny" if args.tiny else "1b", "batch": s["batch"], "new_tokens": s["new"],
              "prompt_lengths": prompts(s)[2], "page_size": s["page"], "iters": args.iters,
              "copy_bandwidth_GBps": round(bandwidth / 1e9, 1), "variants": {}, "rows": [], "goals": {}}
    print(f"paged generate() on {result['device']}, torch {result['torch']}, transformers "
          f"{result['transformers']}, {result['dtype']}, {result['model']} model; {s['batch']} prompts of "
          f"{s['lo']}..{s['hi']} tokens + {s['new']} new; copy bandwidth {result['copy_bandwidth_GBps']} GB/s",
          flush=True)
    script = os.path.abspath(__file__)
    base = [sys.executable, script, "--iters", str(args.iters)] + (["--tiny"] if args.tiny else [])
    cmds = {v: base + ["--one", v] for v in dict.fromkeys(args.variants)}
    tokens, errors = {}, []
    for v, r in variant_results(cmds, args.tiny, result, errors, 12):
        tokens[v] = r.pop("tokens")
        held = sum(n + r["new_tokens"] / 2 for n in r["lengths"]) / r["batch"]   # mean over the decode
        read_tokens = r["kv_tokens_per_row"] if v != "lz-paged" else held
        step_bytes = r["weight_bytes"] + r["batch"] * read_tokens * r["kv_per_token"]
        r["decode_roofline_ms"] = round(step_bytes / bandwidth * 1e3, 4)
        r["decode_roofline_pct"] = round(100 * r["decode_roofline_ms"] / r["decode_step_ms"], 2)
        result["variants"][v] = {"status": "ok"}
        result["rows"].append(r)
        print(_fmt(r), flush=True)
    by = {r["variant"]: r for r in result["rows"]}
    mismatches = []
    for r in result["rows"]:
        if BASE in tokens:
            why = compare_tokens(r, BASE, tokens[BASE], tokens[r["variant"]])
            if why:
                mismatches.append(f"{r['variant']} ({why})")
        if BASE in by:
            r["ratio_vs_" + BASE] = round(r["tok_per_s"] / by[BASE]["tok_per_s"], 3)
    if "lz-paged" in by:
        p = by["lz-paged"]
        result["goals"]["memory_kv_over_stored"] = {"value": p["kv_over_stored"], "goal": GOAL_MEMORY,
                                                    "met": p["kv_over_stored"] <= GOAL_MEMORY}
        if BASE in by:
            ratio = p["ratio_vs_" + BASE]
            result["goals"]["tok_s_vs_" + BASE] = {"value": ratio, "goal": GOAL_SPEED, "met": ratio >= GOAL_SPEED}
    print("tok/s / tok/s(sdpa-static): " + "  ".join(f"{r['variant']} {r.get('ratio_vs_' + BASE, 'n/a')}"
                                                       for r in result["rows"]))
    for name, goal in result["goals"].items():
        print(f"  goal {name}: {goal['value']} (goal {goal['goal']}): {'met' if goal['met'] else 'NOT met'}")
    if BASE in tokens:
        print(f"  same tokens as {BASE}: " + ("all" if not mismatches else "not " + "; ".join(mismatches)))
    return finish(result, args.json, errors, args.tiny, mismatches, BASE)


if __name__ == "__main__":
    main()
