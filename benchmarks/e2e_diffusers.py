"""One denoising step of a Flux-shaped transformer: diffusers' attention backends vs LayerZero.

FluxTransformer2DModel with 2 double + 4 single blocks, 24 heads x 128, 4096 image + 512 text
tokens, batch 1, bf16, random weights, on CUDA. Variants (--variants; default all):

  native, _native_cudnn, _native_flash   model.set_attention_backend(name) (skipped if unusable)
  layerzero-backend                      model.set_attention_backend("layerzero"): attention only
  layerzero                              lz.patch(model): attention, q/k RMSNorm, LayerNorms, RoPE
  native+compile                         torch.compile(model) (what diffusers users do to
                                         pipe.transformer)
  layerzero+compile                      lz.patch(model), then torch.compile(model)

The eager variants are switched in place on one model. Each variant is warmed up, then timed in
--rounds rounds that interleave the variants (each round: one re-warm forward, then --iters
forwards; CUDA events, torch.inference_mode); its time is the median over all rounds.
The two +compile variants each run in a process of their own (`--one NAME`, started by this one
after the eager variants are done and their model freed, one after another): one model switched
between variants would share dynamo's caches and LayerZero's module swaps with the others. The
child builds the same model and inputs (same seeds), patches it (layerzero+compile), compiles it
(torch.compile(model, backend=--compile-backend, mode=--compile-mode), default inductor, default
mode), times the first forward (the compile: `compile_s` in the JSON), warms up (--warmup
forwards), then times --rounds x (1 re-warm + --iters) forwards the same way (not interleaved with
the other variants). It reports dynamo's compiled graphs and graph breaks, its output (compared with
native's here) and, for layerzero+compile, the kernels LayerZero picked (lz.metrics() after the
first call). A child that fails is reported (its stderr's tail) and the others go on; the exit
status is then non-zero, after the JSON is written.
Prints each time and its ratio to native (goal for layerzero: <= 0.85), t(layerzero+compile) /
t(native+compile) (goal <= 0.9), the max difference of each output from native's (eager), the
kernels LayerZero ran, and writes JSON (--json PATH).
--tiny: a tiny fp32 model on CPU (a smoke run for tests; no timing claims); the +compile variants
use torch.compile(backend="eager") there (dynamo traces, no inductor: a cold inductor compile of the
tiny model takes minutes on a small CPU) and their two processes run at once; every process
runs one intra-op thread.

    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/e2e_diffusers.py --json $OUT/e2e_diffusers.json
    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/e2e_diffusers.py \\
        --variants native native+compile layerzero+compile --json $OUT/e2e_diffusers_compile.json
"""
from __future__ import annotations

import argparse
import gc
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
from _children import child_result, run_children  # noqa: E402

FULL = dict(layers=2, single_layers=4, heads=24, head_dim=128, image_tokens=4096, text_tokens=512,
            in_channels=64, joint_dim=4096, pooled_dim=768, axes=(16, 56, 56))
TINY = dict(layers=1, single_layers=2, heads=2, head_dim=16, image_tokens=16, text_tokens=8,
            in_channels=8, joint_dim=32, pooled_dim=16, axes=(4, 6, 6))
GOAL = 0.85           # t(layerzero) / t(native)
COMPILE_GOAL = 0.9    # t(layerzero+compile) / t(native+compile)
EAGER = ("native", "_native_cudnn", "_native_flash", "layerzero-backend", "layerzero")
COMPILED = ("native+compile", "layerzero+compile")   # each in a process of its own
VARIANTS = EAGER + COMPILED


