"""BART-style attention written inline (layerzero/integrations/inline/bart.py): xglm, trocr, mvp,
led's decoder and fsmt keep their own copy of it; lz.patch swaps it for lz.attention after a probe.
Per family (tiny random config, left-padded batch): every such module is patched, the output is the
unpatched one on the non-padding positions, LayerZero's attention ran, greedy generation (with its
cache: self-attention appended, cross-attention keys reused) gives the same tokens, and lz.unpatch
restores the output bit-exact. Calls asking for the probabilities run the module's own forward; a
look-alike whose math differs is recognised but left alone; AttentionInterface families and other
math (informer's ProbSparse attention) are not recognised."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

T = pytest.importorskip("transformers")

import layerzero as lz  # noqa: E402
from layerzero.integrations import inline  # noqa: E402
from layerzero.integrations.inline import bart  # noqa: E402
from layerzero.patch import Report  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "zoo_transformers.py"
_spec = importlib.util.spec_from_file_location("zoo_transformers_inline_bart", SCRIPT)
zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)

FAMILIES = [("causal", "xglm"), ("causal", "trocr"), ("causal", "mvp"),
            ("seq2seq", "mvp"), ("seq2seq", "fsmt"), ("seq2seq", "led")]


def _model(kind, family):
    cfg = zoo.tiny_config(family)
    cls = getattr(T, zoo.class_name(kind, family))
    model = zoo._build(cls, zoo._config_for(cls, cfg), "eager")
    return model, zoo._inputs(kind, cfg, model)


def _generate(model, kw, tokens=5):
    with torch.no_grad():
        return model.generate(input_ids=kw["input_ids"], attention_mask=kw["attention_mask"],
                              max_new_tokens=tokens, do_sample=False)


def _close(kind, kw, got, want):
    torch.testing.assert_close(zoo._valid(kind, kw, got), zoo._valid(kind, kw, want), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind,family", FAMILIES, ids=[f"{k}-{f}" for k, f in FAMILIES])
def test_family_runs_through_lz_attention(kind, family):
    model, kw = _model(kind, family)
    want = zoo._forward(model, kw)
    n = 5 if kind == "causal" else 2    # seq2seq: the second token reuses the cross-attention keys
    tokens = _generate(model, kw, n)
    ours = [n for n, m in model.named_modules() if bart.recognised(m)]
    assert ours

    report = lz.patch(model)
    items = {i.name: i for i in report.items if i.kind == "attention"}
    assert all(items[n].status == "patched" and bart.DESCRIPTION in items[n].detail for n in ours)
    lz.reset_metrics()
    got = zoo._forward(model, kw)
    assert lz.metrics()["calls"].get("attention")
    _close(kind, kw, got, want)
    lz.reset_metrics()
    assert torch.equal(_generate(model, kw, n), tokens)
    assert lz.metrics()["calls"].get("attention")

    lz.unpatch(model)
    assert torch.equal(zoo._forward(model, kw), want)


def test_probabilities_come_from_the_modules_own_forward():
    """xglm's attentions are recorded by hooks on the module's output (it has no output_attentions
    argument): the module's own forward runs, so they are the eager ones."""
    model, kw = _model("causal", "xglm")
    with torch.no_grad():
        want = model(**kw, output_attentions=True).attentions
    lz.patch(model)
    with torch.no_grad():
        got = model(**kw, output_attentions=True).attentions
    lz.unpatch(model)
    assert len(got) == len(want) > 0 and all(torch.equal(a, b) for a, b in zip(got, want))


def test_mvp_prompts_run_through_lz_attention():
    cfg = T.MvpConfig(vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                      decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, use_prompt=True,
                      prompt_length=3, prompt_mid_dim=16, max_position_embeddings=64)
    torch.manual_seed(0)
    model = T.MvpForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(1)
    kw = {"input_ids": torch.randint(3, 100, (2, 9), generator=g), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    kw["attention_mask"][1, :3] = 0
    want, tokens = zoo._forward(model, kw), _generate(model, kw, 2)
    lz.patch(model)
    lz.reset_metrics()
    torch.testing.assert_close(zoo._forward(model, kw), want, atol=1e-4, rtol=1e-4)
    assert lz.metrics()["calls"].get("attention")
    assert torch.equal(_generate(model, kw, 2), tokens)
    lz.unpatch(model)


class Squared(torch.nn.Module):
    """led's decoder attention's structure and signature, other math (squared scores)."""

    def __init__(self):
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = 64, 4, 16
        self.scaling, self.dropout, self.is_decoder, self.layer_idx = 0.25, 0.0, False, None
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (torch.nn.Linear(64, 64) for _ in range(4))

    def forward(self, hidden_states, key_value_states=None, cache=None, attention_mask=None,
                output_attentions=False):
        b, s, _ = hidden_states.shape
        q, k, v = (p(hidden_states).view(b, s, 4, 16).transpose(1, 2).reshape(b * 4, s, 16)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        scores = torch.bmm(q * self.scaling, k.transpose(1, 2)) ** 2
        p = torch.nn.functional.softmax(scores.view(b, 4, s, s) + attention_mask, dim=-1).view(b * 4, s, s)
        out = torch.bmm(p, v).view(b, 4, s, 16).transpose(1, 2).reshape(b, s, 64)
        return self.out_proj(out), None, cache


def test_look_alike_with_other_math_is_skipped():
    m, report, undo = Squared(), Report("Squared"), []
    assert bart.recognised(m) and inline.recognise(m) is bart
    assert inline.patch_inline(m, report, undo) == {"": False} and not undo
    (item,) = report.items
    assert item.status == "skipped" and "differs on a probe" in item.detail


def test_other_attention_forms_are_not_recognised():
    bart_model, _ = _model("seq2seq", "bart")       # BartAttention: through AttentionInterface
    bert_model, _ = _model("encoder", "bert")       # query / key / value
    assert not any(bart.recognised(m) for m in (*bart_model.modules(), *bert_model.modules()))
    from transformers.models.informer.modeling_informer import InformerProbSparseAttention
    assert not bart.recognised(InformerProbSparseAttention(64, 4))
