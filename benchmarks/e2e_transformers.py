"""Prefill of Llama-shaped models: transformers' attention implementations vs LayerZero.

Two shapes, bf16, random weights, batch 1, on CUDA:
  1b   hidden 2048, 16 layers, 32 q / 8 kv heads, intermediate 8192, vocab 128256, 2048 tokens
  8b8  Llama-3-8B (hidden 4096, 32 / 8 heads, intermediate 14336, vocab 128256) cut to 8 layers,
       8192 tokens
Variants (the first five switched in place on one model):
  eager, sdpa, flex_attention       model.set_attn_implementation(name)
  layerzero-attn                    attn_implementation="layerzero": attention only
  layerzero                         lz.patch(model): attention, RMSNorm, RoPE, SwiGLU
  sdpa+liger                        sdpa + liger_kernel's apply_liger_kernel_to_llama(model=...) on a
                                    second model with the same weights (Liger can't be undone)
  sdpa+compile                      sdpa, then torch.compile(model) (default mode)
  layerzero+compile                 lz.patch(model), then torch.compile(model) (default mode)
  layerzero-fused+compile           (only when named in --variants) as layerzero+compile, with q/k/v
                                    and gate/up as one product each (`patching.siblings`, which
                                    lz.generate's graphed steps use): does the fusion pay in prefill?
The +compile variants each run in a process of their own (`--one NAME`, started by this one
after the in-place variants are done and their models freed): one model switched between variants
would share dynamo's caches and LayerZero's module swaps with the others. The child builds the same
model (same seed, same weights) and prompt, patches and compiles it, times the first forward (the
compile: `compile_s` in the JSON), warms it up as the first pass does, then times --rounds x
--iters forwards (--rewarm forwards before each round) the same way; it can't interleave with the
other variants. It reports dynamo's compiled frames and graph breaks, its logits (compared with
sdpa's here) and, for layerzero+compile, the kernels LayerZero ran (from before the compile on).
Prints t(layerzero+compile) / t(sdpa+compile) per shape (goal <= 0.85 at 1b and 8b8).
Liger also replaces module-level names of transformers' modeling_llama (apply_rotary_pos_emb,
LlamaRMSNorm, LlamaMLP); the module's globals are saved before and right after Liger is applied,
and each switch puts back the right set (transformers' own for every other variant, Liger's for
sdpa+liger), then checks it, so the other variants never run Liger's RoPE.

A prefill is one forward over the prompt with a cache and the last position's logits (what
generate() runs first). A first pass per variant checks it can run, keeps its logits and the
kernels LayerZero ran, and warms it up (--warmup forwards, on CUDA at least 0.5 s). Then --rounds
rounds interleave the variants (in order, reversed every other round): each switches to the
variant, re-warms it (--rewarm forwards) and times --iters forwards (CUDA events,
torch.inference_mode), so GPU clock and thermal drift hit all variants alike. A variant's time is
the median (and min) over the samples of all its rounds; the JSON also has each round's median.
Afterwards sdpa and layerzero run once more on the first model (after Liger was applied to the
second one and its globals were swapped in and out): their logits and LayerZero's kernels should be
the first pass's (printed and in the JSON; a warning if not, an error with --tiny).
Prints each time, LayerZero's ratio to the best other variant not compiled (goals: 1b <= 0.8,
8b8 <= 0.95), the max difference of each variant's logits from sdpa's, the kernels LayerZero ran,
and writes JSON (--json PATH).
--tiny: a tiny fp32 model on CPU (a smoke run for tests; no timing claims); sdpa+liger is not run
(Triton needs CUDA), but when liger_kernel is installed it is still applied to the second model,
so the check above covers the globals swap; it also asserts that the layerzero variant ran
LayerZero's attention, rms_norm, rope and swiglu. The +compile variants run with
torch.compile(backend="eager") (dynamo traces, no inductor: seconds on CPU), their two processes at
once; they must match sdpa's logits (max |diff| < 1e-4).

    PYTHONPATH=$PWD python3 benchmarks/e2e_transformers.py --json $OUT/e2e_transformers.json
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

import layerzero as lz
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # _children, when run by path
from _children import child_result, describe_error, run_children  # noqa: E402

SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tokens=2048, goal=0.8),
    "8b8": dict(hidden_size=4096, num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=14336, vocab_size=128256, tokens=8192, goal=0.95),
}
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=128, tokens=16, goal=None)
COMPILED = ("sdpa+compile", "layerzero+compile", "layerzero-fused+compile")   # each in a process of its own
VARIANTS = ("eager", "sdpa", "flex_attention", "layerzero-attn", "layerzero", "sdpa+liger") + COMPILED
EXPERIMENTS = ("layerzero-fused+compile",)          # run only when named
COMPILE_GOAL = 0.85   # t(layerzero+compile) / t(sdpa+compile)


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


def warm(fn, n: int, min_s: float, cuda: bool) -> None:
    """Run fn() `n` times and for at least `min_s` seconds (GPU clocks and allocator settle)."""
    t_end = time.perf_counter() + min_s
    i = 0
    while i < n or time.perf_counter() < t_end:
        fn()
        i += 1
    if cuda:
        torch.cuda.synchronize()


def time_ms(fn, iters: int, cuda: bool) -> list[float]:
    """Milliseconds of each of `iters` runs of fn()."""
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
    return times


def set_variant(model, name: str) -> str | None:
    """Put the model in variant `name`; returns why it can't run, or None. For "sdpa+liger" this
    applies Liger to `model` for good (the benchmark itself applies it to a second model)."""
    lz.unpatch(model)
    if name in ("layerzero", "layerzero-fused"):
        model.set_attn_implementation("sdpa")
        lz.patch(model)
        if name == "layerzero-fused":
            from layerzero.generation import _fuse_siblings
            _fuse_siblings(model)
    elif name == "layerzero-attn":
        model.set_attn_implementation("layerzero")
    elif name == "sdpa+liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger_kernel is not installed"
        if next(model.parameters()).device.type != "cuda":
            return "Liger's Triton kernels need CUDA"
        apply_liger(model)
    else:
        model.set_attn_implementation(name)
    return None


def apply_liger(model) -> None:
    """sdpa + Liger's RoPE, RMSNorm and SwiGLU on `model` (instance-level: forwards of its norms and
    MLPs). Liger also replaces classes/functions of modeling_llama itself; the caller restores
    them (see _restore_modeling) for the models that must stay plain transformers."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    model.set_attn_implementation("sdpa")
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=model)


