"""Speculative decoding: lz.speculative_generate against plain greedy decoding and transformers'
assisted decoding (assistant_model=), on a trained draft/target pair and on the 1B-shaped llama.

Part 1, the trained pair (scripts/train_draft_pair.py: a ~25M 16-layer target and a ~3.2M 1-layer draft, byte-level,
trained on the Python standard library; --pair DIR, default ~/.cache/layerzero/draft_pair; --train
trains it first when it is missing, a few minutes). Prompts: --prompt bytes from held-out stdlib
files (`train_draft_pair.prompts`), --new new tokens, greedy, eos_token_id=None (every call makes
--new tokens), --dtype (default float32: in bf16 the verify forward, k + 1 tokens at once, rounds
otherwise than plain decoding, one token at a time, and greedy tokens part at near-ties: H200,
7 of 8 rows equal plain greedy's at batch 8 for the pair in bf16, 8 of 8 in fp32; in fp32 `same`
checks correctness). Variants per batch (--batch, default 1 8):
  plain        target.generate(do_sample=False) (transformers' eager loop, DynamicCache)
  assisted     target.generate(assistant_model=draft) with transformers' defaults (its heuristic
               schedule from 20 draft tokens); batch 1 only (transformers' assisted decoding takes one row)
  lz-eager     lz.speculative_generate(target, draft, num_draft_tokens=--k, lz_patch=False) with its
               CUDA graphs off (`speculative.graphs.ENABLED`): the eager loop, unpatched models
  lz           lz.speculative_generate(target, draft, num_draft_tokens=--k, default schedule): both
               models lz.patch-ed, each step (k draft forwards + verify) one CUDA graph per k
  lz-lookup    lz.speculative_generate(target, None, prompt_lookup=3) (no draft model), graphed
The unpatched variants run first; after each batch size lz.unpatch puts the models back.
Part 2, the 1B-shaped llama of benchmarks/e2e_transformers.py (hidden 2048, 16 layers, 32/8 heads,
intermediate 8192, vocab 128256; random weights, sdpa) with `OracleDraft`, a synthetic draft whose
acceptance is set: it proposes the target's greedy token (read off the plain greedy output of the
same prompts) with probability alpha, else a uniformly random token, at the cost of a forward of
--draft-layers llama layers of the target's width (MLP width --draft-intermediate, default the
target's; no output projection). Prompts of --prompt
random tokens; alpha in --alphas (0.5 0.8 0.95), batch 1 and 8; variants plain, lz-generate
(lz.generate(target): plain greedy, compiled and CUDA-graphed, LayerZero without a draft) and lz
(graphed). --dtype-1b, default --dtype (float32): random weights give near-ties in the logits, and in
bf16 the verify forward (k+1 tokens at once) picks another greedy token than plain decoding (one
token at a time) within a few tokens; past that point the oracle is stale and acceptance falls
far below alpha (H200, bf16: 0.04-0.15 measured at alpha 0.5-0.95). In fp32 both agree; the
measured acceptance is printed next to alpha, and so is the acceptance schedule's estimate of the
draft's cost (`SpeculativeStats.draft_cost`). The measure for the issue's "draft costing <= 1/10
of the target" is `graphed_cost_ratio` (batch 1): a one-token forward of each model with a filled
static cache, patched and fused as the loop runs them, replayed from a CUDA graph: draft / target
(JSON: draft_cost_graphed). Printed beside it: the eager ratio of the same forwards (host-bound;
JSON: draft_cost_ratio) and `loop_draft_cost` (alpha 0.8): graphed steps at constant k = 1 and 8,
a further k's step time over the rest of the step (JSON: loop_cost), which adds to the draft's
forward the verify's extra column and the step's per-token bookkeeping.

Timing: the first WARMUPS (2) calls of each variant and config are warm-ups (compiling,
capturing: the acceptance schedule carries its estimates from call to call, so the second call
may pick, and capture, a k the first did not; their seconds are in the JSON as warmup_s); then
--iters calls, each timed alone (torch.cuda.synchronize() before and after), median. tok/s =
batch * new / seconds; speedup = tok/s / tok/s(plain) of the same config. Acceptance rate and
tokens per target forward come from SpeculativeStats; `same` counts rows whose tokens equal plain
greedy's. Goals printed at the end: trained pair lz >= 1.5x assisted (batch 1); 1B lz >= 2x
plain at alpha 0.8 batch 1; 1B lz > 1x plain at alpha 0.8 batch 8 (plain: transformers' eager
greedy; lz-generate's ratio is printed beside it); the 1B draft's forward <= 0.1 of the target's
(graphed, batch 1). Writes --json.

    PYTHONPATH=$PWD python benchmarks/speculative.py --train --json $OUT/speculative.json
--tiny: CPU, fp32, a pair trained by `train_draft_pair.py --tiny` into a temporary directory, the
tiny llama of e2e_transformers.py for part 2, 16 new tokens, 1 iteration, one CPU thread: a smoke run
(about 15 s) that checks every lz variant's tokens equal plain greedy's (fp32) and makes no timing claim.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import types

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "scripts"))
import e2e_transformers as E  # noqa: E402
import train_draft_pair as TP  # noqa: E402

import layerzero as lz  # noqa: E402
from layerzero.speculative import SpeculativeStats, speculative_generate  # noqa: E402
from layerzero.speculative import graphs as spec_graphs  # noqa: E402

# name -> (comparison, bound); 1b_draft_cost is the premise for the 1B goals (a draft costing
# <= 1/10 of the target): one-token forwards replayed from CUDA graphs as the loop runs them, draft / target
GOALS = {"pair_vs_assisted_b1": (">=", 1.5), "1b_alpha0.8_b1": (">=", 2.0), "1b_alpha0.8_b8": (">", 1.0),
         "1b_draft_cost": ("<=", 0.1)}
_MET = {">=": lambda v, g: v >= g, ">": lambda v, g: v > g, "<=": lambda v, g: v <= g}


class OracleDraft(torch.nn.Module):
    """A synthetic draft for `target`: the token after position t is, with probability `alpha`,
    oracle[row, t + 1] (the target's greedy continuation; rows without padding, so positions are
    indices), else a uniformly random token. Its cost is a real forward of `layers` llama decoder
    layers of the target's shape with a cache; the logits are one-hot (no output projection)."""

    def __init__(self, target, oracle: torch.Tensor, alpha: float, layers: int = 1, seed: int = 0,
                 intermediate: int | None = None):
        super().__init__()
        import transformers as T

        cfg = copy.deepcopy(target.config)
        cfg.num_hidden_layers = layers
        if intermediate:
            cfg.intermediate_size = intermediate
        p = next(target.parameters())
        torch.manual_seed(seed)
        with torch.device(p.device):
            self.body = T.LlamaModel._from_config(cfg, dtype=p.dtype).eval()
        self.config = cfg
        self.generation_config = copy.deepcopy(target.generation_config)
        self.oracle, self.alpha, self.vocab = oracle, alpha, cfg.vocab_size

    def get_output_embeddings(self):
        return None

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                logits_to_keep=0, **kwargs):
        self.body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  cache=cache, use_cache=use_cache)
        keep = logits_to_keep or input_ids.shape[1]
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        nxt = (position_ids[:, -keep:] + 1).clamp(max=self.oracle.shape[1] - 1)
        truth = self.oracle.gather(1, nxt)
        # the default generator: CUDA graphs capture its draws (a generator of its own would
        # have to be registered with each graph)
        rand = torch.randint(self.vocab, truth.shape, device=truth.device)
        coin = torch.rand(truth.shape, device=truth.device) < self.alpha
        tok = torch.where(coin, truth, rand)
        logits = torch.zeros(*tok.shape, self.vocab, device=tok.device).scatter_(2, tok[..., None], 1.0)
        return types.SimpleNamespace(logits=logits)


