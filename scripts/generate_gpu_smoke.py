"""GPU smoke run of lz.generate: fp32 tiny-model tokens vs model.generate (left-padded batch with
EOS) with CUDA's sync debug mode raising during the replays, then the 1B llama shape of
benchmarks/e2e_transformers.py, bf16, batch 1, 128 + 128 greedy tokens: first call (compile +
capture) and steady tok/s. A diagnosis helper; benchmarks/e2e_generate.py is the benchmark.

    PYTHONPATH=$PWD python3 scripts/generate_gpu_smoke.py [--tiny-only]

The tiny part also checks the graphed prefill: the 7-token prompts are left-padded to 64 and
captured; a second generate with 5-token prompts (same bucket) reuses that graph; its replay
runs under sync debug "error" (a sync inside would raise). Then lz.unpatch and the first call
again: a new loop (the weights moved), the same tokens.
"""
import copy
import json
import os
import sys
import time

import torch
import transformers as T

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import e2e_transformers as E  # noqa: E402

import layerzero as lz  # noqa: E402
from layerzero import generation  # noqa: E402

out = {}
cfg = T.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, vocab_size=128, attn_implementation="sdpa")
torch.manual_seed(0)
ref = T.LlamaForCausalLM(cfg).cuda().eval()
m = copy.deepcopy(ref)
g = torch.Generator().manual_seed(1)
ids = torch.randint(3, 128, (3, 7), generator=g)
mask = torch.ones_like(ids)
mask[1, :2] = 0
mask[2, :5] = 0
ids[mask == 0] = 0
ids, mask = ids.cuda(), mask.cuda()
gen = dict(max_new_tokens=40, do_sample=False, pad_token_id=0)
free = ref.generate(ids, attention_mask=mask, eos_token_id=None, **gen)
eos = [int(free[0, 9]), int(free[2, 20])]
want = ref.generate(ids, attention_mask=mask, eos_token_id=eos, **gen)
got = lz.generate(m, ids, attention_mask=mask, eos_token_id=eos, **gen)   # compiles, captures
loop = next(iter(generation._LOOPS[m].values()))
if loop.graph is False:  # the capture failed: show why
    import traceback
    loop.graph = None
    try:
        with torch.no_grad():            # as lz.generate runs it
            loop._capture()
    except Exception:
        print("\n".join(traceback.format_exc().splitlines()[-60:]))
    print("kernels:", lz.metrics()["calls"])
    loop.graph = False
torch.cuda.set_sync_debug_mode("error")
replays = []
real_replay = torch.cuda.CUDAGraph.replay


def counting_replay(self):
    replays.append(1)
    return real_replay(self)


torch.cuda.CUDAGraph.replay = counting_replay
if not loop.graph:
    sync_ok = "no decode graph: the capture failed (see the traceback above)"
else:
    try:
        for _ in range(3):  # replays under sync-debug "error": a sync inside would raise
            loop.graph.replay()
        sync_ok = True
    except RuntimeError as e:
        sync_ok = f"{type(e).__name__}: {e}"
torch.cuda.set_sync_debug_mode(0)
got2 = lz.generate(m, ids, attention_mask=mask, eos_token_id=eos, **gen)
torch.cuda.CUDAGraph.replay = real_replay
# the prefill's graph (7 tokens left-padded to 64): captured, replayed without a sync, and serving
# another prompt length of its bucket (5 tokens) with transformers' tokens
pf = {n: (e is not False) for n, e in loop.prefill_graphs.items()}
short, short_mask = ids[:, 2:], mask[:, 2:]
want3 = ref.generate(short, attention_mask=short_mask, eos_token_id=eos, **gen)
got3 = lz.generate(m, short, attention_mask=short_mask, eos_token_id=eos, **gen)
prefill_sync_ok = "no prefill graph"
for entry in loop.prefill_graphs.values():
    if entry is not False:
        torch.cuda.set_sync_debug_mode("error")
        try:
            entry[0].replay()   # a sync inside would raise
            prefill_sync_ok = True
        except RuntimeError as e:
            prefill_sync_ok = f"{type(e).__name__}: {e}"
        torch.cuda.set_sync_debug_mode(0)
# lz.unpatch drops the kept loops and puts the fused sibling weights back in storage of their own:
# the next call builds a new loop (graphs of the old one would read the freed fused matrix)
lz.unpatch(m)
got4 = lz.generate(m, ids, attention_mask=mask, eos_token_id=eos, **gen)
rebuilt = all(lp is not loop for lp in generation._LOOPS[m].values())
out["tiny"] = {"same_tokens": bool(torch.equal(got, want)) and bool(torch.equal(got2, want)),
               "after_unpatch": {"same_tokens": bool(torch.equal(got4, want)), "new_loop": rebuilt},
               "shape": list(want.shape), "replays_second_call": len(replays) - 3,
               "no_sync_in_replay": sync_ok, "prefill_graphs": pf,
               "shorter_prompt_same_tokens": bool(torch.equal(got3, want3)),
               "no_sync_in_prefill_replay": prefill_sync_ok,
               "fallbacks": lz.metrics()["fallbacks"]}
print("tiny:", out["tiny"], flush=True)
if not torch.equal(got, want):
    print(want, got)
if len(sys.argv) > 1 and sys.argv[1] == "--tiny-only":
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "generate_gpu_smoke.json"), "w") as f:
        json.dump(out, f, indent=1)
    sys.exit(0)

# 1B, bf16, batch 1, 128 + 128
shape = E.SHAPES["1b"]
model = E.build(shape, "cuda", torch.bfloat16)
g = torch.Generator(device="cuda").manual_seed(0)
for batch in (1, 8):
    ids = torch.randint(0, shape["vocab_size"], (batch, 128), device="cuda", generator=g)
    kw = dict(max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0, eos_token_id=None)
    torch._dynamo.utils.counters.clear()
    t0 = time.perf_counter()
    lz.generate(model, ids, **kw)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        lz.generate(model, ids, **kw)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    t = sorted(times)[1]
    c = torch._dynamo.utils.counters
    lz.reset_metrics()
    lz.generate(model, ids, **kw)
    row = {"batch": batch, "first_call_s": round(first, 2), "ms_per_generate": round(t * 1e3, 2),
           "tok_per_s": round(batch * 128 / t, 1), "graph_breaks": sum(c["graph_break"].values()),
           "unique_graphs": c["stats"].get("unique_graphs", 0),
           "kernels": {op: sorted(ks) for op, ks in lz.metrics()["calls"].items()}}
    out[f"1b_b{batch}"] = row
    print(row, flush=True)
with open(os.path.join(os.environ.get("OUT", "/tmp"), "generate_gpu_smoke.json"), "w") as f:
    json.dump(out, f, indent=1)
