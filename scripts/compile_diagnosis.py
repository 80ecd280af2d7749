"""Why does lz.patch slow transformers' compiled / static-cache generate()? A CPU diagnosis.

Runs each variant in its own subprocess (no module-level state leaks between them) with
TORCH_LOGS="recompiles,graph_breaks", on a tiny random Llama (fp32, CPU, nothing downloaded),
and prints per variant: whether generate()'s auto-compile engaged, graph breaks with their
reasons, recompiles with the failing guards, the number of compiled frames (dynamo's
unique_graphs), and the ops of the captured graphs that matter for CUDA graphs / speed.

Variants
  gen_plain         transformers sdpa, generate(cache_implementation="static"), auto-compile
  gen_patched       lz.patch(model), same (CPU kernel decisions: decode attention -> torch.sdpa)
  gen_patched_h200  lz.patch(model) with the attention decision the H200 makes for a static-cache
                    decode step (Sq=1 with transformers' bool mask -> torch.flex, emulated on CPU by
                    lz.lock("attention", "torch.flex", seq_len_q=1))
  gen_patched_h200_16l  the same with 16 decoder layers (the 1B model has 16)
  gen_plain_2prompts / gen_patched_2prompts
                    three generate() calls: prompt of PROMPT tokens twice, then PROMPT + 1
  tc_plain / tc_patched / tc_patched_h200
                    torch.compile(model, fullgraph=True) driven by hand over a StaticCache:
                    one prefill + DECODE_STEPS decode steps (an eager reference forward runs
                    between the compiled prefill and the first decode step)
  tc_plain_dynamic / tc_patched_dynamic
                    the same with dynamic=True
  decisions         the kernels LayerZero would pick on an H200 (sm90, bf16) for the shapes of
                    the benchmark (1B llama, 128 prompt, static cache of 256) -- selection only

generate()'s auto-compile needs a CUDA device unless `compile_config._compile_all_devices` is
set; it is set here with backend="eager" (a 2-core CPU can't afford inductor), mode=None.

    .venv/bin/python scripts/compile_diagnosis.py            # all variants (~2-3 min)
    .venv/bin/python scripts/compile_diagnosis.py gen_patched_h200   # one variant, raw log too
"""
from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PROMPT, NEW_TOKENS, DECODE_STEPS = 8, 12, 10
VARIANTS = ("gen_plain", "gen_patched", "gen_patched_h200", "gen_patched_h200_16l", "gen_plain_2prompts",
            "gen_patched_2prompts", "tc_plain", "tc_patched", "tc_patched_h200", "tc_plain_dynamic",
            "tc_patched_dynamic", "gen_patched_h200_16l_fixflex", "gen_patched_2prompts_fixobserve",
            "decisions")
INTERESTING = re.compile(r"any|masked_fill|item|_local_scalar|nonzero|tolist|empty|zeros|ones|full|"
                         r"arange|tensor|flex|custom|layerzero|expand|contiguous|copy|addmm")


# ---- child side ---------------------------------------------------------------------------------

def _candidate_fixes(variant: str) -> None:
    """Runtime stand-ins for two proposed fixes (the repository is not edited), to check them."""
    import torch
    if "fixflex" in variant:       # torch_flex.flex: under tracing, no nested torch.compile
        from layerzero.backends import torch_flex
        real = torch_flex._compiled

        def _compiled(config):
            if torch.compiler.is_compiling():
                return torch_flex._run_flex     # the outer compile traces flex_attention itself
            return real(config)
        torch_flex._compiled = _compiled
    if "fixobserve" in variant:    # patch.observe: decide "compiling?" before reading the module
        import importlib
        patch = importlib.import_module("layerzero.patch")   # (layerzero.patch is the function)
        from layerzero import patch_residual
        from layerzero.integrations import transformers as hf

        def observe(module, key):
            if torch.compiler.is_compiling():
                return
            seen = module.__dict__.get("_lz_seen")
            if seen is not None:
                seen.add(key)
        patch.observe = patch_residual.observe = hf.observe = observe


def _model(patched: bool, h200_attention: bool, layers: int = 2):
    import torch
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = T.LlamaForCausalLM(cfg).eval()
    if patched:
        import layerzero as lz
        _candidate_fixes(os.environ.get("DIAG_VARIANT", ""))
        rep = lz.patch(model)
        print(f"CHILD lz.patch: {len(rep.patched)} patched, {len(rep.skipped)} skipped", flush=True)
        if h200_attention:
            lz.lock("attention", "torch.flex", seq_len_q=1)
    return model