WARMUPS = 2


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, iters: int, warmups: int = WARMUPS):
    """(last result, [seconds of each timed call], [seconds of each warm-up call])."""
    times, out = [], None
    for _ in range(warmups + iters):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return out, times[warmups:], times[:warmups]


def run_variant(name, fn, plain_tokens, batch, new, device, iters, prompt_len) -> dict:
    stats_box = {}

    def call():
        st = SpeculativeStats()
        stats_box["s"] = st
        return fn(st)

    out, times, warm = timed(call, device, iters)
    sec = statistics.median(times)
    st = stats_box["s"]
    toks = out[:, prompt_len:]
    row = {"variant": name, "batch": batch, "new_tokens": new, "seconds": [round(t, 4) for t in times],
           "median_s": round(sec, 4), "tok_per_s": round(batch * new / sec, 2),
           "warmup_s": [round(t, 3) for t in warm]}
    if st.target_forwards:
        row.update(acceptance=round(st.acceptance_rate, 4),
                   tokens_per_target_forward=round(st.tokens_per_target_forward, 3),
                   target_forwards=st.target_forwards, draft_forwards=st.draft_forwards,
                   mean_k=round(statistics.mean(st.draft_lengths), 2) if st.draft_lengths else 0, holes=st.holes)
        if st.draft_cost is not None:
            row["draft_cost"] = round(st.draft_cost, 4)
    if plain_tokens is not None:
        row["same"] = int((toks == plain_tokens).all(1).sum())
    row["tokens_shape"] = list(toks.shape)
    return row, toks


