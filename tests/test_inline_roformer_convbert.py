"""Inline attention of roformer (rotary, a decoder's cache) and convbert (attention + span
convolution), layerzero/integrations/inline/{roformer,convbert}.py, on the zoo's tiny random models:
lz.patch recognises the attention modules (our styles tried before inline/bert.py, whose
recogniser matches convbert's), swaps them after a probe, gives the unpatched output on the
non-padding positions (fp32, 1e-4), runs LayerZero's attention (and rope for roformer) in the
forward itself, and lz.unpatch gives the output back bit-exact; roformer's cached greedy decoding
gives the unpatched tokens, with rotary_value and with cross-attention too; calls the replacements
do not handle (output_attentions, also asked for through the config) run the original; a module
with a family's structure but other math is recognised and skipped.
"""
from __future__ import annotations

import copy
import importlib.util
import inspect
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import layerzero as lz  # noqa: E402
from layerzero.integrations import inline  # noqa: E402
from layerzero.integrations.inline import convbert as inline_convbert  # noqa: E402
from layerzero.integrations.inline import roformer as inline_roformer  # noqa: E402
from layerzero.patch import Report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("zoo_transformers_inline_rc", ROOT / "scripts" / "zoo_transformers.py")
zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)

OURS = ("roformer", "convbert")
STYLE = {"roformer": inline_roformer, "convbert": inline_convbert}
CLASS = {"roformer": "RoFormerSelfAttention", "convbert": "ConvBertSelfAttention"}
ROWS = [("causal", "roformer"), ("encoder", "roformer"), ("encoder", "convbert")]


def test_tried_before_bert():
    """bert's recogniser also matches ConvBertSelfAttention: these forms come first."""
    assert inline.STYLES.index("convbert") < inline.STYLES.index("bert")
    assert inline.STYLES.index("roformer") < inline.STYLES.index("bert")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_BUILT: dict = {}


def _family(kind, family, **overrides):
    """(eager model, inputs, unpatched output) from the zoo's tiny config (with overrides)."""
    key = (kind, family, tuple(sorted(overrides.items())))
    if key not in _BUILT:
        cls = getattr(transformers, zoo.class_name(kind, family))
        cfg = zoo._config_for(cls, zoo.tiny_config(family))
        if kind == "causal":
            cfg.is_decoder = True
        for k, v in overrides.items():
            setattr(cfg, k, v)
        model = zoo._build(cls, cfg, "eager")
        kw = zoo._inputs(kind, cfg, model)
        _BUILT[key] = (model, kw, zoo._forward(model, kw))
    model, kw, want = _BUILT[key]
    return copy.deepcopy(model), kw, want


def _modules(model, family):
    return [m for m in model.modules() if type(m).__name__ == CLASS[family]]


