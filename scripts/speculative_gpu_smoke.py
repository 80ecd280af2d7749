"""GPU smoke run of lz.speculative_generate's CUDA-graphed steps: a tiny fp32 llama target and a
noisy copy as draft (and prompt lookup), batch 1 and a left-padded batch of 3 with EOS, greedy:
tokens vs target.generate, and whether the steps were captured (no fallback counted: a host
sync or an allocation the capture refuses inside a step would raise there) and replayed; then the
same call twice more: the kept loop replays every step of the third; then lz.unpatch and the
call again: a new loop (the weights moved), the same tokens.

    PYTHONPATH=$PWD python3 scripts/speculative_gpu_smoke.py
"""
import copy
import json
import sys

import torch
import transformers as T

import layerzero as lz
from layerzero.speculative import graphs

assert torch.cuda.is_available(), "needs CUDA"
cfg = T.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, vocab_size=128, attn_implementation="sdpa")
torch.manual_seed(0)
target = T.LlamaForCausalLM(cfg).eval().cuda()
draft = copy.deepcopy(target)
with torch.no_grad():
    for p in draft.parameters():
        p.add_(torch.randn_like(p) * 0.3 * p.std())
ids = torch.randint(3, 128, (3, 9), device="cuda")
ids[0, -4:] = torch.tensor([5, 9, 5, 9])
mask = torch.ones_like(ids)
mask[1, :3] = 0
mask[2, :5] = 0
gen = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
result, ok = {}, True
replays = []
real_step = graphs.StepGraphs.step


def counting_step(self, k):
    before = dict(self.graphs)
    out = real_step(self, k)
    replays.append(k in before and before[k] is not None)
    return out


graphs.StepGraphs.step = counting_step
for rows in (1, 3):
    free = target.generate(ids[:rows], attention_mask=mask[:rows], eos_token_id=None, **gen)
    eos = [int(free[0, 9 + 6])] if rows == 3 else None
    want = target.generate(ids[:rows], attention_mask=mask[:rows], eos_token_id=eos, **gen)
    for name, d, kw in (("draft", draft, {}), ("lookup", None, {"prompt_lookup": 2})):
        replays.clear()
        st = lz.SpeculativeStats()
        got = lz.speculative_generate(target, d, ids[:rows], attention_mask=mask[:rows], eos_token_id=eos,
                                      stats=st, **kw, **gen)
        same = bool(torch.equal(got, want))
        ok &= same
        result[f"{name}_b{rows}"] = {"same": same, "replayed_steps": sum(replays), "steps": len(replays),
                                     "acceptance": round(st.acceptance_rate, 3), "k": st.draft_lengths}
        print(name, rows, result[f"{name}_b{rows}"], flush=True)
# the same call again: the loop and its graphs were kept, so every step replays
replays.clear()
again = lz.speculative_generate(target, draft, ids[:3], attention_mask=mask[:3], eos_token_id=None,
                                draft_schedule="heuristic", **gen)
replays.clear()
again2 = lz.speculative_generate(target, draft, ids[:3], attention_mask=mask[:3], eos_token_id=None,
                                 draft_schedule="heuristic", **gen)
result["kept_loop"] = {"same": bool(torch.equal(again, again2)), "replayed_steps": sum(replays),
                       "steps": len(replays)}
ok &= result["kept_loop"]["same"] and sum(replays) == len(replays)
print("kept loop", result["kept_loop"], flush=True)
# lz.unpatch drops the kept loops and puts the fused sibling weights back in storage of their own:
# a new loop is built, with the same tokens
before = list(graphs._KEPT[target].values())[-1][1]     # the kept loop of the last two calls
lz.unpatch(target)
lz.unpatch(draft)
again3 = lz.speculative_generate(target, draft, ids[:3], attention_mask=mask[:3], eos_token_id=None,
                                 draft_schedule="heuristic", **gen)
result["after_unpatch"] = {"same": bool(torch.equal(again3, again2)),
                           "new_loop": all(s is not before for _, s in graphs._KEPT[target].values())}
ok &= all(result["after_unpatch"].values())
print("after unpatch", result["after_unpatch"], flush=True)
fallbacks = lz.metrics()["fallbacks"]
result["fallbacks"] = {k: v for k, v in fallbacks.items() if "speculative" in str(k)}
ok &= not result["fallbacks"] and all(r["replayed_steps"] for r in result.values() if isinstance(r, dict) and "steps" in r)
print(json.dumps(result))
print("OK" if ok else "FAILED")
sys.exit(0 if ok else 1)
