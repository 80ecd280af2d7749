"""BERT-style self-attention written inline (not through transformers' AttentionInterface) ->
`lz.attention`, for the families that keep their own copy of it (megatron-bert, rembert, tapas,
canine, big_bird's full attention, ...).

Recognised by structure: `query` / `key` / `value` Linear projections of the hidden states into
`num_attention_heads` x `attention_head_size`, a Dropout on the probabilities, absolute positions.
The replacement runs only the plain call: self-attention with an additive (float) mask, through
the module's cache when the call passes one (a decoder's: K/V appended as the module's forward
appends them, an EncoderDecoderCache's self-attention part), no cross-attention, no returned
probabilities; any other call (a keyword it does not know, encoder states, output_attentions)
runs the module's own forward. Before swapping, both forwards run on a probe (random hidden
states and a padding mask; and a decoding step through a DynamicCache where the forward takes a
cache) and must agree, as for norms and MLPs.
"""
from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from ... import ops
from ...patch import _run_original, agree, probe, probe_input, swap_forward
from . import attentions_recorded, forward_params

DESCRIPTION = "inline BERT-style self-attention"

_PROJ = ("query", "key", "value")


# parameters a BERT-style forward may have besides (hidden_states, attention_mask): the calls
# that use none of them are the replacement's; a forward with any other (roformer's
# sinusoidal_pos, ...) is another form
_KNOWN_PARAMS = frozenset({"head_mask", "encoder_hidden_states", "encoder_attention_mask", "cache",
                           "past_key_values", "output_attentions", "cache_position", "position_ids",
                           "use_cache", "kwargs"})


def recognised(m: nn.Module) -> bool:
    """Does `m` look like a BERT-style self-attention module?"""
    if not all(isinstance(getattr(m, n, None), nn.Linear) for n in _PROJ):
        return False
    h, d = getattr(m, "num_attention_heads", None), getattr(m, "attention_head_size", None)
    if not (isinstance(h, int) and isinstance(d, int) and m.query.out_features == h * d
            and m.key.out_features == h * d and m.value.out_features == h * d):
        return False
    if getattr(m, "position_embedding_type", "absolute") != "absolute":
        return False
    if not isinstance(getattr(m, "dropout", None), nn.Dropout):
        return False
    params = forward_params(m)
    return params is not None and params[:2] == ["hidden_states", "attention_mask"] and set(params[2:]) <= _KNOWN_PARAMS


# keyword arguments a plain call may carry besides the hidden states, the mask and the cache
# (the original hands them to the cache's update, as the replacement does)
_INFORMATIONAL = frozenset({"cache_position", "position_ids", "use_cache"})


def _plain(names: list, args: tuple, kwargs: dict):
    """(hidden_states, attention_mask, cache, extra keywords) of a plain self-attention call of a
    forward with parameters `names`, or None for any other call (encoder states, a head mask,
    output_attentions, positional extras, a keyword it does not know)."""
    named = [n for n in names if n != "kwargs"]
    if len(args) > len(named) or any(k in named[: len(args)] for k in kwargs):
        return None
    call = dict(zip(named, args))
    extra = {}
    for k, v in kwargs.items():
        (call if k in named else extra)[k] = v
    if any(v is not None and v is not False for k, v in call.items()
           if k not in ("hidden_states", "attention_mask", "cache")):
        return None
    if any(k not in _INFORMATIONAL for k in extra) or (extra and "kwargs" not in names):
        return None
    return call.get("hidden_states"), call.get("attention_mask"), call.get("cache"), extra


def _self_cache(self, cache):
    """The cache this module's self-attention K/V go through (an EncoderDecoderCache's self part),
    or False when the call has one the replacement does not handle."""
    if cache is None:
        return None
    if not isinstance(getattr(self, "layer_idx", None), int):
        return False
    if type(cache).__name__ == "EncoderDecoderCache":
        cache = cache.self_attention_cache
    return cache if callable(getattr(cache, "update", None)) else False


# what the module's forward returns on a plain call, read off the probe (check): the number of
# leading items (context alone, or context and probabilities: None here) and whether a decoder
# appends its cache; by class
_FORMS: dict = {}


def _result(self, out, cache_arg):
    n, appends = _FORMS.get(type(self), (2, False))
    res = (out,) if n == 1 else (out, None)
    return res + (cache_arg,) if appends and getattr(self, "is_decoder", False) else res


