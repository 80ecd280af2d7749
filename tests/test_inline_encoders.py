"""Inline attention of canine, mpnet, cpmant, squeezebert, lilt and luke (layerzero/integrations/
inline/<family>.py) on the zoo's tiny random models: lz.patch recognises each family's attention
module, swaps it after a probe, gives the unpatched output on the non-padding positions (fp32,
1e-4), runs LayerZero's attention in the forward itself, and lz.unpatch gives the output back
bit-exact; cpmant's cached greedy decoding gives the unpatched tokens; luke's entity-aware
attention (entities given) is exact too; calls the replacements do not handle (output_attentions)
run the original; a module with a family's structure but other math is recognised and skipped.
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
from layerzero.integrations.inline import bert as inline_bert  # noqa: E402
from layerzero.patch import Report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("zoo_transformers_inline", ROOT / "scripts" / "zoo_transformers.py")
zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)

# family -> (kind, attention module class name)
FAMILIES = {
    "canine": ("encoder", "CanineSelfAttention"),
    "mpnet": ("encoder", "MPNetSelfAttention"),
    "cpmant": ("causal", "CpmAntAttention"),
    "squeezebert": ("encoder", "SqueezeBertSelfAttention"),
    "lilt": ("encoder", "LiltSelfAttention"),
    "luke": ("encoder", "LukeSelfAttention"),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared CPU: one thread (the zoo's setting), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _style(family):
    return __import__(f"layerzero.integrations.inline.{family}", fromlist=["recognised"])


_BUILT: dict = {}


def _family(family):
    """(eager model, inputs, unpatched output) from the zoo's tiny config; built once."""
    if family not in _BUILT:
        kind = FAMILIES[family][0]
        cls = getattr(transformers, zoo.class_name(kind, family))
        cfg = zoo._config_for(cls, zoo.tiny_config(family))
        model = zoo._build(cls, cfg, "eager")
        kw = zoo._inputs(kind, cfg, model)
        _BUILT[family] = (model, kw, zoo._forward(model, kw))
    model, kw, want = _BUILT[family]
    return copy.deepcopy(model), kw, want


def _attention_modules(model, family):
    return [m for m in model.modules() if type(m).__name__ == FAMILIES[family][1]]


def _valid(kw, out):
    return zoo._valid("encoder", kw, out)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_is_patched_exact_and_unpatched(family):
    model, kw, want = _family(family)
    style = _style(family)
    mods = _attention_modules(model, family)
    assert mods and all(inline.recognise(m) is style for m in mods)
    assert not any(inline_bert.recognised(m) for m in mods)   # bert leaves it to this style

    report = lz.patch(model)
    patched = [i for i in report.items if i.kind == "attention" and i.status == "patched"]
    assert len(patched) == len(mods) and all(style.DESCRIPTION in i.detail for i in patched)
    lz.reset_metrics()       # after the probes: the forward itself must run LayerZero's attention
    got = zoo._forward(model, kw)
    assert lz.metrics()["calls"].get("attention")
    torch.testing.assert_close(_valid(kw, got), _valid(kw, want), atol=1e-4, rtol=1e-4)
    lz.unpatch(model)
    assert torch.equal(zoo._forward(model, kw), want)


@pytest.mark.parametrize("family", ["canine", "mpnet", "cpmant", "lilt", "luke"])
def test_output_attentions_runs_the_original(family):
    model, kw, _ = _family(family)
    ref = copy.deepcopy(model)
    lz.patch(model)
    lz.reset_metrics()
    with torch.no_grad():
        got = model(**kw, output_attentions=True)
        want = ref(**kw, output_attentions=True)
    assert not lz.metrics()["calls"].get("attention")
    assert got.attentions is not None
    for a, b in zip(got.attentions, want.attentions):
        assert torch.equal(a, b)


def test_cpmant_cached_greedy_generate_gives_the_unpatched_tokens():
    model, kw, _ = _family("cpmant")
    with torch.no_grad():
        want = model.generate(**kw, max_new_tokens=5, do_sample=False)
    lz.patch(model)
    lz.reset_metrics()
    with torch.no_grad():
        got = model.generate(**kw, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)
    assert sum(lz.metrics()["calls"]["attention"].values()) == 2 * 5   # 2 layers, prefill + 4 cached steps


def test_luke_entity_aware_attention_is_exact():
    model, kw, _ = _family("luke")
    assert model.config.use_entity_aware_attention
    ents = dict(entity_ids=torch.tensor([[3, 4, 5], [6, 7, 0]]),
                entity_attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
                entity_position_ids=torch.tensor([[[0, 1], [4, -1], [9, 10]], [[6, 7], [12, -1], [-1, -1]]]))
    with torch.no_grad():
        want = model(**kw, **ents)
    lz.patch(model)
    lz.reset_metrics()
    with torch.no_grad():
        got = model(**kw, **ents)
    assert lz.metrics()["calls"].get("attention")
    torch.testing.assert_close(_valid(kw, got.last_hidden_state), _valid(kw, want.last_hidden_state),
                               atol=1e-4, rtol=1e-4)
    v = ents["entity_attention_mask"].bool()
    torch.testing.assert_close(got.entity_last_hidden_state[v], want.entity_last_hidden_state[v],
                               atol=1e-4, rtol=1e-4)


def test_recognisers_are_exclusive():
    """Each style takes its own family's attention module only: no other module of the six models,
    none of BERT's, and no other family's attention."""
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                                          intermediate_size=128, vocab_size=128))
    ours = {name for _, name in FAMILIES.values()}
    others = list(bert.modules())
    for family in FAMILIES:
        others += [m for m in _family(family)[0].modules() if type(m).__name__ not in ours]
    for family in FAMILIES:
        style = _style(family)
        assert not any(style.recognised(m) for m in others)
        for f in FAMILIES:
            if f != family:
                assert not any(style.recognised(m) for m in _attention_modules(_family(f)[0], f))


def _twisted(m):
    """`m` with its forward's signature and structure, but the context scaled (other math)."""
    cls = type(m)
    orig = cls.forward

    def scale(out):
        if isinstance(out, dict):
            return {k: v * 1.5 for k, v in out.items()}
        return tuple(None if t is None else t * 1.5 for t in out)

    def forward(self, *args, **kwargs):
        return scale(orig(self, *args, **kwargs))
    forward.__signature__ = inspect.signature(orig)
    m.__class__ = type("Twisted" + cls.__name__, (cls,), {"forward": forward})
    return m


@pytest.mark.parametrize("family", list(FAMILIES))
def test_look_alike_with_other_math_is_skipped(family):
    model, _, _ = _family(family)
    m = _twisted(_attention_modules(model, family)[0])
    assert inline.recognise(m) is _style(family)
    report, undo = Report(type(m).__name__), []
    assert inline.patch_inline(m, report, undo) == {"": False} and not undo
    (item,) = report.items
    assert item.status == "skipped" and "differs on a probe" in item.detail