def build(cfg: dict, device: str, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device(device):
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=cfg["in_channels"], num_layers=cfg["layers"],
            num_single_layers=cfg["single_layers"], attention_head_dim=cfg["head_dim"],
            num_attention_heads=cfg["heads"], joint_attention_dim=cfg["joint_dim"],
            pooled_projection_dim=cfg["pooled_dim"], guidance_embeds=False, axes_dims_rope=cfg["axes"])
    model = model.to(dtype).eval()
    g = torch.Generator(device="cpu").manual_seed(1)
    n_img, n_txt = cfg["image_tokens"], cfg["text_tokens"]
    side = int(n_img ** 0.5)
    ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(n_img // side), indexing="ij"), -1)
    img_ids = torch.cat([torch.zeros(n_img, 1), ids.reshape(-1, 2).float()], -1)   # (S_img, 3)
    inputs = dict(
        hidden_states=torch.randn(1, n_img, cfg["in_channels"], generator=g),         # (B, S_img, C)
        encoder_hidden_states=torch.randn(1, n_txt, cfg["joint_dim"], generator=g),   # (B, S_txt, D_txt)
        pooled_projections=torch.randn(1, cfg["pooled_dim"], generator=g),
        timestep=torch.tensor([0.5]), img_ids=img_ids, txt_ids=torch.zeros(n_txt, 3))
    inputs = {k: v.to(device=device, dtype=dtype if v.is_floating_point() and k not in ("img_ids", "txt_ids")
                      else v.dtype) for k, v in inputs.items()}
    return model, inputs


def time_ms(step, device: str, iters: int) -> list[float]:
    """Milliseconds of each of `iters` runs of `step()`."""
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def variants(model, names: list) -> dict:
    """name -> (enter, leave): what each eager variant of `names` switches on the one model, and
    back (diffusers' process-wide active backend included)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry as registry

    active = registry._active_backend

    def leave():
        model.reset_attention_backend()
        registry.set_active_backend(active)

    out = {}
    for name in names:
        if name == "layerzero":
            out[name] = (lambda: lz.patch(model), lambda: lz.unpatch(model))
        else:
            backend = "layerzero" if name == "layerzero-backend" else name
            out[name] = (lambda b=backend: model.set_attention_backend(b), leave)
    return out


def run_eager(names: list, cfg: dict, device: str, dtype, warmup: int, iters: int, rounds: int):
    """Time the eager variants `names` on one model; returns (results, outputs) where outputs has
    each variant's output and "native" (computed even when not timed: the +compile variants are
    compared with it)."""
    model, inputs = build(cfg, device, dtype)

    def step():
        with torch.inference_mode():
            return model(**inputs, return_dict=False)[0]

    # Rounds interleave the variants (each round: switch, re-warm, time), so clock and thermal
    # drift hit all alike; each variant's time is the median over all its rounds.
    results, outputs, samples = {}, {}, {}
    plan = variants(model, names)
    for name, (enter, leave) in plan.items():   # first pass: can it run? output, kernels, warm-up
        try:
            got = enter()
            lz.reset_metrics()
            outputs[name] = step()
            results[name] = {}
            if name.startswith("layerzero"):
                m = lz.metrics()
                results[name].update(kernels=m["calls"], fallbacks=m["fallbacks"])
            if name == "layerzero":
                results[name].update(patched=len(got.patched), skipped=len(got.skipped))
            time_ms(step, device, warmup)
            samples[name] = []
        except Exception as e:  # a backend this machine cannot run
            results[name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
        finally:
            leave()
    for _ in range(rounds):
        for name in samples:
            enter, leave = plan[name]
            enter()
            try:
                time_ms(step, device, 1)
                samples[name] += time_ms(step, device, iters)
            finally:
                leave()
    for name, ts in samples.items():
        results[name]["ms"] = statistics.median(ts)
    if "native" not in outputs:   # the reference of the +compile variants
        enter, leave = variants(model, ["native"])["native"]
        enter()
        try:
            outputs["native"] = step()
        finally:
            leave()
    return results, outputs


def one_compiled(name: str, args, out_path: str) -> dict:
    """Child process of a +compile variant: build the model and inputs (same seeds as the parent's),
    patch it (layerzero+compile) and torch.compile it, time the first forward (the compile), warm
    up, time --rounds x --iters forwards; the first forward's output goes to `out_path`."""
    import diffusers
    import torch._dynamo

    diffusers.utils.logging.set_verbosity_error()
    cfg, device, dtype = (TINY, "cpu", torch.float32) if args.tiny else (FULL, "cuda", torch.bfloat16)
    model, inputs = build(cfg, device, dtype)
    report = lz.patch(model) if name == "layerzero+compile" else None
    opts = {"mode": args.compile_mode} if args.compile_mode else {}
    compiled = torch.compile(model, backend=args.compile_backend, **opts)

    def step():
        return compiled(**inputs, return_dict=False)[0]

    torch._dynamo.utils.counters.clear()
    lz.reset_metrics()
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = step()
        if device == "cuda":
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        m = lz.metrics()
        time_ms(step, device, args.warmup)
        samples = []
        for _ in range(args.rounds):
            time_ms(step, device, 1)
            samples += time_ms(step, device, args.iters)
    torch.save(out.float().cpu(), out_path)
    c = torch._dynamo.utils.counters
    res = {"ms": statistics.median(samples), "compile_s": round(compile_s, 2),
           "compile_backend": args.compile_backend, "compile_mode": args.compile_mode,
           "unique_graphs": c["stats"].get("unique_graphs", 0),
           "graph_breaks": sum(c["graph_break"].values()),
           "graph_break_reasons": sorted(c["graph_break"])[:10]}
    if report is not None:
        res.update(kernels=m["calls"], fallbacks=m["fallbacks"], patched=len(report.patched),
                   skipped=len(report.skipped))
    return res


def run_compiled(names: list, args) -> dict:
    """Run each +compile variant of `names` in a child process (see one_compiled); returns name ->
    {"ms", "compile_s", ..., "output"} or {"error", "stderr_tail"}."""
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        cmds = {}
        for n in names:
            cmds[n] = [sys.executable, os.path.abspath(__file__), "--one", n,
                       "--one-out", os.path.join(tmp, f"{n}.pt"), "--rounds", str(args.rounds),
                       "--iters", str(args.iters), "--warmup", str(args.warmup),
                       "--compile-backend", args.compile_backend, "--json", ""]
            cmds[n] += (["--compile-mode", args.compile_mode] if args.compile_mode else []) + \
                (["--tiny"] if args.tiny else [])
        for n, rc, out, err in run_children(cmds, parallel=args.tiny):
            try:
                if rc:
                    raise RuntimeError(f"exit status {rc}: {err.strip().splitlines()[-1] if err.strip() else ''}")
                res[n] = child_result(out)
                res[n]["output"] = torch.load(os.path.join(tmp, f"{n}.pt"))
            except Exception as e:
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                res[n] = {"error": msg, "stderr_tail": err[-3000:]}
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny fp32 model on CPU (smoke run)")
    ap.add_argument("--variants", nargs="+", default=None, choices=VARIANTS,
                    help="which to run (default: all; --tiny: all but _native_cudnn, _native_flash)")
    ap.add_argument("--no-compile", action="store_true", help="skip the +compile variants")
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend of the +compile variants (default inductor; --tiny: eager)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (default: None, its default)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None, help="timed runs per variant per round")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--json", default="benchmarks/e2e_diffusers.json", help="where to write results ('' = nowhere)")
    ap.add_argument("--one", choices=COMPILED, help=argparse.SUPPRESS)      # a +compile child,
    ap.add_argument("--one-out", help=argparse.SUPPRESS)                    # where its output goes
    args = ap.parse_args(argv)
    args.compile_backend = args.compile_backend or ("eager" if args.tiny else "inductor")
    threads = torch.get_num_threads()
    if args.tiny:   # a tiny model: intra-op threads only contend (tens of times slower on a busy CPU)
        torch.set_num_threads(1)
    try:
        if args.one:
            print("RESULT " + json.dumps(one_compiled(args.one, args, args.one_out)), flush=True)
            return {}
        return _main(args)
    finally:
        torch.set_num_threads(threads)


