"""Inline attention with fused query-key-value projections (layerzero/integrations/inline/: bloom,
mpt, falcon, gpt_neox_japanese) -> lz.attention through lz.patch: tiny random models (weights
drawn larger than the init so attention visibly matters), a left-padded batch, outputs equal on the
real positions, LayerZero's attention ran, greedy generation with the cache unchanged, unpatch
bit-exact; a module of the same structure but other math is recognised and skipped."""
from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import layerzero as lz  # noqa: E402
from layerzero.integrations import inline  # noqa: E402
from layerzero.integrations.inline import bloom, falcon, gpt_neox_japanese, mpt  # noqa: E402
from layerzero.patch import Report  # noqa: E402

TINY = dict(hidden_size=64, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _config(family: str, **over):
    if family == "bloom":
        cfg = transformers.BloomConfig(n_layer=2, n_head=4, **TINY)
    elif family == "mpt":
        cfg = transformers.MptConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=128,
                                     pad_token_id=0, use_cache=True, attn_config=over.pop("attn_config", None))
    elif family == "falcon":
        cfg = transformers.FalconConfig(num_hidden_layers=2, num_attention_heads=4, num_kv_heads=4,
                                        max_position_embeddings=64, **TINY)
    else:
        cfg = transformers.GPTNeoXJapaneseConfig(num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_multiple_size=2, max_position_embeddings=64, **TINY)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def _model(family: str, attn: str = "eager", **over):
    cls = {"bloom": transformers.BloomForCausalLM, "mpt": transformers.MptForCausalLM,
           "falcon": transformers.FalconForCausalLM,
           "gpt_neox_japanese": transformers.GPTNeoXJapaneseForCausalLM}[family]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls._from_config(_config(family, **over), attn_implementation=attn, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.25)
    return model


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return ids, mask


def _run(model, ids, mask):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                pad_token_id=0)
    return logits, tokens


CASES = [
    ("bloom", bloom, "eager", {}),
    ("mpt", mpt, "eager", {"attn_config": {"clip_qkv": 0.6, "softmax_scale": 0.3}}),
    ("falcon", falcon, "eager", {}),                                            # multi-query, rotary
    ("falcon", falcon, "eager", {"alibi": True, "multi_query": False, "parallel_attn": False}),
    ("falcon", falcon, "sdpa", {"alibi": True, "multi_query": False, "parallel_attn": False}),
    ("falcon", falcon, "sdpa", {"new_decoder_architecture": True, "num_kv_heads": 2}),   # grouped K/V
    ("gpt_neox_japanese", gpt_neox_japanese, "eager",
     {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}),
]


@pytest.mark.parametrize("family,style,attn,over", CASES,
                         ids=[f"{c[0]}-{c[2]}-{'-'.join(c[3]) or 'default'}" for c in CASES])
def test_patched_matches_eager(family, style, attn, over):
    model = _model(family, attn, **over)
    ids, mask = _inputs()
    want, want_tokens = _run(model, ids, mask)

    lz.reset_metrics()
    report = lz.patch(model)
    items = [i for i in report.items if i.kind == "attention"]
    assert len(items) == 2 and all(i.status == "patched" and style.DESCRIPTION in i.detail for i in items), \
        [(i.status, i.detail) for i in items]
    got, got_tokens = _run(model, ids, mask)
    assert lz.metrics()["calls"].get("attention")
    real = mask.bool()
    assert (want[real] - want[real].mean()).abs().max() > 1.0      # the probe is not trivially flat
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)
    assert torch.equal(got_tokens, want_tokens)

    lz.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, want)


def test_only_its_own_form():
    """Each attention module is recognised by its own style only; FalconFlashAttention2 (another
    forward, same signature) and Falcon's decoder layer (same signature) by none."""
    from transformers.models.falcon import modeling_falcon
    styles = {"bloom": bloom, "mpt": mpt, "falcon": falcon, "gpt_neox_japanese": gpt_neox_japanese}
    for family, style in styles.items():
        model = _model(family)
        found = {inline.recognise(m) for m in model.modules()} - {None}
        assert found == {style}, (family, found)
    cfg = _config("falcon")
    cfg._attn_implementation = "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fa2 = modeling_falcon.FalconFlashAttention2(cfg, 0)
    layer = modeling_falcon.FalconDecoderLayer(cfg, 0)
    assert inline.recognise(fa2) is None and inline.recognise(layer) is None


def _other_math(family):
    """A subclass of the family's attention with the same structure and signature whose forward
    doubles the position bias / mask (other math)."""
    if family == "bloom":
        base = transformers.models.bloom.modeling_bloom.BloomAttention

        class Doubled(base):
            def forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
                        output_attentions=False, **kwargs):
                return base.forward(self, hidden_states, residual, 2 * alibi, attention_mask, layer_past)
        return Doubled(_config("bloom"), 0)
    if family == "mpt":
        base = transformers.models.mpt.modeling_mpt.MptAttention

        class Doubled(base):
            def forward(self, hidden_states, position_bias, cache=None, attention_mask=None, **kwargs):
                return base.forward(self, hidden_states, 2 * position_bias, cache, attention_mask)
        return Doubled(_config("mpt"), 0)
    base = transformers.models.gpt_neox_japanese.modeling_gpt_neox_japanese.GPTNeoXJapaneseAttention

    class Swapped(base):   # cos and sin swapped
        def forward(self, hidden_states, attention_mask, position_ids, layer_past=None, use_cache=False,
                    output_attentions=False, position_embeddings=None, **kwargs):
            return base.forward(self, hidden_states, attention_mask, position_ids,
                                position_embeddings=position_embeddings[::-1])
    return Swapped(_config("gpt_neox_japanese"), layer_idx=0)


@pytest.mark.parametrize("family,style", [("bloom", bloom), ("mpt", mpt), ("gpt_neox_japanese", gpt_neox_japanese)])
def test_other_math_is_skipped(family, style):
    m = _other_math(family)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.25)
    report, undo = Report(type(m).__name__), []
    assert style.recognised(m) and inline.recognise(m) is style
    assert inline.patch_inline(m, report, undo) == {"": False} and not undo
    (item,) = report.items
    assert item.status == "skipped" and "differs on a probe" in item.detail, item.detail