def _modeling():
    import transformers.models.llama.modeling_llama as m
    return m


def _restore_modeling(saved: dict) -> None:
    """Set modeling_llama's globals to `saved` exactly (undoes Liger's module-level replacements of
    LlamaRMSNorm, LlamaMLP, apply_rotary_pos_emb; or puts them back, given Liger's set)."""
    d = vars(_modeling())
    for k in [k for k in d if k not in saved]:
        del d[k]
    d.update(saved)


def _check_modeling(expected: dict, lz_rope: bool = False) -> None:
    """modeling_llama's globals are `expected` (lz_rope: but for lz.patch's RoPE wrapper around
    expected's apply_rotary_pos_emb); raises RuntimeError otherwise."""
    d = vars(_modeling())
    missing = object()
    bad = [k for k in set(d) | set(expected) if k != "apply_rotary_pos_emb"
           and d.get(k, missing) is not expected.get(k, missing)]
    rope, want = d.get("apply_rotary_pos_emb"), expected.get("apply_rotary_pos_emb")
    if lz_rope:   # (another live patched model of the process may have wrapped `want` already)
        rope, want = (getattr(f, "__wrapped_original__", f) for f in (rope, want))
    if rope is not want:
        bad.append("apply_rotary_pos_emb")
    if bad:
        raise RuntimeError(f"modeling_llama globals not those of this variant: {sorted(bad)[:8]}")


