"""LayerZero with HuggingFace transformers, on CPU, in one minute.

A tiny random Llama built from a config (no download) runs three ways:
  1. attn_implementation="layerzero"   attention only, chosen per call by LayerZero
  2. lz.patch(model)                   attention, RMSNorm, RoPE and the SwiGLU MLP
  3. with lz.auto_patch():             models built inside the block come out patched
and each matches the unpatched model. Then: what ran (lz.metrics, lz.explain), generation with a
static cache, torch.compile, and lz.unpatch.

    python examples/transformers_quickstart.py
"""
from __future__ import annotations

import copy

import torch
import transformers as T

import layerzero as lz

config = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, pad_token_id=0)
torch.manual_seed(0)
model = T.AutoModelForCausalLM.from_config(copy.deepcopy(config)).eval()
ids = torch.randint(1, 128, (2, 8))
with torch.no_grad():
    expected = model(ids).logits

# 1. attention only: the name LayerZero registered with transformers when it was imported
fast = T.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="layerzero").eval()
fast.load_state_dict(model.state_dict())
with torch.no_grad():
    torch.testing.assert_close(fast(ids).logits, expected, atol=1e-4, rtol=1e-4)
print("attn_implementation='layerzero': same logits;", lz.metrics()["calls"]["attention"])

# 2. patch a loaded model: the report lists every candidate module, patched or skipped (and why)
report = lz.patch(model)
print(report)
lz.reset_metrics()
with torch.no_grad():
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=1e-4)
print("lz.patch: same logits; kernels that ran:", lz.metrics()["calls"])
print(lz.explain(model))  # per patched module: op, kernel, shapes seen, why

# generation works with every cache; greedy tokens are identical
out = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static", pad_token_id=0)
print("generate (static cache):", out[0, -6:].tolist())

# torch.compile(fullgraph=True): the kernel choice is made while tracing, no graph break
compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
with torch.no_grad():
    torch.testing.assert_close(compiled(ids).logits, expected, atol=1e-4, rtol=1e-4)
print("torch.compile(fullgraph=True): same logits")

# unpatch restores the original modules exactly
lz.unpatch(model)
with torch.no_grad():
    assert torch.equal(model(ids).logits, expected)
print("lz.unpatch: bit-identical to the original")

# 3. auto_patch: from_pretrained / from_config return patched models inside the block
with lz.auto_patch():
    auto = T.AutoModelForCausalLM.from_config(copy.deepcopy(config)).eval()
print("auto_patch:", len(lz.patch(auto).patched), "modules patched at load")
