"""Prefill of Llama-shaped models: transformers' attention implementations vs LayerZero.

Two shapes, bf16, random weights, batch 1, on CUDA:
  1b   hidden 2048, 16 layers, 32 q / 8 kv heads, intermediate 8192, vocab 128256, 2048 tokens
  8b8  Llama-3-8B (hidden 4096, 32 / 8 heads, intermediate 14336, vocab 128256) cut to 8 layers,
       8192 tokens
Variants, timed in one run on the same model (switched in place, in this order):
  eager, sdpa, flex_attention       model.set_attn_implementation(name)
  layerzero-attn                    attn_implementation="layerzero": attention only
  layerzero                         lz.patch(model): attention, RMSNorm, RoPE, SwiGLU
  sdpa+liger                        sdpa + liger_kernel's apply_liger_kernel_to_llama (when
                                    importable; last, since Liger can't be undone)
A prefill is one forward over the prompt with a cache and the last position's logits (what
generate() runs first). Each variant: warm-up, then the median (and min) of --iters forwards (CUDA
events, torch.inference_mode). Prints each time, LayerZero's ratio to the best other variant (goals: 1b
<= 0.8, 8b8 <= 0.95), the max difference of each variant's logits from sdpa's, the kernels
LayerZero ran, and writes JSON (--json PATH).
--tiny: a tiny fp32 model on CPU (a smoke run for tests; no timing claims).

    PYTHONPATH=$PWD python3 benchmarks/e2e_transformers.py --json $OUT/e2e_transformers.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import time

import torch

import layerzero as lz

SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tokens=2048, goal=0.8),
    "8b8": dict(hidden_size=4096, num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=14336, vocab_size=128256, tokens=8192, goal=0.95),
}
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=128, tokens=16, goal=None)
VARIANTS = ("eager", "sdpa", "flex_attention", "layerzero-attn", "layerzero", "sdpa+liger")


def build(shape: dict, device: str, dtype: torch.dtype):
    import transformers as T

    cfg = T.LlamaConfig(**{k: v for k, v in shape.items() if k not in ("tokens", "goal")},
                        max_position_embeddings=max(shape["tokens"] * 2, 4096), rope_theta=500000.0,
                        attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = T.LlamaForCausalLM._from_config(cfg, dtype=dtype)
    return model.eval()


def prefill(model, ids):
    """One forward over the prompt, filling a fresh cache, keeping the last position's logits."""
    return model(input_ids=ids, use_cache=True, logits_to_keep=1).logits


def timed(fn, iters: int, warmup: int, cuda: bool) -> tuple[float, float]:
    """(median, min) milliseconds of fn() over `iters` runs, after `warmup` runs and at least half
    a second of running (GPU clocks and allocator settle)."""
    t_end = time.perf_counter() + (0.5 if cuda else 0.0)
    n = 0
    while n < warmup or time.perf_counter() < t_end:
        fn()
        n += 1
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def set_variant(model, name: str) -> str | None:
    """Put the model in variant `name`; returns why it can't run, or None."""
    lz.unpatch(model)
    if name == "layerzero":
        model.set_attn_implementation("sdpa")
        lz.patch(model)
    elif name == "layerzero-attn":
        model.set_attn_implementation("layerzero")
    elif name == "sdpa+liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger_kernel is not installed"
        if next(model.parameters()).device.type != "cuda":
            return "Liger's Triton kernels need CUDA"
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        model.set_attn_implementation("sdpa")
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False, model=model)
        # Liger also replaces classes/functions of modeling_llama itself; the caller restores them
        # (see _restore_modeling) so models built later are plain transformers again
    else:
        model.set_attn_implementation(name)
    return None


def _modeling():
    import transformers.models.llama.modeling_llama as m
    return m


def _restore_modeling(saved: dict) -> None:
    """Undo module-level replacements (Liger swaps LlamaRMSNorm, LlamaMLP, apply_rotary_pos_emb)."""
    d = vars(_modeling())
    for k in [k for k in d if k not in saved]:
        del d[k]
    d.update(saved)