def one_compiled(name: str, label: str, args, logits_path: str) -> dict:
    """Child process of a +compile variant: build the model of shape `label` (same seed, weights and
    prompt as the parent's), patch it (layerzero+compile) and torch.compile it, time the first
    forward (the compile), warm up, time --rounds x --iters forwards; logits go to `logits_path`."""
    import torch._dynamo

    tiny = label == "tiny"
    shape, device, dtype = (TINY, "cpu", torch.float32) if tiny else (SHAPES[label], "cuda", torch.bfloat16)
    cuda = device == "cuda"
    model = build(shape, device, dtype)
    ids = torch.randint(0, shape["vocab_size"], (1, shape["tokens"]), device=device,
                        generator=torch.Generator(device).manual_seed(1))
    set_variant(model, name.split("+")[0])
    compiled = torch.compile(model, backend="eager") if tiny else torch.compile(model)
    torch._dynamo.utils.counters.clear()
    lz.reset_metrics()
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = prefill(compiled, ids).float()
        if cuda:
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        warm(lambda: prefill(compiled, ids), args.warmup, 0.5 if cuda else 0.0, cuda)
        samples = []
        for _ in range(args.rounds):
            warm(lambda: prefill(compiled, ids), args.rewarm, 0.0, cuda)
            samples.append(time_ms(lambda: prefill(compiled, ids), args.iters, cuda))
    torch.save(out.cpu(), logits_path)
    c = torch._dynamo.utils.counters
    return {"samples": samples, "compile_s": round(compile_s, 2),
            "compile_backend": "eager" if tiny else "inductor",
            "unique_graphs": c["stats"].get("unique_graphs", 0),
            "graph_breaks": sum(c["graph_break"].values()),
            "kernels": _kernels() if name.startswith("layerzero") else None}


def run_compiled(label: str, names: list, args) -> dict:
    """Run each +compile variant of `names` in a child process (see one_compiled); returns name ->
    {"samples", "compile_s", ..., "logits"} or {"error": ...}."""
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        cmds = {}
        for n in names:
            cmds[n] = [sys.executable, os.path.abspath(__file__), "--one", n, "--one-shape", label,
                       "--one-logits", os.path.join(tmp, f"{n}.pt"), "--rounds", str(args.rounds),
                       "--iters", str(args.iters), "--warmup", str(args.warmup),
                       "--rewarm", str(args.rewarm)] + (["--tiny"] if args.tiny else [])
        for n, rc, out, err in run_children(cmds, parallel=args.tiny):
            try:
                if rc:
                    raise RuntimeError(f"exit status {rc}: {err.strip().splitlines()[-1] if err.strip() else ''}")
                res[n] = child_result(out)
                res[n]["logits"] = torch.load(os.path.join(tmp, f"{n}.pt"))
            except Exception as e:
                res[n] = {"error": describe_error(e), "stderr_tail": err[-3000:]}
    return res


def _kernels() -> dict:
    return {op: sorted(k) for op, k in lz.metrics()["calls"].items()}


def run_shape(label: str, shape: dict, args, device: str, dtype) -> dict:
    cuda = device == "cuda"
    saved = dict(vars(_modeling()))
    try:
        return _run_shape(label, shape, args, device, dtype, cuda, saved)
    finally:
        _restore_modeling(saved)


