"""BERT-style inline self-attention (inline/bert.py) beyond the plain encoder call: the decoder
of a causal LM through its cache (megatron-bert, rembert, big_bird), tapas' one-item result,
attention probabilities recorded by transformers' output hooks (big_bird) and a bool 4-D mask
(run by the module's own forward, which adds it to the scores)."""
from __future__ import annotations

import pytest
import torch

T = pytest.importorskip("transformers")

import layerzero as lz  # noqa: E402

VOCAB = 100


def _cfg(cls, **kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128, max_position_embeddings=64, pad_token_id=0)
    if cls is T.BigBirdConfig:
        base["attention_type"] = "original_full"
    return cls(**base, **kw)


CAUSAL = {
    "megatron-bert": (T.MegatronBertConfig, T.MegatronBertForCausalLM),
    "rembert": (T.RemBertConfig, T.RemBertForCausalLM),
    "big_bird": (T.BigBirdConfig, T.BigBirdForCausalLM),
}


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return ids, mask


def _attention_items(report):
    return [i for i in report.items if i.kind == "attention" and "BERT-style" in i.detail]


@pytest.mark.parametrize("family", list(CAUSAL))
def test_a_causal_decoder_runs_through_its_cache(family):
    cfg_cls, cls = CAUSAL[family]
    torch.manual_seed(0)
    model = cls(_cfg(cfg_cls, is_decoder=True)).eval()
    ids, mask = _inputs()
    gen = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want_logits = model(ids, attention_mask=mask).logits
        want = model.generate(ids, **gen)
        report = lz.patch(model)
        assert [i.status for i in _attention_items(report)] == ["patched", "patched"], str(report)
        lz.reset_metrics()
        got_logits = model(ids, attention_mask=mask).logits
        assert lz.metrics()["calls"].get("attention"), "LayerZero's attention did not run"
        lz.reset_metrics()
        got = model.generate(ids, **gen)
        assert lz.metrics()["calls"].get("attention")
    real = mask.bool()
    torch.testing.assert_close(got_logits[real], want_logits[real], atol=1e-4, rtol=1e-4)
    assert torch.equal(got, want)
    lz.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, want_logits)


def test_tapas_returns_what_its_forward_returns():
    torch.manual_seed(0)
    model = T.TapasModel(_cfg(T.TapasConfig)).eval()
    ids, mask = _inputs()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).last_hidden_state
        report = lz.patch(model)
        assert [i.status for i in _attention_items(report)] == ["patched", "patched"], str(report)
        lz.reset_metrics()
        got = model(ids, attention_mask=mask).last_hidden_state
    assert lz.metrics()["calls"].get("attention")
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)


def test_probabilities_recorded_by_hooks_and_bool_masks_run_the_modules_forward():
    torch.manual_seed(0)
    model = T.BigBirdModel(_cfg(T.BigBirdConfig)).eval()
    ids, mask = _inputs()
    with torch.no_grad():
        want = model(ids, attention_mask=mask, output_attentions=True)
        lz.patch(model)
        got = model(ids, attention_mask=mask, output_attentions=True)
    assert len(got.attentions) == 2
    for a, b in zip(got.attentions, want.attentions):
        torch.testing.assert_close(a, b)
    attn = model.encoder.layer[0].attention.self
    x = torch.randn(2, 5, 64)
    bool_mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    bool_mask[1, ..., :2] = False
    lz.reset_metrics()
    with torch.no_grad():
        out = attn(x, attention_mask=bool_mask)[0]
    assert not lz.metrics()["calls"].get("attention")   # the module's own forward ran
    lz.unpatch(model)
    with torch.no_grad():
        assert torch.equal(attn(x, attention_mask=bool_mask)[0], out)