def make_forward(original):
    names = list(inspect.signature(original).parameters)

    def forward(self, *args, **kwargs):
        call = _plain(names, args, kwargs)
        if call is None or attentions_recorded():
            return original(*args, **kwargs)
        hidden_states, attention_mask, cache_arg, extra = call
        cache = _self_cache(self, cache_arg)
        if (cache is False or not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3
                or (attention_mask is not None and (attention_mask.dim() != 4
                                                    or not attention_mask.is_floating_point()))):
            return original(*args, **kwargs)
        b, s, _ = hidden_states.shape
        h, d = self.num_attention_heads, self.attention_head_size
        q, k, v = (getattr(self, n)(hidden_states).view(b, s, h, d).transpose(1, 2) for n in _PROJ)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=extra)
        out = ops.attention(q, k, v, attn_mask=attention_mask, scale=1.0 / math.sqrt(d),
                            dropout_p=self.dropout.p if self.training else 0.0)
        return _result(self, out.transpose(1, 2).reshape(b, s, h * d), cache_arg)
    forward.__name__ = "lz_inline_self_attention_forward"
    return forward


def decode_step(m: nn.Module, make_forward, x, dtype, device, after_original=None, **kwargs):
    """(outputs, caches) of the module's forward and then of `make_forward`'s on a decoding step:
    a DynamicCache holding 3 earlier positions (one copy for each run), the probe's 5 new ones, a
    padding mask over the 8 keys and `kwargs`. `after_original(out, cache)` runs between the two."""
    from transformers.cache_utils import DynamicCache

    h, d = m.num_attention_heads, m.attention_head_size
    past = [probe_input((2, h, 3, d), None, dtype=dtype, device=device) * s for s in (1.0, 0.5)]
    mask = torch.zeros(2, 1, 5, 8, dtype=dtype, device=device)
    mask[1, ..., :2] = torch.finfo(dtype).min
    outs, caches = [], []
    for swapped in (False, True):
        cache = DynamicCache()
        cache.update(past[0].clone(), past[1].clone(), m.layer_idx)
        undo: list = []
        if swapped:
            swap_forward(m, make_forward, undo)
        try:
            outs.append(_run_original(m, x, attention_mask=mask, cache=cache, **kwargs))
        finally:
            for fn in reversed(undo):
                fn()
        caches.append(cache)
        if not swapped and after_original is not None:
            after_original(outs[0], cache)
    return outs, caches


def _cache_probe(m: nn.Module, x, device, dtype) -> tuple[bool, str]:
    """Both forwards on a decoding step (`decode_step`); outputs and the caches' keys/values
    must agree."""
    def note_form(out, cache):   # a decoder returning its cache after the context
        n, _ = _FORMS[type(m)]
        _FORMS[type(m)] = (n, len(out) == n + 1 and out[-1] is cache)

    outs, caches = decode_step(m, make_forward, x, dtype, device, note_form)
    if len(outs[1]) != len(outs[0]):
        return False, "returns other items than its forward with a cache"
    ok, err = agree(outs[1][0], outs[0][0], dtype)
    layers = [c.layers[m.layer_idx] for c in caches]
    same = ok and all(torch.equal(getattr(layers[0], n), getattr(layers[1], n)) for n in ("keys", "values"))
    return same, "" if same else f"differs on a probe with a cache (err {err:.2g})"


def check(m: nn.Module, device) -> tuple[bool, str]:
    """Run the module's forward and the replacement on a probe (and on a decoding step through a
    cache, where the forward takes one); (agree, why not)."""
    hidden = m.query.in_features
    dtype = m.query.weight.dtype
    x = probe_input((2, 5, hidden), None, dtype=dtype, device=device)
    mask = torch.zeros(2, 1, 1, 5, dtype=dtype, device=device)
    mask[1, ..., :2] = torch.finfo(dtype).min
    try:
        want = _run_original(m, x, attention_mask=mask)
        if not isinstance(want, tuple) or len(want) not in (1, 2) or not isinstance(want[0], torch.Tensor):
            return False, "its forward does not return (context,) or (context, probabilities)"
        _FORMS[type(m)] = (len(want), False)
        want, got = probe(m, make_forward, x, attention_mask=mask)
        if len(got) != len(want):
            return False, "returns other items than its forward"
        ok, err = agree(got[0], want[0], dtype)
        if not ok:
            return False, f"differs on a probe (err {err:.2g})"
        if "cache" in inspect.signature(type(m).forward).parameters and isinstance(getattr(m, "layer_idx", None), int):
            return _cache_probe(m, x, device, dtype)
    except Exception as e:  # noqa: BLE001 - a module we can't call plainly is left alone
        return False, f"probe raised {type(e).__name__}: {e}"
    return True, ""


def details(m: nn.Module) -> dict:
    return {"op": "attention", "num_heads": m.num_attention_heads, "head_dim": m.attention_head_size}
