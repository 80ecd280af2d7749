"""Inline attention of xlm / flaubert (XLM's MultiHeadAttention), gpt_neo (GPTNeoSelfAttention,
global and local layers) and openai-gpt (Attention): lz.patch swaps each after a probe, the
outputs stay the unpatched model's on the real tokens, LayerZero's attention runs, greedy
generation (with the cache where the model keeps one) is unchanged, and lz.unpatch is bit-exact;
a module of the same structure but other math is recognised and skipped ("differs on a probe")."""
from __future__ import annotations

import math

import pytest
import torch

T = pytest.importorskip("transformers")

import layerzero as lz  # noqa: E402
from layerzero.integrations import inline  # noqa: E402
from layerzero.integrations.inline import gpt_neo, openai_gpt, xlm  # noqa: E402
from layerzero.patch import Report  # noqa: E402

VOCAB, BATCH, SEQ, PAD = 100, 2, 12, 3


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :PAD] = 0   # left padding in the second row
    ids[1, :PAD] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _xlm_config(**kw):
    return dict(vocab_size=VOCAB, emb_dim=64, n_layers=2, n_heads=4, max_position_embeddings=64,
                pad_index=0, **kw)


def _xlm(causal):
    return T.XLMWithLMHeadModel(T.XLMConfig(**_xlm_config(causal=causal)))


def _gpt_neo():
    # window 4 < the 12 tokens: the local layer's window is crossed
    return T.GPTNeoForCausalLM(T.GPTNeoConfig(
        vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=64,
        attention_types=[[["global", "local"], 1]], window_size=4, bos_token_id=1, eos_token_id=2))


def _openai():
    return T.OpenAIGPTLMHeadModel(T.OpenAIGPTConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                                    n_positions=64))


CASES = {   # name -> (build, style, check greedy generation?)
    "xlm-encoder": (lambda: T.XLMModel(T.XLMConfig(**_xlm_config())), xlm, False),
    "xlm-causal": (lambda: _xlm(True), xlm, True),
    "xlm-lm": (lambda: _xlm(False), xlm, False),   # the zoo's causal row (an LM head, not causal)
    "flaubert-encoder": (lambda: T.FlaubertModel(T.FlaubertConfig(**_xlm_config())), xlm, False),
    "gpt_neo": (_gpt_neo, gpt_neo, True),
    "openai-gpt": (_openai, openai_gpt, True),
}


def _out(model, kw):
    with torch.no_grad():
        return model(**kw)[0]


def _generate(model, kw):
    with torch.no_grad():
        return model.generate(**kw, max_new_tokens=5, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("case", list(CASES))
def test_inline_attention_is_swapped_and_exact(case):
    build, style, generates = CASES[case]
    torch.manual_seed(0)
    model = build().eval()
    kw = _inputs()
    want = _out(model, kw)
    want_ids = _generate(model, kw) if generates else None

    lz.reset_metrics()
    report = lz.patch(model)
    mine = [i for i in report.items if i.kind == "attention" and style.DESCRIPTION in i.detail]
    assert len(mine) == 2 and all(i.status == "patched" for i in mine), report.items
    lz.reset_metrics()
    got = _out(model, kw)
    assert lz.metrics()["calls"].get("attention")
    real = kw["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)
    if generates:
        lz.reset_metrics()
        assert torch.equal(_generate(model, kw), want_ids)
        assert lz.metrics()["calls"].get("attention")

    lz.unpatch(model)
    assert torch.equal(_out(model, kw), want)


def test_real_modules_go_to_their_style_only():
    """Each real module is recognised by its own style first, and only by it."""
    torch.manual_seed(0)
    mods = {xlm: T.XLMModel(T.XLMConfig(**_xlm_config())).attentions[0],
            gpt_neo: _gpt_neo().transformer.h[1].attn.attention,
            openai_gpt: _openai().transformer.h[0].attn}
    for style, m in mods.items():
        assert inline.recognise(m) is style
        assert [s for s in (xlm, gpt_neo, openai_gpt) if s.recognised(m)] == [style]
    # look-alikes of other styles: distilbert (q_lin...), bart (q_proj...), gpt2 (c_attn Conv1D), bert
    others = [T.DistilBertModel(T.DistilBertConfig(vocab_size=VOCAB, dim=64, n_layers=1, n_heads=4,
                                                   hidden_dim=64)),
              T.BartModel(T.BartConfig(vocab_size=VOCAB, d_model=64, encoder_layers=1, decoder_layers=1,
                                       encoder_attention_heads=4, decoder_attention_heads=4,
                                       encoder_ffn_dim=64, decoder_ffn_dim=64)),
              T.GPT2Model(T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=4)),
              T.BertModel(T.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, intermediate_size=64))]
    for model in others:
        for m in model.modules():
            assert not any(s.recognised(m) for s in (xlm, gpt_neo, openai_gpt)), type(m)


class _XLMDoubled(T.models.xlm.modeling_xlm.MultiHeadAttention):
    """XLM's structure, other math (scores doubled)."""

    def forward(self, input, mask, kv=None, cache=None, output_attentions=False, **kwargs):
        b, s, _ = input.shape
        q, k, v = (getattr(self, n)(input).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
                   for n in ("q_lin", "k_lin", "v_lin"))
        w = (2 * q @ k.transpose(-1, -2) / math.sqrt(self.head_dim))
        w = w.masked_fill((mask == 0).view(b, 1, 1, s), torch.finfo(w.dtype).min).softmax(-1)
        return (self.out_lin((w @ v).transpose(1, 2).reshape(b, s, -1)),)


class _GPTNeoScaled(T.models.gpt_neo.modeling_gpt_neo.GPTNeoSelfAttention):
    """GPT-Neo's structure, other math (scores scaled by 1/sqrt(head_dim))."""

    def _attn(self, query, key, value, attention_mask=None):
        return super()._attn(query / math.sqrt(self.head_dim), key, value, attention_mask)


class _OpenAISquared(T.models.openai.modeling_openai.Attention):
    """openai-gpt's structure, other math (values squared)."""

    def _attn(self, q, k, v, attention_mask=None, output_attentions=False):
        return super()._attn(q, k, v * v, attention_mask, output_attentions)


def _look_alikes():
    neo = T.GPTNeoConfig(hidden_size=64, num_heads=4, max_position_embeddings=16, window_size=4)
    gpt = T.OpenAIGPTConfig(n_embd=64, n_head=4)
    return [(_XLMDoubled(4, 64, T.XLMConfig()), xlm),
            (_GPTNeoScaled(neo, "local", 0), gpt_neo),
            (_OpenAISquared(64, 16, gpt, scale=True), openai_gpt)]


@pytest.mark.parametrize("index", range(3))
def test_look_alike_with_other_math_is_skipped(index):
    torch.manual_seed(0)
    m, style = _look_alikes()[index]
    m.eval()
    report, undo = Report(type(m).__name__), []
    assert inline.recognise(m) is style
    assert inline.patch_inline(m, report, undo) == {"": False} and not undo
    (item,) = report.items
    assert item.status == "skipped" and "differs on a probe" in item.detail


def test_gpt_neo_bias_buffer_not_the_local_pattern_is_skipped():
    """A local layer whose `bias` buffer is not the window the replacement would run is left alone."""
    torch.manual_seed(0)
    m = _gpt_neo().transformer.h[1].attn.attention
    m.config.window_size = 3   # the buffer was built for 4
    ok, why = gpt_neo.check(m, torch.device("cpu"))
    assert not ok and "bias" in why