def _run_shape(label: str, shape: dict, args, device: str, dtype, cuda: bool, saved: dict) -> dict:
    model = build(shape, device, dtype)
    ids = torch.randint(0, shape["vocab_size"], (1, shape["tokens"]), device=device,
                        generator=torch.Generator(device).manual_seed(1))
    res = {"shape": label, **{k: v for k, v in shape.items() if k != "goal"}, "rounds": args.rounds,
           "variants": {}}
    liger: dict = {}   # "model": the second model (Liger applied), "globals": modeling_llama's then

    def enter(name: str):
        """Switch to variant `name` (modeling_llama's globals included); returns the model to run."""
        lz.unpatch(model)
        if name == "sdpa+liger":
            _restore_modeling(liger["globals"])
            _check_modeling(liger["globals"])
            return liger.get("model")
        _restore_modeling(saved)           # before lz.patch, which wraps the RoPE it finds
        set_variant(model, name)
        _check_modeling(saved, lz_rope=name == "layerzero")
        return model

    def prepare_liger() -> str | None:
        """Build the second model with the first one's weights and apply Liger to it; returns why
        sdpa+liger can't run, or None."""
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger_kernel is not installed"
        lz.unpatch(model)
        _restore_modeling(saved)           # the second model is built from transformers' classes
        second = build(shape, device, dtype)
        second.load_state_dict(model.state_dict())
        try:
            apply_liger(second)
            liger["globals"] = dict(vars(_modeling()))
        finally:
            _restore_modeling(saved)
        liger["model"] = second
        if not cuda:   # kept anyway: the recheck below then covers the swap of Liger's globals
            return "Liger's Triton kernels need CUDA"
        return None

    def skip(name: str, why: str) -> None:
        res["variants"][name] = {"skipped": why}
        print(f"  {label:<4} {name:<15} skipped: {why}")

    def fail(name: str, e: Exception) -> None:
        res["variants"][name] = {"error": describe_error(e)}
        if name == "sdpa+liger":
            liger.pop("model", None)   # its memory; its globals stay for the recheck
        print(f"  {label:<4} {name:<15} error: {res['variants'][name]['error']}")
        if cuda:
            torch.cuda.empty_cache()

    # first pass: can it run? its logits, the kernels LayerZero ran, warm-up
    outputs, first_kernels, samples = {}, {}, {}
    for name in args.variants:
        if name in COMPILED:   # run_compiled, below
            continue
        try:
            if name == "sdpa+liger":
                why = prepare_liger()
                if why:
                    skip(name, why)
                    continue
            m = enter(name)
            lz.reset_metrics()
            with torch.inference_mode():
                outputs[name] = prefill(m, ids).float()
                if name.startswith("layerzero"):
                    first_kernels[name] = _kernels()
                warm(lambda: prefill(m, ids), args.warmup, 0.5 if cuda else 0.0, cuda)
        except Exception as e:  # one broken variant must not lose the others' numbers
            fail(name, e)
            continue
        samples[name] = []

    # rounds: each visits every variant (order reversed every other round): switch, re-warm, time
    order = [n for n in args.variants if n in samples]
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            if name not in samples:
                continue
            try:
                m = enter(name)
                with torch.inference_mode():
                    warm(lambda: prefill(m, ids), args.rewarm, 0.0, cuda)
                    samples[name].append(time_ms(lambda: prefill(m, ids), args.iters, cuda))
            except Exception as e:
                del samples[name]
                fail(name, e)

    # recheck: after Liger's globals were in place (and swapped out), the first model's sdpa and
    # layerzero give the first pass's logits (and layerzero the same kernels)
    recheck = {}
    try:
        if "globals" in liger:
            enter("sdpa+liger")
            recheck["after_liger"] = True
        for name in ("sdpa", "layerzero"):
            if name not in samples:
                continue
            m = enter(name)
            lz.reset_metrics()
            with torch.inference_mode():
                out = prefill(m, ids).float()
            recheck[name] = {"max_diff_vs_first_pass": float((out - outputs[name]).abs().max())}
            if name == "layerzero":
                recheck[name]["same_kernels"] = _kernels() == first_kernels[name]
    except Exception as e:
        if args.tiny:
            raise
        recheck["error"] = describe_error(e)
    m = None
    lz.unpatch(model)
    _restore_modeling(saved)
    res["recheck"] = recheck
    model = None
    liger.clear()   # frees the second model (its globals were needed by the recheck only)
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()

    # the +compile variants: a process each, after this one's models are freed
    compiled_names = [n for n in args.variants if n in COMPILED]
    compiled = run_compiled(label, compiled_names, args) if compiled_names else {}

    ref = outputs.get("sdpa")

    def entry_of(name: str, runs: list, logits, kernels) -> dict:
        flat = [t for ts in runs for t in ts]
        entry = {"ms": round(statistics.median(flat), 3), "min_ms": round(min(flat), 3),
                 "round_ms": [round(statistics.median(ts), 3) for ts in runs]}
        if ref is not None:
            entry["max_diff_vs_sdpa"] = float((logits.to(ref.device, ref.dtype) - ref).abs().max())
        if kernels is not None:
            entry["kernels"] = kernels
        return entry

    def show(name: str, entry: dict, extra: str = "") -> None:
        print(f"  {label:<4} {name:<17} {entry['ms']:9.2f} ms (min {entry['min_ms']:.2f})"
              + (f"   max|diff| vs sdpa {entry['max_diff_vs_sdpa']:.3g}" if "max_diff_vs_sdpa" in entry else "")
              + f"   rounds: {' '.join(f'{t:.2f}' for t in entry['round_ms'])}" + extra)

    if order:
        print(f"  {label}: {args.rounds} interleaved rounds x {args.iters} forwards per variant")
    for name in order:
        if name in samples:
            res["variants"][name] = entry_of(name, samples[name], outputs[name], first_kernels.get(name))
            show(name, res["variants"][name])
    if compiled:
        print(f"  {label}: +compile variants, a process each: {args.rounds} rounds x {args.iters} forwards "
              f"after the compile and warm-up")
    for name, c in compiled.items():
        if "error" in c:
            res["variants"][name] = {"error": c["error"]}
            print(f"  {label:<4} {name:<17} error: {c['error']}\n{c.get('stderr_tail', '')}")
            continue
        entry = entry_of(name, c["samples"], c["logits"], c["kernels"])
        entry.update({k: c[k] for k in ("compile_s", "compile_backend", "unique_graphs", "graph_breaks")})
        res["variants"][name] = entry
        show(name, entry, f"   compile {c['compile_s']} s ({c['compile_backend']}), "
                          f"{c['unique_graphs']} compiled frames, {c['graph_breaks']} graph breaks")
    res["variants"] = {n: res["variants"][n] for n in args.variants if n in res["variants"]}
    others = {n: v["ms"] for n, v in res["variants"].items()
              if "ms" in v and not n.startswith("layerzero") and n not in COMPILED}
    lzv = res["variants"].get("layerzero", {})
    if others and "ms" in lzv:
        best = min(others, key=others.get)
        res["best_other"], res["best_other_ms"] = best, others[best]
        res["ratio"] = round(lzv["ms"] / others[best], 3)
        res["goal"] = shape["goal"]
        goal = f" (goal <= {shape['goal']})" if shape["goal"] else ""
        print(f"  {label}: t(layerzero) / t({best}) = {res['ratio']:.3f}{goal}; "
              f"kernels: {lzv.get('kernels')}")
    sc, lc, fc = (res["variants"].get(n, {}) for n in COMPILED)
    if "ms" in sc and "ms" in lc:
        res["compile_ratio"] = round(lc["ms"] / sc["ms"], 3)
        res["compile_goal"] = COMPILE_GOAL
        print(f"  {label}: t(layerzero+compile) / t(sdpa+compile) = {res['compile_ratio']:.3f} "
              f"(goal <= {COMPILE_GOAL}); compile {lc['compile_s']} s vs {sc['compile_s']} s; "
              f"kernels: {lc.get('kernels')}")
    if "ms" in sc and "ms" in fc:
        res["fused_compile_ratio"] = round(fc["ms"] / sc["ms"], 3)
        print(f"  {label}: t(layerzero-fused+compile) / t(sdpa+compile) = {res['fused_compile_ratio']:.3f}")
    _report_recheck(label, recheck, strict=args.tiny)
    if args.tiny and "layerzero" in first_kernels:   # lz.patch really ran LayerZero's ops
        ops = {"attention", "rms_norm", "rope", "swiglu"}
        assert set(first_kernels["layerzero"]) >= ops, f"layerzero ran {first_kernels['layerzero']}, not all of {ops}"
    if args.tiny:   # fp32: compiled (eager backend) forwards give sdpa's logits
        for name in compiled:
            v = res["variants"][name]
            assert "error" not in v, f"{name}: {v['error']}"
            assert v.get("max_diff_vs_sdpa", 0) < 1e-4, f"{name} differs from sdpa: {v}"
    del outputs
    return res