def _main(args) -> dict:
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # "attention backends are experimental", per switch
    if args.tiny:
        cfg, device, dtype = TINY, "cpu", torch.float32
        args.warmup, args.iters, args.rounds = args.warmup or 1, args.iters or 1, args.rounds or 2
        names = args.variants or [v for v in VARIANTS if v not in ("_native_cudnn", "_native_flash")]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("e2e_diffusers needs a CUDA GPU (or --tiny for a CPU smoke run)")
        cfg, device, dtype = FULL, "cuda", torch.bfloat16
        args.warmup, args.iters, args.rounds = args.warmup or 5, args.iters or 5, args.rounds or 5
        names = args.variants or list(VARIANTS)
    names = [n for n in dict.fromkeys(names) if not (args.no_compile and n in COMPILED)]
    warmup, iters, rounds = args.warmup, args.iters, args.rounds

    results, outputs = run_eager([n for n in names if n not in COMPILED], cfg, device, dtype, warmup, iters, rounds)
    outputs = {k: v.float().cpu() for k, v in outputs.items()}
    if device == "cuda":   # the children build their own model: free this one's memory first
        gc.collect()
        torch.cuda.empty_cache()
    compiled = run_compiled([n for n in names if n in COMPILED], args)
    failed = []
    for name, c in compiled.items():
        if "error" in c:
            failed.append(name)
            results[name] = {k: c[k] for k in ("error", "stderr_tail")}
        else:
            outputs[name] = c.pop("output")
            results[name] = c
    results = {n: results[n] for n in names if n in results}

    base = results.get("native", {}).get("ms")
    base_c = results.get("native+compile", {}).get("ms")
    ref = outputs.get("native")
    print(f"Flux-shaped transformer step: {cfg['layers']} double + {cfg['single_layers']} single blocks, "
          f"{cfg['heads']}x{cfg['head_dim']} heads, {cfg['image_tokens']}+{cfg['text_tokens']} tokens, "
          f"{str(dtype)[6:]}, {device}")
    for name, r in results.items():
        if "error" in r:
            if name in COMPILED:
                print(f"  {name:<18} error: {r['error']}\n{r['stderr_tail']}")
            else:
                print(f"  {name:<18} unavailable: {r['error']}")
            continue
        if base:
            r["ratio"] = round(r["ms"] / base, 3)
        if base_c and name in COMPILED:
            r["ratio_vs_native_compile"] = round(r["ms"] / base_c, 3)
        if ref is not None and name in outputs:
            r["max_abs_diff_vs_native"] = (outputs[name] - ref).abs().max().item()
        r["ms"] = round(r["ms"], 3)
        extra = ""
        if name in COMPILED:
            extra = (f"   compile {r['compile_s']} s ({r['compile_backend']}"
                     f"{', mode ' + r['compile_mode'] if r['compile_mode'] else ''}), "
                     f"{r['unique_graphs']} graphs, {r['graph_breaks']} graph breaks")
        print(f"  {name:<18} {r['ms']:9.3f} ms   x{r.get('ratio', float('nan')):.3f} of native   "
              f"max|diff| {r.get('max_abs_diff_vs_native', float('nan')):.3g}{extra}")
    for name in ("layerzero", "layerzero+compile"):
        r = results.get(name, {})
        if "kernels" in r:
            print(f"  {name} kernels: {r['kernels']}"
                  f"{'  fallbacks: ' + str(r['fallbacks']) if r['fallbacks'] else ''}")
    if "ratio" in results.get("layerzero", {}):
        print(f"ratio t(layerzero)/t(native) = {results['layerzero']['ratio']:.3f}  (goal <= {GOAL})")
    compile_ratio = results.get("layerzero+compile", {}).get("ratio_vs_native_compile")
    if compile_ratio is not None:
        print(f"ratio t(layerzero+compile)/t(native+compile) = {compile_ratio:.3f}  (goal <= {COMPILE_GOAL})")

    result = {"benchmark": "e2e_diffusers", "config": {**cfg, "axes": list(cfg["axes"])},
              "dtype": str(dtype)[6:], "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "tiny": args.tiny, "warmup": warmup, "iters": iters, "rounds": rounds, "variants": names,
              "results": results, "goal": GOAL, "compile_ratio": compile_ratio, "compile_goal": COMPILE_GOAL,
              "compile_backend": args.compile_backend, "compile_mode": args.compile_mode,
              "torch": torch.__version__, "diffusers": diffusers.__version__,
              "python": platform.python_version()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if failed:
        raise SystemExit(f"e2e_diffusers: {', '.join(failed)} failed (see above)")
    return result


if __name__ == "__main__":
    main()
