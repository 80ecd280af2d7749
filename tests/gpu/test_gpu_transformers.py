"""lz.patch of a llama-shaped model on the GPU, big enough that the GPU-only paths run: FA4 or
SDPA attention, the Triton residual RMSNorm fused into the decoder layers (>= 8M elements), the
down projection's addmm, the Triton RoPE. bf16 vs the fp32 unpatched model: error within 2x that
of transformers' own bf16 run plus a rounding floor; the DynamicCache keeps the prompt's K/V."""
from __future__ import annotations

import copy

import pytest
import torch

T = pytest.importorskip("transformers")

import layerzero as lz  # noqa: E402
from helpers import FLOOR  # noqa: E402


def test_patched_llama_bf16_flash_attention_rule():
    cfg = T.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=16,
                        num_key_value_heads=4, vocab_size=512, max_position_embeddings=8192,
                        attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        ref_model = T.LlamaForCausalLM._from_config(copy.deepcopy(cfg), dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (1, 8192), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad():
        ref = ref_model(input_ids=ids, logits_to_keep=0).logits.double()
        model = copy.deepcopy(ref_model).to(torch.bfloat16)
        base = (model(input_ids=ids).logits.double() - ref).abs().max().item()
        report = lz.patch(model)
        assert [i for i in report.items if i.kind == "residual" and i.status == "patched"], str(report)
        lz.reset_metrics()
        cache = T.DynamicCache(config=model.config)
        got = model(input_ids=ids, past_key_values=cache, use_cache=True).logits.double()
    ran = lz.metrics()["calls"]
    err = (got - ref).abs().max().item()
    floor = FLOOR[torch.bfloat16] * max(ref.abs().max().item(), 1.0)
    assert err <= 2 * base + floor, (err, base, ran)
    assert {"attention", "rms_norm", "rope", "swiglu"} <= set(ran), ran
    assert "triton.rms_norm" in ran["rms_norm"], ran          # the fused residual norm (32M elements)
    assert cache.layers[0].keys.shape[-2] == 8192
    lz.unpatch(model)
