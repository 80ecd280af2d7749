"""One denoising step of a Flux-shaped transformer: diffusers' attention backends vs LayerZero.

FluxTransformer2DModel with 2 double + 4 single blocks, 24 heads x 128, 4096 image + 512 text
tokens, batch 1, bf16, random weights, on CUDA. Variants, timed in one run on the same model:

  native, _native_cudnn, _native_flash   model.set_attention_backend(name) (skipped if unusable)
  layerzero-backend                      model.set_attention_backend("layerzero"): attention only
  layerzero                              lz.patch(model): attention, q/k RMSNorm, LayerNorms, RoPE

Each variant is warmed up, then timed in --rounds rounds that interleave the variants (--iters
forwards each, CUDA events, torch.inference_mode); its time is the median over all rounds.
Prints each time and its ratio to native (goal for layerzero: <= 0.85), the max difference of
each output from native's, the kernels LayerZero ran, and writes JSON (--json PATH).
--tiny: a tiny fp32 model on CPU (a smoke run for tests; no timing claims).

    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/e2e_diffusers.py --json $OUT/e2e_diffusers.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import layerzero as lz

FULL = dict(layers=2, single_layers=4, heads=24, head_dim=128, image_tokens=4096, text_tokens=512,
            in_channels=64, joint_dim=4096, pooled_dim=768, axes=(16, 56, 56))
TINY = dict(layers=1, single_layers=2, heads=2, head_dim=16, image_tokens=16, text_tokens=8,
            in_channels=8, joint_dim=32, pooled_dim=16, axes=(4, 6, 6))
GOAL = 0.85


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


def variants(model, tiny: bool) -> dict:
    """name -> (enter, leave): what each variant switches on the one model, and back (diffusers'
    process-wide active backend included)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry as registry

    active = registry._active_backend

    def leave():
        model.reset_attention_backend()
        registry.set_active_backend(active)

    out = {}
    for name in (["native"] if tiny else ["native", "_native_cudnn", "_native_flash"]) + ["layerzero-backend"]:
        backend = "layerzero" if name == "layerzero-backend" else name
        out[name] = (lambda b=backend: model.set_attention_backend(b), leave)
    out["layerzero"] = (lambda: lz.patch(model), lambda: lz.unpatch(model))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny fp32 model on CPU (smoke run)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None, help="timed runs per variant per round")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--json", default="benchmarks/e2e_diffusers.json", help="where to write results ('' = nowhere)")
    args = ap.parse_args(argv)

    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # "attention backends are experimental", per switch
    if args.tiny:
        cfg, device, dtype = TINY, "cpu", torch.float32
        warmup, iters, rounds = args.warmup or 1, args.iters or 1, args.rounds or 2
    else:
        if not torch.cuda.is_available():
            raise SystemExit("e2e_diffusers needs a CUDA GPU (or --tiny for a CPU smoke run)")
        cfg, device, dtype = FULL, "cuda", torch.bfloat16
        warmup, iters, rounds = args.warmup or 5, args.iters or 5, args.rounds or 5
    model, inputs = build(cfg, device, dtype)

    def step():
        with torch.inference_mode():
            return model(**inputs, return_dict=False)[0]

    # Rounds interleave the variants (each round: switch, re-warm, time), so clock and thermal
    # drift hit all alike; each variant's time is the median over all its rounds.
    results, outputs, samples = {}, {}, {}
    plan = variants(model, args.tiny)
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

    base = results["native"].get("ms")
    ref = outputs.get("native")
    print(f"Flux-shaped transformer step: {cfg['layers']} double + {cfg['single_layers']} single blocks, "
          f"{cfg['heads']}x{cfg['head_dim']} heads, {cfg['image_tokens']}+{cfg['text_tokens']} tokens, "
          f"{str(dtype)[6:]}, {device}")
    for name, r in results.items():
        if "error" in r:
            print(f"  {name:<18} unavailable: {r['error']}")
            continue
        if base:
            r["ratio"] = round(r["ms"] / base, 3)
        if ref is not None and name in outputs:
            r["max_abs_diff_vs_native"] = (outputs[name].float() - ref.float()).abs().max().item()
        r["ms"] = round(r["ms"], 3)
        print(f"  {name:<18} {r['ms']:9.3f} ms   x{r.get('ratio', float('nan')):.3f} of native   "
              f"max|diff| {r.get('max_abs_diff_vs_native', float('nan')):.3g}")
    print(f"  layerzero kernels: {results['layerzero']['kernels']}"
          f"{'  fallbacks: ' + str(results['layerzero']['fallbacks']) if results['layerzero']['fallbacks'] else ''}")
    if "ratio" in results["layerzero"]:
        print(f"ratio t(layerzero)/t(native) = {results['layerzero']['ratio']:.3f}  (goal <= {GOAL})")

    result = {"benchmark": "e2e_diffusers", "config": {**cfg, "axes": list(cfg["axes"])},
              "dtype": str(dtype)[6:], "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "tiny": args.tiny, "warmup": warmup, "iters": iters, "rounds": rounds, "results": results, "goal": GOAL,
              "torch": torch.__version__, "diffusers": diffusers.__version__,
              "python": platform.python_version()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