def fmt(r: dict, plain_tps: float | None) -> str:
    speed = f"{r['tok_per_s'] / plain_tps:5.2f}x plain" if plain_tps else ""
    extra = ""
    if "acceptance" in r:
        extra = (f"accept {r['acceptance']:.3f}  tok/fwd {r['tokens_per_target_forward']:.2f}  "
                 f"mean k {r['mean_k']}")
        if "draft_cost" in r:
            extra += f"  draft cost {r['draft_cost']:.3f}"
    same = f"same {r['same']}/{r['batch']}" if "same" in r else ""
    alpha = f"alpha {r['alpha']:<4} " if "alpha" in r else ""
    return (f"  {r['variant']:<12} {alpha}b{r['batch']:<2} {r['tok_per_s']:9.1f} tok/s "
            f"{r['median_s'] * 1e3:9.1f} ms  {speed:>12}  {extra}  {same}")


def part_pair(args, device, dtype) -> dict:
    import transformers

    pair_dir = args.pair
    if args.tiny:
        tmp = tempfile.TemporaryDirectory(prefix="lz_draft_pair_")
        pair_dir = tmp.name
        TP.main(["--tiny", "--out", pair_dir])
    elif not os.path.exists(os.path.join(pair_dir, "target")):
        if not args.train:
            raise SystemExit(f"no trained pair in {pair_dir}: pass --train, or run "
                             f"python scripts/train_draft_pair.py --out {pair_dir}")
        TP.main(["--out", pair_dir])
    target, draft = TP.load_pair(pair_dir, device, dtype)
    meta_path = os.path.join(pair_dir, "meta.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    if args.tiny:
        tmp.cleanup()
    res = {"pair": pair_dir, "meta": {k: meta.get(k) for k in ("target", "draft", "data", "tiny")},
           "transformers": transformers.__version__, "rows": []}
    print(f"\ntrained pair ({pair_dir}): target {sum(p.numel() for p in target.parameters()) / 1e6:.1f}M, "
          f"draft {sum(p.numel() for p in draft.parameters()) / 1e6:.1f}M, {dtype}, prompt {args.prompt} "
          f"bytes, {args.new} new tokens", flush=True)
    for batch in args.batch:
        ids = TP.prompts(batch, args.prompt, seed=batch, limit=40 if args.tiny else None).to(device)
        mask = torch.ones_like(ids)
        gen = dict(attention_mask=mask, max_new_tokens=args.new, do_sample=False, eos_token_id=None,
                   pad_token_id=TP.PAD)
        # unpatched variants first; the lz variants patch the models (lz.unpatch after each batch)
        variants = {"plain": lambda st: target.generate(ids, **gen)}
        if batch == 1:
            variants["assisted"] = lambda st: target.generate(ids, assistant_model=draft, **gen)
        variants["lz-eager"] = lambda st: eager(speculative_generate, target, draft, ids, num_draft_tokens=args.k,
                                                stats=st, lz_patch=False, **gen)
        variants["lz"] = lambda st: speculative_generate(target, draft, ids, num_draft_tokens=args.k, stats=st,
                                                         **gen)
        variants["lz-lookup"] = lambda st: speculative_generate(target, None, ids, prompt_lookup=3,
                                                                num_draft_tokens=args.k, stats=st, **gen)
        plain_tokens = plain_tps = None
        for name, fn in variants.items():
            row, toks = run_variant(name, fn, plain_tokens, batch, args.new, device, args.iters, args.prompt)
            if name == "plain":
                plain_tokens, plain_tps = toks, row["tok_per_s"]
            res["rows"].append(row)
            print(fmt(row, plain_tps if name != "plain" else None), flush=True)
        lz.unpatch(target)
        lz.unpatch(draft)
    return res


def eager(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` with lz.speculative_generate's CUDA graphs off (its eager loop)."""
    old, spec_graphs.ENABLED = spec_graphs.ENABLED, False
    try:
        return fn(*args, **kwargs)
    finally:
        spec_graphs.ENABLED = old


def part_1b(args, device, dtype) -> dict:
    dtype = getattr(torch, args.dtype_1b) if args.dtype_1b else dtype
    shape = E.TINY if args.tiny else E.SHAPES["1b"]
    target = E.build(shape, device, dtype)
    res = {"model": "tiny" if args.tiny else "1b", "draft_layers": args.draft_layers, "draft_intermediate": args.draft_intermediate, "rows": [],
           "shape": {k: v for k, v in shape.items() if k not in ("tokens", "goal")}}
    print(f"\n{res['model']} llama target (random weights, sdpa, {dtype}), synthetic draft of "
          f"{args.draft_layers} layer(s); prompt {args.prompt} random tokens, {args.new} new tokens", flush=True)
    for batch in args.batch:
        g = torch.Generator(device=device).manual_seed(batch)
        ids = torch.randint(3, shape["vocab_size"], (batch, args.prompt), device=device, generator=g)
        gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.new, do_sample=False,
                   eos_token_id=None, pad_token_id=0)
        row, plain_tokens = run_variant("plain", lambda st: target.generate(ids, **gen), None, batch,
                                        args.new, device, args.iters, args.prompt)
        res["rows"].append(row)
        plain_tps = row["tok_per_s"]
        print(fmt(row, None), flush=True)
        oracle = torch.cat([ids, plain_tokens], 1)
        if not args.tiny and not args.no_lz_generate:   # LayerZero's plain greedy decoding (compiled, CUDA-graphed): the bar to beat
            row, _ = run_variant("lz-generate", lambda st: lz.generate(target, ids, **gen), plain_tokens, batch,
                                 args.new, device, args.iters, args.prompt)
            row["speedup"] = round(row["tok_per_s"] / plain_tps, 3)
            res["rows"].append(row)
            print(fmt(row, plain_tps), flush=True)
        if batch == args.batch[0]:
            probe = OracleDraft(target, oracle, 1.0, args.draft_layers, intermediate=args.draft_intermediate)
            res["draft_cost_ratio"] = round(cost_ratio(target, probe, ids, device), 4)
            print(f"  draft / target forward time (one token, cached, eager): {res['draft_cost_ratio']:.3f}", flush=True)
            try:
                res["draft_cost_graphed"] = round(graphed_cost_ratio(target, probe, ids, device), 4)
                print(f"  draft / target forward time (one token, cached, CUDA graph on CUDA, patched as in the loop): "
                      f"{res['draft_cost_graphed']:.3f}", flush=True)
            except Exception as exc:  # noqa: BLE001 - recorded; the goal then reads as not met
                res["draft_cost_graphed_error"] = f"{type(exc).__name__}: {exc}"[:300]
                print(f"  graphed draft / target cost: {res['draft_cost_graphed_error']}", flush=True)
            del probe
        for alpha in args.alphas:
            draft = OracleDraft(target, oracle, alpha, args.draft_layers, intermediate=args.draft_intermediate)

            def spec(st, draft=draft):
                return speculative_generate(target, draft, ids, num_draft_tokens=args.k, stats=st, **gen)

            row, _ = run_variant("lz", spec, plain_tokens, batch, args.new, device, args.iters, args.prompt)
            row["alpha"] = alpha
            row["speedup"] = round(row["tok_per_s"] / plain_tps, 3)
            if alpha == 0.8:
                row["loop_cost"] = loop_draft_cost(target, draft, ids, gen)
            res["rows"].append(row)
            print(fmt(row, plain_tps), flush=True)
            if "loop_cost" in row:
                steps = ", ".join(f"k={k}: {t * 1e3:.2f} ms" for k, t in row["loop_cost"]["step_s"].items())
                print(f"    graphed step at constant k: {steps}; a draft token / the rest of a step: "
                      f"{row['loop_cost']['draft_cost']:.3f}", flush=True)
            del spec, draft
        lz.unpatch(target)
    return res


@torch.no_grad()
def cost_ratio(target, draft, ids, device, n: int = 20) -> float:
    """Median time of a one-token forward with a filled cache: draft / target."""
    from transformers.cache_utils import DynamicCache

    def per_token(model):
        cache = DynamicCache()
        model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        tok = ids[:, -1:]
        times = []
        for i in range(n + 3):
            pos = torch.full_like(tok, ids.shape[1] + i)
            sync(device)
            t0 = time.perf_counter()
            model(input_ids=tok, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1)
            sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[3:])

    return per_token(draft) / per_token(target)


@torch.no_grad()
def graphed_cost_ratio(target, draft, ids, device, n: int = 30) -> float:
    """Time of a one-token forward with a filled static cache, as the graphed loop runs it (the
    models lz.patch-ed and their sibling projections fused by `graphs.prepare`, a full-length
    mask, replayed from a CUDA graph; eager on the CPU): draft / target. lz.unpatch after."""
    from transformers.cache_utils import StaticCache

    spec_graphs.prepare(target, draft)
    b, p = ids.shape
    cap = p + n + 16

    def per_token(model):
        cache = StaticCache(config=model.config, max_cache_len=cap)
        mask = torch.ones(b, cap, dtype=torch.long, device=ids.device)
        model(input_ids=ids, attention_mask=mask[:, :p], cache=cache, use_cache=True, logits_to_keep=1)
        kw = dict(input_ids=ids[:, -1:].clone(), position_ids=torch.full((b, 1), p, device=ids.device),
                  attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
        if device != "cuda":
            sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                model(**kw)
            return (time.perf_counter() - t0) / n
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                model(**kw)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(**kw)
        graph.replay()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            graph.replay()
        sync(device)
        return (time.perf_counter() - t0) / n

    try:
        return per_token(draft) / per_token(target)
    finally:
        lz.unpatch(draft)
        lz.unpatch(target)


@torch.no_grad()
def loop_draft_cost(target, draft, ids, gen, ks=(1, 8)) -> dict:
    """The draft's cost where it runs, in the loop's graphed steps: the median host time of a step
    at constant k for each k in `ks` (two calls each, the first captures; a call's steps of that
    k after its first), a line a0 + b k through them; draft_cost = b / a0, a draft token's time
    over the rest of a step (the verify forward, acceptance, bookkeeping)."""
    step = {}
    for k in ks:
        for _ in range(2):
            st = SpeculativeStats()
            speculative_generate(target, draft, ids, num_draft_tokens=k, max_draft_tokens=max(ks),
                                 draft_schedule="constant", stats=st, **gen)
        times = [t for t, kk in zip(st.step_seconds[1:], st.draft_lengths[1:]) if kk == k]
        step[k] = statistics.median(times)
    lo, hi = min(ks), max(ks)
    b = (step[hi] - step[lo]) / (hi - lo)
    a0 = step[lo] - b * lo
    return {"step_s": {k: round(t, 6) for k, t in step.items()}, "draft_cost": round(b / a0, 4)}


def goals(result: dict) -> dict:
    out = {}
    pair = {(r["variant"], r["batch"]): r for r in result["pair"]["rows"]}
    if ("lz", 1) in pair and ("assisted", 1) in pair:
        out["pair_vs_assisted_b1"] = round(pair["lz", 1]["tok_per_s"] / pair["assisted", 1]["tok_per_s"], 3)
    if "draft_cost_graphed" in result["1b"]:
        out["1b_draft_cost"] = result["1b"]["draft_cost_graphed"]
    for r in result["1b"]["rows"]:
        if r.get("alpha") == 0.8:
            out[f"1b_alpha0.8_b{r['batch']}"] = r["speedup"]
    return {k: {"value": v, "goal": GOALS[k][1], "cmp": GOALS[k][0], "met": _MET[GOALS[k][0]](v, GOALS[k][1])}
            for k, v in out.items() if k in GOALS}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", default=str(TP.DEFAULT_OUT), help="the trained pair's directory")
    ap.add_argument("--train", action="store_true", help="train the pair first when --pair holds none")
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128; --tiny 16)")
    ap.add_argument("--new", type=int, default=None, help="new tokens (default 128; --tiny 16)")
    ap.add_argument("--k", type=int, default=4, help="num_draft_tokens (the first step's; the schedule adapts it)")
    ap.add_argument("--alphas", nargs="+", type=float, default=[0.5, 0.8, 0.95])
    ap.add_argument("--draft-layers", type=int, default=1)
    ap.add_argument("--draft-intermediate", type=int, default=None,
                    help="the 1B part's draft: MLP width of its layers (default: the target's)")
    ap.add_argument("--iters", type=int, default=None, help="timed calls per variant (default 3; --tiny 1)")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default float32 (see the docstring)")
    ap.add_argument("--parts", nargs="+", default=["pair", "1b"], choices=["pair", "1b"])
    ap.add_argument("--dtype-1b", default=None, choices=["bfloat16", "float16", "float32"],
                    help="the 1B part's dtype (default: --dtype)")
    ap.add_argument("--no-lz-generate", action="store_true", help="leave the 1B part's lz-generate variant out")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run (tiny models, fp32)")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    args.prompt = args.prompt or (16 if args.tiny else 128)
    args.new = args.new or (16 if args.tiny else 128)
    args.iters = args.iters or (1 if args.tiny else 3)
    args.dtype = args.dtype or "float32"
    if args.tiny:   # one thread: tiny models gain nothing from more, and lose a lot on a busy machine
        torch.set_num_threads(1)
        args.batch = [b for b in args.batch if b <= 2] or [1]
        args.batch = sorted(set(args.batch + [1]))
        device = "cpu"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs CUDA (or --tiny)")
        device = "cuda"
    dtype = getattr(torch, args.dtype)
    import transformers

    result = {"benchmark": "speculative", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__, "dtype": args.dtype,
              "tiny": args.tiny, "iters": args.iters, "k": args.k, "prompt": args.prompt, "new": args.new}
    print(f"speculative decoding on {result['device']}, torch {result['torch']}, transformers "
          f"{result['transformers']}, {args.dtype}", flush=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        result["pair"] = part_pair(args, device, dtype) if "pair" in args.parts else {"rows": []}
        result["1b"] = part_1b(args, device, dtype) if "1b" in args.parts else {"rows": []}
    result["goals"] = goals(result)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print("\ngoals" + (" (CPU smoke run: not meaningful)" if args.tiny else "") + ":")
    for k, v in result["goals"].items():
        unit = "" if k == "1b_draft_cost" else "x"
        print(f"  {k:<22} {v['value']:6.3f}{unit}  goal {v['cmp']} {v['goal']}{unit}  "
              f"{'met' if v['met'] else 'NOT met'}")
    if args.tiny:   # fp32: speculative greedy must be the target's greedy
        bad = [r for part in ("pair", "1b") for r in result[part]["rows"]
               if r["variant"].startswith("lz") and r.get("same") != r["batch"]]
        if bad:
            raise SystemExit(f"--tiny: lz tokens differ from plain greedy: {bad}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