def _report_recheck(label: str, recheck: dict, strict: bool) -> None:
    """Print the recheck; with `strict` (--tiny: fp32 on CPU, deterministic) any change raises."""
    parts, bad = [], []
    for name in ("sdpa", "layerzero"):
        if name in recheck:
            r = recheck[name]
            parts.append(f"{name} max|diff| {r['max_diff_vs_first_pass']:.3g}"
                         + ("" if r.get("same_kernels", True) else ", other kernels"))
            if r["max_diff_vs_first_pass"] != 0 or not r.get("same_kernels", True):
                bad.append(name)
    if "error" in recheck:
        print(f"  {label}: recheck error: {recheck['error']}")
    if not parts:
        return
    when = "after Liger was applied to the second model" if recheck.get("after_liger") else "after the rounds"
    print(f"  {label}: recheck {when} vs first pass: {'; '.join(parts)}"
          + (f"   WARNING: {', '.join(bad)} changed" if bad else ""))
    if strict and bad:
        raise AssertionError(f"{label}: {', '.join(bad)} changed between first pass and recheck: {recheck}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny fp32 model on CPU (smoke run)")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--variants", nargs="+", default=None, choices=VARIANTS)
    ap.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 5; --tiny 2)")
    ap.add_argument("--iters", type=int, default=None,
                    help="timed forwards per variant per round (default 10; --tiny 2)")
    ap.add_argument("--warmup", type=int, default=None, help="first-pass warm-up forwards (default 5; --tiny 1)")
    ap.add_argument("--rewarm", type=int, default=2, help="forwards before each round's timing")
    ap.add_argument("--json", default="benchmarks/e2e_transformers.json", help="where to write results")
    ap.add_argument("--one", choices=COMPILED, help=argparse.SUPPRESS)            # a +compile child:
    ap.add_argument("--one-shape", choices=list(SHAPES) + ["tiny"], help=argparse.SUPPRESS)   # its shape,
    ap.add_argument("--one-logits", help=argparse.SUPPRESS)                       # where its logits go
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(one_compiled(args.one, args.one_shape, args, args.one_logits)), flush=True)
        return {}
    import transformers

    if args.tiny:
        device, dtype = "cpu", torch.float32
        shapes = {"tiny": TINY}
        args.rounds, args.iters, args.warmup = args.rounds or 2, args.iters or 2, args.warmup or 1
        args.variants = args.variants or [v for v in VARIANTS if v != "flex_attention" and v not in EXPERIMENTS]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs a CUDA GPU (use --tiny for a CPU smoke run)")
        device, dtype = "cuda", torch.bfloat16
        shapes = {k: SHAPES[k] for k in args.shapes}
        args.rounds, args.iters, args.warmup = args.rounds or 5, args.iters or 10, args.warmup or 5
        args.variants = args.variants or [v for v in VARIANTS if v not in EXPERIMENTS]
    args.variants = list(dict.fromkeys(args.variants))
    print(f"e2e prefill on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    result = {"benchmark": "e2e_transformers", "device": device,
              "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
              "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
              "liger_kernel": _version("liger_kernel"), "layerzero": lz.__version__,
              "python": platform.python_version(), "dtype": str(dtype)[6:], "rounds": args.rounds,
              "iters": args.iters, "warmup": args.warmup, "rewarm": args.rewarm, "shapes": []}
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
