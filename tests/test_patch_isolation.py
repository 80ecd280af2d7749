"""lz.patch changes only the model it is given: an unpatched model of the same family, in the same
process, never runs LayerZero code (before, while and after another model is patched, unpatched or
garbage-collected), and nothing module-level that a compile may be tracing is ever swapped."""
from __future__ import annotations

import gc
import sys

import pytest
import torch

T = pytest.importorskip("transformers")

import layerzero as lz  # noqa: E402

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _llama():
    torch.manual_seed(0)
    return T.LlamaForCausalLM._from_config(T.LlamaConfig(**SMALL)).eval()


def _ids():
    return torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(1))


def _module_level():
    """What lz.patch used to swap module-wide: RoPE functions and the cache layer's update."""
    from transformers import cache_utils
    mod = sys.modules[T.LlamaForCausalLM.__module__]
    return mod.apply_rotary_pos_emb, cache_utils.DynamicLayer.update


def _lz_calls(model, ids):
    """(logits, lz.metrics() calls) of one forward of `model` with a DynamicCache."""
    lz.reset_metrics()
    with torch.no_grad():
        out = model(ids, use_cache=True).logits
    return out, lz.metrics()["calls"]


def test_unpatched_model_never_runs_layerzero_code():
    gc.collect()
    ids = _ids()
    own = _module_level()
    plain = _llama()
    ref, calls = _lz_calls(plain, ids)
    assert not calls
    patched = _llama()
    lz.patch(patched)
    assert _module_level() == own         # nothing module-level was swapped
    out, calls = _lz_calls(plain, ids)
    assert not calls, calls               # the unpatched model runs transformers' code only
    assert torch.equal(out, ref)
    _, calls = _lz_calls(patched, ids)
    assert {"rope", "attention", "rms_norm", "swiglu"} <= set(calls), calls
    other = _llama()
    lz.patch(other)
    del other                              # another patched model's lifetime does not matter
    gc.collect()
    _, calls = _lz_calls(patched, ids)
    assert "rope" in calls, calls
    del patched
    gc.collect()
    assert _module_level() == own
    out, calls = _lz_calls(plain, ids)
    assert not calls and torch.equal(out, ref)


def test_patched_rope_survives_unpatching_another_model():
    ids = _ids()
    a, b = _llama(), _llama()
    lz.patch(a)
    lz.patch(b)
    lz.unpatch(b)
    _, calls = _lz_calls(a, ids)
    assert "rope" in calls, calls
    _, calls = _lz_calls(b, ids)
    assert not calls, calls
    lz.unpatch(a)


def test_compiled_unpatched_model_is_not_retraced_when_a_patched_one_goes():
    """torch.compile of an unpatched model traces transformers' code only, and patching or
    collecting another model of the family changes nothing its guards watch (no recompile)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    ids = _ids()
    plain = _llama()
    ref, _ = _lz_calls(plain, ids)
    patched = _llama()
    lz.patch(patched)
    compiled = torch.compile(plain, backend="eager")
    lz.reset_metrics()
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, ref, atol=1e-5, rtol=1e-5)
    assert not lz.metrics()["calls"]
    frames = counters["stats"]["unique_graphs"]
    _lz_calls(patched, ids)
    del patched
    gc.collect()
    lz.reset_metrics()
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, ref, atol=1e-5, rtol=1e-5)
    assert not lz.metrics()["calls"]
    assert counters["stats"]["unique_graphs"] == frames   # no recompile
    torch._dynamo.reset()


def test_patched_model_cache_stores_first_update_without_copy_unpatched_copies():
    """The no-copy first cache update is the patched model's alone: the unpatched model's cache
    concatenates the prompt's K/V onto empty tensors (transformers' update), the patched one's
    does not; both hold the same values, and no layer keeps anything of LayerZero's."""
    ids = _ids()
    plain, patched = _llama(), _llama()
    patched.load_state_dict(plain.state_dict())
    lz.patch(patched)
    onto_empty, caches = [], []
    orig_cat = torch.cat

    def counting_cat(ts, *args, **kwargs):
        onto_empty[-1] += len(ts) == 2 and ts[0].numel() == 0 and ts[1].numel() > 0
        return orig_cat(ts, *args, **kwargs)
    for m in (plain, patched, plain):
        onto_empty.append(0)
        torch.cat = counting_cat
        try:
            with torch.no_grad():
                caches.append(m(ids, use_cache=True).past_key_values)
        finally:
            torch.cat = orig_cat
    assert onto_empty == [4, 0, 4]     # 2 layers x (K, V) for the unpatched model, each time
    torch.testing.assert_close(caches[1].layers[0].keys, caches[0].layers[0].keys, atol=1e-5, rtol=1e-5)
    assert all("update" not in vars(layer) for c in caches for layer in c.layers)
    lz.unpatch(patched)