class Recorder:
    """A dynamo backend that runs graphs eagerly and keeps what each captured graph calls."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        ops = collections.Counter()
        for n in gm.graph.nodes:
            if n.op in ("call_function", "call_method"):
                ops[getattr(n.target, "__name__", str(n.target))] += 1
        self.graphs.append(ops)
        return gm.forward


def _counters():
    from torch._dynamo.utils import counters
    return {"unique_graphs": counters["stats"].get("unique_graphs", 0),
            "calls_captured": counters["stats"].get("calls_captured", 0),
            "graph_break_counter": {k.splitlines()[0][:160]: v for k, v in counters["graph_break"].items()}}


def _graph_summary(rec: Recorder) -> list:
    out = []
    for ops in rec.graphs:
        interesting = {k: v for k, v in sorted(ops.items()) if INTERESTING.search(k)}
        out.append({"nodes": sum(ops.values()), "notable_ops": interesting})
    return out


def child_generate(variant: str) -> dict:
    import torch
    from transformers import CompileConfig

    model = _model(not variant.startswith("gen_plain"), "h200" in variant, 16 if "_16l" in variant else 2)
    ids = torch.randint(3, 128, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    info = {"attn_implementation": model.config._attn_implementation,
            "_can_compile_fullgraph": type(model)._can_compile_fullgraph}
    # 1. does generate() auto-compile with its default config (what the GPU run used)?
    engaged = []
    orig = model._valid_auto_compile_criteria

    def spy(*a, **k):
        r = orig(*a, **k)
        engaged.append(r)
        return r
    model._valid_auto_compile_criteria = spy
    rec = Recorder()
    cc = CompileConfig(backend=rec, mode=None, fullgraph=False)
    cc._compile_all_devices = True         # auto-compile on CPU (GPU runs get it from the device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                             cache_implementation="static", compile_config=cc)
    info["generate_s"] = round(time.perf_counter() - t0, 2)
    if "_2prompts" in variant:   # a second and third generate(): same prompt length, then one token longer
        for n in (PROMPT, PROMPT + 1):
            before = _counters()["unique_graphs"]
            with torch.no_grad():
                model.generate(ids[:, :1].repeat(1, n), max_new_tokens=NEW_TOKENS, do_sample=False,
                               cache_implementation="static", compile_config=cc)
            info[f"new compiled frames, generate() with a {n}-token prompt"] = _counters()["unique_graphs"] - before
    info["auto_compile_engaged"] = engaged
    info["tokens"] = out[0, PROMPT:].tolist()
    # also the default criteria a CUDA device would meet: is anything model-side refusing?
    from transformers.generation.configuration_utils import GenerationConfig
    gc = GenerationConfig(cache_implementation="static")
    gc.compile_config = CompileConfig()
    gc.compile_config._compile_all_devices = True
    from transformers import StaticCache
    info["criteria_with_static_cache"] = orig({"cache": StaticCache(config=model.config, max_cache_len=32)}, gc)
    info.update(_counters())
    info["graphs"] = _graph_summary(rec)
    return info


def child_torch_compile(variant: str) -> dict:
    import torch
    from transformers import StaticCache

    model = _model("patched" in variant, "h200" in variant)
    rec = Recorder()
    # _dynamic: dynamic=True, what automatic dynamic shapes also do after a frame sees a second size
    compiled = torch.compile(model, fullgraph=True, backend=rec,
                             dynamic=True if variant.endswith("_dynamic") else None)
    cache = StaticCache(config=model.config, max_cache_len=PROMPT + DECODE_STEPS + 4)
    ids = torch.randint(3, 128, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    info = {"steps": []}
    with torch.no_grad():
        ref_cache = StaticCache(config=model.config, max_cache_len=PROMPT + DECODE_STEPS + 4)
        try:
            pos = torch.arange(PROMPT)[None]
            out = compiled(input_ids=ids, position_ids=pos, cache=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            ref = model(input_ids=ids, position_ids=pos, cache=ref_cache, use_cache=True)
            info["prefill_matches_eager"] = bool(torch.allclose(out.logits, ref.logits, atol=1e-4))
            for step in range(DECODE_STEPS):
                before = _counters()["unique_graphs"]
                p = torch.tensor([[PROMPT + step]])
                out = compiled(input_ids=tok, position_ids=p, cache=cache, use_cache=True)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                info["steps"].append(_counters()["unique_graphs"] - before)
        except Exception as e:
            info["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
            m = re.search(r"Explanation: (.*)", str(e))
            if m:
                info["error_explanation"] = m.group(1)[:300]
            frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', str(e))
            info["error_user_frames"] = [f"{os.path.relpath(f, ROOT) if f.startswith(ROOT) else os.path.basename(f)}"
                                         f":{ln} {fn}" for f, ln, fn in frames if "layerzero" in f][-4:]
    info.update(_counters())
    info["graphs"] = _graph_summary(rec)
    return info


def child_decisions() -> dict:
    """What an H200 would pick for the benchmark's shapes (1B llama: 32 q heads, 8 kv heads,
    head_dim 64, hidden 2048, intermediate 8192; bf16): selection on meta stand-ins, with the
    device fields of the CallSpec set to cuda / sm90 as `compiled._choose` would."""
    import torch
    import layerzero  # noqa: F401
    from layerzero import control, ops, registry
    from layerzero.select import select

    bf = torch.bfloat16

    def t(*shape, dtype=bf):
        return torch.empty(*shape, dtype=dtype, device="meta")

    calls = {
        "attention decode, static cache (Sq=1, Sk=256, bool mask (1,1,1,256))":
            ("attention", (t(1, 32, 1, 64), t(1, 8, 256, 64), t(1, 8, 256, 64)),
             dict(attn_mask=t(1, 1, 1, 256, dtype=torch.bool), causal_align="bottom_right")),
        "attention decode, DynamicCache (Sq=1, Sk=129, no mask)":
            ("attention", (t(1, 32, 1, 64), t(1, 8, 129, 64), t(1, 8, 129, 64)),
             dict(causal_align="bottom_right")),
        "attention prefill 2048 (causal, no mask)":
            ("attention", (t(1, 32, 2048, 64), t(1, 8, 2048, 64), t(1, 8, 2048, 64)), dict(is_causal=True)),
        "rms_norm prefill 2048 x 2048 (residual)":
            ("rms_norm", (t(1, 2048, 2048), t(2048), 1e-5), dict(residual=t(1, 2048, 2048))),
        "rms_norm decode 1 x 2048":
            ("rms_norm", (t(1, 1, 2048), t(2048), 1e-5), {}),
        "swiglu prefill 2048 x 8192": ("swiglu", (t(1, 2048, 8192), t(1, 2048, 8192)), {}),
        "swiglu decode 1 x 8192": ("swiglu", (t(1, 1, 8192), t(1, 1, 8192)), {}),
        "rope prefill 2048": ("rope", (t(1, 32, 2048, 64), t(1, 8, 2048, 64), t(1, 2048, 64), t(1, 2048, 64)), {}),
        "rope decode": ("rope", (t(1, 32, 1, 64), t(1, 8, 1, 64), t(1, 1, 64), t(1, 1, 64)), {}),
    }
    out = {}
    for name, (op, args, kw) in calls.items():
        try:
            spec, _ = ops.describe(op, args, kw)
            spec = spec._replace(device="cuda", sm=90)
            d = select(spec, registry.op_kernels(op), control.effective, ())
            ranked = sorted((c for c in d.candidates if c.score is not None), key=lambda c: -c.score)
            # the H200 has triton and liger (benchmarks/results/doctor_h200.txt), this box may not:
            # the static priority of every registered kernel, whatever its availability here
            prio = []
            for k in registry.op_kernels(op):
                try:
                    v = k.priority(spec) if callable(k.priority) else k.priority
                except Exception as e:  # noqa: BLE001
                    v = f"?{type(e).__name__}"
                prio.append((k.id, v))
            prio.sort(key=lambda kv: -kv[1] if isinstance(kv[1], int) else 0)
            out[name] = {"chosen": d.chosen,
                         "ranked": [f"{c.kernel}={c.score}" for c in ranked[:5]],
                         "priority_if_available": [f"{k}={v}" for k, v in prio[:4]]}
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    return out


def child(variant: str) -> None:
    if variant.startswith("gen_"):
        info = child_generate(variant)
    elif variant.startswith("tc_"):
        info = child_torch_compile(variant)
    else:
        info = child_decisions()
    print("CHILD_RESULT " + json.dumps(info, default=str), flush=True)


# ---- parent side --------------------------------------------------------------------------------

def parse_log(text: str) -> dict:
    """Graph breaks (reason + the user frame) and recompiles (function + failing guards)."""
    lines = [re.sub(r"^V\d+ [\d:.]+ \d+ \S+\] \[[^\]]*\] \[__\w+\] ?", "", ln) for ln in text.splitlines()]
    breaks, recompiles = collections.Counter(), collections.Counter()
    i = 0
    while i < len(lines):
        ln = lines[i]
        if ln.startswith("Graph break") and " in user code at " in ln:
            where = ln.split(" in user code at ", 1)[1]
            where = os.path.relpath(where, ROOT) if where.startswith(ROOT) else where
            reason = ""
            for nxt in lines[i + 1:i + 8]:
                if nxt.startswith("Graph Break Reason:"):
                    reason = nxt[len("Graph Break Reason:"):].strip()
                elif nxt.strip().startswith("Explanation:") or (reason and not reason.endswith(":")):
                    pass
                if reason.endswith("encountered:") or reason == "":
                    continue
            expl = next((n.strip() for n in lines[i + 1:i + 12] if n.strip().startswith("Explanation:")), "")
            breaks[f"{where}  | {reason[:90]} {expl[:140]}".strip()] += 1
        m = re.match(r"Recompiling function (\S+) in (\S+)", ln)
        if m:
            guards = []
            for nxt in lines[i + 1:i + 12]:
                g = re.match(r"\s*- \d+/\d+: (.*)", nxt)
                if g:
                    guards.append(re.sub(r"\s+#.*", "", g.group(1)).strip()[:120])
            fn, where = m.group(1), m.group(2)
            where = os.path.relpath(where, ROOT) if where.startswith(ROOT) else where
            recompiles[f"{fn} ({where}): {' / '.join(guards[:2])}"] += 1
        if "recompile_limit" in ln or "cache_size_limit" in ln:
            recompiles["RECOMPILE LIMIT HIT: " + ln.strip()[:160]] += 1
        i += 1
    return {"graph_breaks": breaks, "recompiles": recompiles}


def run_variant(variant: str, show_raw: bool = False, timeout: int = 300) -> dict:
    env = dict(os.environ, TORCH_LOGS="recompiles,graph_breaks", PYTHONPATH=ROOT, DIAG_VARIANT=variant,
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", variant], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=timeout)
        text, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = (e.stdout or "") + (e.stderr or "") if isinstance(e.stdout, str) else "", "timeout"
    result = None
    for ln in text.splitlines():
        if ln.startswith("CHILD_RESULT "):
            result = json.loads(ln[len("CHILD_RESULT "):])
    if show_raw:
        print(text)
    return {"variant": variant, "rc": rc, "seconds": round(time.perf_counter() - t0, 1),
            "result": result, "log": parse_log(text),
            "tail": None if result is not None else text[-3000:]}


def report(r: dict) -> None:
    print(f"\n=== {r['variant']}  (rc={r['rc']}, {r['seconds']} s)")
    res = r["result"]
    if res is None:
        print("  no result; last output:\n" + (r["tail"] or ""))
        return
    if r["variant"] == "decisions":
        for name, d in res.items():
            print(f"  {name}: here {d.get('chosen', d.get('error'))}   [{', '.join(d.get('ranked', []))}]"
                  f"\n      static priorities (kernels unavailable here included): {', '.join(d.get('priority_if_available', []))}")
        return
    for k in ("attn_implementation", "_can_compile_fullgraph", "auto_compile_engaged",
              "criteria_with_static_cache", "generate_s", "prefill_matches_eager", "steps",
              "error", "error_explanation", "error_user_frames",
              f"new compiled frames, generate() with a {PROMPT}-token prompt",
              f"new compiled frames, generate() with a {PROMPT + 1}-token prompt"):
        if k in res:
            label = {"steps": "new compiled frames per decode step",
                     "auto_compile_engaged": "auto-compile engaged (per generate)",
                     "criteria_with_static_cache": "_valid_auto_compile_criteria(StaticCache)"}.get(k, k)
            print(f"  {label}: {res[k]}")
    print(f"  compiled frames (unique_graphs): {res['unique_graphs']}, ops captured: {res['calls_captured']}")
    gb = r["log"]["graph_breaks"]
    print(f"  graph breaks: {sum(gb.values())} logged ({len(gb)} distinct)"
          + (f"; dynamo counter: {sum(res['graph_break_counter'].values())}" if res["graph_break_counter"] else ""))
    for k, v in gb.most_common(6):
        print(f"    {v:3d} x {k}")
    for k, v in sorted(res["graph_break_counter"].items(), key=lambda kv: -kv[1])[:4]:
        print(f"    counter {v:3d} x {k}")
    rc = r["log"]["recompiles"]
    print(f"  recompiles: {sum(rc.values())} ({len(rc)} distinct)")
    for k, v in rc.most_common(20):
        print(f"    {v:3d} x {k}")
    graphs = res.get("graphs") or []
    if graphs:
        print(f"  captured graphs: {len(graphs)}; nodes per graph: {[g['nodes'] for g in graphs][:12]}")
        big = max(graphs, key=lambda g: g["nodes"])
        print(f"  notable ops of the largest graph: {big['notable_ops']}")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        child(argv[1])
        return 0
    chosen = [a for a in argv if a in VARIANTS] or list(VARIANTS)
    results = [run_variant(v, show_raw=len(chosen) == 1 and "--raw" in argv) for v in chosen]
    for r in results:
        report(r)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