def run_shape(label: str, shape: dict, args, device: str, dtype) -> dict:
    cuda = device == "cuda"
    saved = dict(vars(_modeling()))
    try:
        return _run_shape(label, shape, args, device, dtype, cuda)
    finally:
        _restore_modeling(saved)


def _run_shape(label: str, shape: dict, args, device: str, dtype, cuda: bool) -> dict:
    model = build(shape, device, dtype)
    ids = torch.randint(0, shape["vocab_size"], (1, shape["tokens"]), device=device,
                        generator=torch.Generator(device).manual_seed(1))
    res = {"shape": label, **{k: v for k, v in shape.items() if k != "goal"}, "variants": {}}
    ref = None
    for name in args.variants:
        try:
            why = set_variant(model, name)
            if why:
                res["variants"][name] = {"skipped": why}
                print(f"  {label:<4} {name:<15} skipped: {why}")
                continue
            lz.reset_metrics()
            with torch.inference_mode():
                out = prefill(model, ids).float()
                ms, ms_min = timed(lambda: prefill(model, ids), args.iters, args.warmup, cuda)
        except Exception as e:  # one broken variant must not lose the others' numbers
            res["variants"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
            print(f"  {label:<4} {name:<15} error: {res['variants'][name]['error']}")
            if cuda:
                torch.cuda.empty_cache()
            continue
        if name == "sdpa":
            ref = out
        entry = {"ms": round(ms, 3), "min_ms": round(ms_min, 3)}
        if ref is not None:
            entry["max_diff_vs_sdpa"] = float((out - ref).abs().max())
        if name.startswith("layerzero"):
            entry["kernels"] = {op: sorted(k) for op, k in lz.metrics()["calls"].items()}
        res["variants"][name] = entry
        print(f"  {label:<4} {name:<15} {ms:9.2f} ms (min {ms_min:.2f})" + (f"   max|diff| vs sdpa {entry['max_diff_vs_sdpa']:.3g}"
                                                        if "max_diff_vs_sdpa" in entry else ""))
    lz.unpatch(model)
    others = {n: v["ms"] for n, v in res["variants"].items() if "ms" in v and not n.startswith("layerzero")}
    lzv = res["variants"].get("layerzero", {})
    if others and "ms" in lzv:
        best = min(others, key=others.get)
        res["best_other"], res["best_other_ms"] = best, others[best]
        res["ratio"] = round(lzv["ms"] / others[best], 3)
        res["goal"] = shape["goal"]
        goal = f" (goal <= {shape['goal']})" if shape["goal"] else ""
        print(f"  {label}: t(layerzero) / t({best}) = {res['ratio']:.3f}{goal}; "
              f"kernels: {lzv.get('kernels')}")
    del model
    if cuda:
        torch.cuda.empty_cache()
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny fp32 model on CPU (smoke run)")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--variants", nargs="+", default=None, choices=VARIANTS)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", default="benchmarks/e2e_transformers.json", help="where to write results")
    args = ap.parse_args(argv)
    import transformers

    if args.tiny:
        device, dtype = "cpu", torch.float32
        shapes = {"tiny": TINY}
        args.iters, args.warmup = min(args.iters, 2), min(args.warmup, 1)
        args.variants = args.variants or [v for v in VARIANTS if v != "flex_attention"]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs a CUDA GPU (use --tiny for a CPU smoke run)")
        device, dtype = "cuda", torch.bfloat16
        shapes = {k: SHAPES[k] for k in args.shapes}
        args.variants = args.variants or list(VARIANTS)
    print(f"e2e prefill on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    result = {"benchmark": "e2e_transformers", "device": device,
              "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
              "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
              "liger_kernel": _version("liger_kernel"), "layerzero": lz.__version__,
              "python": platform.python_version(), "dtype": str(dtype)[6:], "iters": args.iters,
              "shapes": []}
    for label, shape in shapes.items():
        result["shapes"].append(run_shape(label, shape, args, device, dtype))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(module.replace("_", "-"))
    except Exception:
        return None


if __name__ == "__main__":
    main()