def _close(kind, kw, got, want):
    torch.testing.assert_close(zoo._valid(kind, kw, got), zoo._valid(kind, kw, want), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind,family", ROWS)
def test_family_is_patched_exact_and_unpatched(kind, family):
    model, kw, want = _family(kind, family)
    style = STYLE[family]
    mods = _modules(model, family)
    assert mods and all(inline.recognise(m) is style for m in mods)

    report = lz.patch(model)
    patched = [i for i in report.items if i.kind == "attention" and i.status == "patched"]
    assert len(patched) == len(mods) and all(style.DESCRIPTION in i.detail for i in patched)
    rope = [i for i in report.items if i.kind == "rope" and i.status == "patched"]
    assert len(rope) == (len(mods) if family == "roformer" else 0)
    lz.reset_metrics()       # after the probes: the forward itself must run LayerZero's ops
    got = zoo._forward(model, kw)
    calls = lz.metrics()["calls"]
    assert calls.get("attention") and bool(calls.get("rope")) == (family == "roformer")
    _close(kind, kw, got, want)
    lz.unpatch(model)
    assert torch.equal(zoo._forward(model, kw), want)


@pytest.mark.parametrize("overrides", [{}, {"rotary_value": True}], ids=["plain", "rotary_value"])
def test_roformer_cached_greedy_generate_gives_the_unpatched_tokens(overrides):
    model, kw, want = _family("causal", "roformer", **overrides)
    with torch.no_grad():
        tokens = model.generate(**kw, max_new_tokens=5, do_sample=False)
    lz.patch(model)
    lz.reset_metrics()
    got = zoo._forward(model, kw)
    _close("causal", kw, got, want)
    with torch.no_grad():
        assert torch.equal(model.generate(**kw, max_new_tokens=5, do_sample=False), tokens)
    # 2 layers: the forward, then the prefill and 4 cached steps
    assert sum(lz.metrics()["calls"]["attention"].values()) == 2 * 6


def test_roformer_decoder_with_cross_attention():
    """Self-attention through an EncoderDecoderCache's self part is swapped; cross-attention
    (encoder states) runs the original."""
    model, kw, _ = _family("causal", "roformer", add_cross_attention=True)
    enc = torch.randn(2, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    call = dict(kw, encoder_hidden_states=enc, use_cache=True)
    with torch.no_grad():
        want = model(**call).logits
    assert len(_modules(model, "roformer")) == 4
    report = lz.patch(model)
    assert len([i for i in report.items if i.kind == "attention" and i.status == "patched"]) == 4
    lz.reset_metrics()
    with torch.no_grad():
        out = model(**call)
    assert type(out.past_key_values).__name__ == "EncoderDecoderCache"
    assert sum(lz.metrics()["calls"]["attention"].values()) == 2      # the self-attention only
    _close("causal", kw, out.logits, want)


@pytest.mark.parametrize("kind,family", ROWS)
def test_output_attentions_runs_the_original(kind, family):
    model, kw, _ = _family(kind, family)
    ref = copy.deepcopy(model)
    lz.patch(model)
    lz.reset_metrics()
    with torch.no_grad():
        got = model(**kw, output_attentions=True)
        want = ref(**kw, output_attentions=True)
    assert not lz.metrics()["calls"].get("attention")
    assert got.attentions and len(got.attentions) == len(want.attentions)
    for a, b in zip(got.attentions, want.attentions):
        assert torch.equal(a, b)


def test_convbert_attentions_asked_through_the_config_run_the_original():
    """convbert records the probabilities with output hooks: the flag never reaches the module."""
    model, kw, _ = _family("encoder", "convbert")
    ref = copy.deepcopy(model)
    lz.patch(model)
    for m in (model, ref):
        m.config.output_attentions = True
    lz.reset_metrics()
    with torch.no_grad():
        got, want = model(**kw), ref(**kw)
    assert not lz.metrics()["calls"].get("attention")
    assert len(got.attentions) == len(want.attentions) == 2
    for a, b in zip(got.attentions, want.attentions):
        assert torch.equal(a, b)


def test_recognisers_are_exclusive():
    """Each style takes its own family's attention module only: no other module of these models
    or of BERT's."""
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                                          intermediate_size=128, vocab_size=128))
    models = {f: _family(k, f)[0] for k, f in ROWS}
    for family, style in STYLE.items():
        others = list(bert.modules())
        for f, model in models.items():
            others += [m for m in model.modules() if f != family or type(m).__name__ != CLASS[family]]
        assert not any(style.recognised(m) for m in others)


def _twisted(m):
    """`m` with its forward's signature and structure, but the context scaled (other math)."""
    cls = type(m)
    orig = cls.forward

    def forward(self, *args, **kwargs):
        ctx, probs = orig(self, *args, **kwargs)
        return ctx * 1.5, probs
    forward.__signature__ = inspect.signature(orig)
    m.__class__ = type("Twisted" + cls.__name__, (cls,), {"forward": forward})
    return m


@pytest.mark.parametrize("family", OURS)
def test_look_alike_with_other_math_is_skipped(family):
    kind = "encoder"
    model, _, _ = _family(kind, family)
    m = _twisted(_modules(model, family)[0])
    assert inline.recognise(m) is STYLE[family]
    report, undo = Report(type(m).__name__), []
    assert inline.patch_inline(m, report, undo) == {"": False} and not undo
    (item,) = report.items
    assert item.status == "skipped" and "differs on a probe" in item.detail
