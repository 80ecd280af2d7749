"""RoFormer-style self-attention written inline (not through transformers' AttentionInterface) ->
`lz.attention`, with its rotary embedding through `lz.rope`.

RoFormer's self-attention is BERT's (`query` / `key` / `value`, softmax(q k^T / sqrt(d) + mask) v,
dropout on the probabilities) with a rotary embedding on q and k (and v when `rotary_value`) before
the cache: `apply_rotary_position_embeddings(sinusoidal_pos, ...)`, where `sinusoidal_pos` (1, 1, S,
D) holds [sin | cos] of each angle once and the rotation is the interleaved "rotate every two" one,
i.e. `lz.rope(..., interleaved=True)` with cos/sin holding each angle twice in adjacent positions.

Recognised by structure: the three Linear projections into `num_attention_heads` x
`attention_head_size`, a Dropout, a bool `rotary_value`, the static
`apply_rotary_position_embeddings`, and a forward (hidden_states, attention_mask, sinusoidal_pos,
encoder_hidden_states, cache, output_attentions, **kwargs). The replacement runs only the plain call:
self-attention with an additive (float) mask or none, `sinusoidal_pos` (1, 1, S, D) or none, through
the module's cache when the call passes one (K/V, rotated, appended as the module's forward appends
them; an EncoderDecoderCache's self-attention part), no returned probabilities: it returns (context,
None) where the module returns (context, probabilities) - the callers read the probabilities only
with output_attentions - and not while transformers records attentions through output hooks. Any
other call (encoder states, output_attentions, a keyword it does not know) runs the module's own
forward. Before swapping, both forwards run on a probe and on a decoding step through a
DynamicCache, and must agree.
"""
from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from ... import ops
from ...patch import agree, observe, probe, probe_input
from . import attentions_recorded, forward_params
from .bert import _plain, _self_cache, decode_step

DESCRIPTION = "inline RoFormer-style self-attention (rotary)"
ROPE = True   # q/k (and v with rotary_value) rotate through lz.rope inside the replacement

_PROJ = ("query", "key", "value")
_PARAMS = ["hidden_states", "attention_mask", "sinusoidal_pos", "encoder_hidden_states", "cache",
           "output_attentions", "kwargs"]


def recognised(m: nn.Module) -> bool:
    """Does `m` look like RoFormer's self-attention?"""
    if not all(isinstance(getattr(m, n, None), nn.Linear) for n in _PROJ):
        return False
    h, d = getattr(m, "num_attention_heads", None), getattr(m, "attention_head_size", None)
    if not (isinstance(h, int) and isinstance(d, int) and all(getattr(m, n).out_features == h * d for n in _PROJ)):
        return False
    if not (isinstance(getattr(m, "dropout", None), nn.Dropout) and isinstance(getattr(m, "rotary_value", None), bool)
            and isinstance(inspect.getattr_static(type(m), "apply_rotary_position_embeddings", None), staticmethod)):
        return False
    return forward_params(m) == _PARAMS


def _cos_sin(pos: torch.Tensor):
    """`sinusoidal_pos` (1, 1, S, D) = [sin | cos] -> lz.rope's interleaved (cos, sin), (S, D)."""
    sin, cos = pos[0, 0].chunk(2, dim=-1)
    return cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)


def make_forward(original):
    names = list(inspect.signature(original).parameters)
    at = names.index("sinusoidal_pos")
    rest = names[:at] + names[at + 1:]      # _plain's view: the call without the rotary

    def forward(self, *args, **kwargs):
        if len(args) > at:
            return original(*args, **kwargs)
        kw = dict(kwargs)
        pos = kw.pop("sinusoidal_pos", None)
        call = _plain(rest, args, kw)
        if call is None or attentions_recorded():
            return original(*args, **kwargs)
        hidden_states, attention_mask, cache, extra = call
        cache = _self_cache(self, cache)
        if (cache is False or not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3
                or (attention_mask is not None and (attention_mask.dim() != 4
                                                    or not attention_mask.is_floating_point()))):
            return original(*args, **kwargs)
        b, s, _ = hidden_states.shape
        h, d = self.num_attention_heads, self.attention_head_size
        if pos is not None and not (isinstance(pos, torch.Tensor) and pos.shape == (1, 1, s, d) and d % 2 == 0):
            return original(*args, **kwargs)
        q, k, v = (getattr(self, n)(hidden_states).view(b, s, h, d).transpose(1, 2) for n in _PROJ)
        if pos is not None:
            cos, sin = _cos_sin(pos)
            q, k = ops.rope(q, k, cos, sin, interleaved=True)
            if self.rotary_value:      # lz.rope rotates a pair: v goes as both
                v = ops.rope(v, v, cos, sin, interleaved=True)[0]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=extra)
        observe(self, (b, s, k.shape[-2]))
        out = ops.attention(q, k, v, attn_mask=attention_mask, scale=1.0 / math.sqrt(d),
                            dropout_p=self.dropout.p if self.training else 0.0)
        return out.transpose(1, 2).reshape(b, s, h * d), None
    forward.__name__ = "lz_inline_roformer_attention_forward"
    return forward


def _sinusoidal(n: int, d: int, start: int, dtype, device) -> torch.Tensor:
    """RoFormer's `sinusoidal_pos` for positions start .. start + n - 1: (1, 1, n, d) = [sin | cos]."""
    pos = torch.arange(start, start + n, dtype=torch.float64)[:, None]
    angles = pos * 10000.0 ** (-torch.arange(0, d // 2, dtype=torch.float64) * 2 / d)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype=dtype, device=device)[None, None]


def _cache_probe(m: nn.Module, x, device, dtype) -> tuple[bool, str]:
    """Both forwards on a decoding step (`bert.decode_step`, the probe's 5 new tokens at positions
    3..7); outputs and the caches' keys/values must agree."""
    pos = _sinusoidal(5, m.attention_head_size, 3, dtype, device)
    outs, caches = decode_step(m, make_forward, x, dtype, device, sinusoidal_pos=pos)
    ok, err = agree(outs[1][0], outs[0][0], dtype)
    layers = [c.layers[m.layer_idx] for c in caches]
    same = ok and all(agree(getattr(layers[1], n), getattr(layers[0], n), dtype)[0] for n in ("keys", "values"))
    return same, "" if same else f"differs on a probe with a cache (err {err:.2g})"


def check(m: nn.Module, device) -> tuple[bool, str]:
    """Run the module's forward and the replacement on a probe (with the rotary, and on a decoding
    step through a cache); (agree, why not)."""
    dtype = m.query.weight.dtype
    x = probe_input((2, 5, m.query.in_features), None, dtype=dtype, device=device)
    mask = torch.zeros(2, 1, 1, 5, dtype=dtype, device=device)
    mask[1, ..., :2] = torch.finfo(dtype).min
    pos = _sinusoidal(5, m.attention_head_size, 0, dtype, device)
    try:
        want, got = probe(m, make_forward, x, attention_mask=mask, sinusoidal_pos=pos)
        if not isinstance(want, tuple) or len(want) != 2 or not isinstance(want[0], torch.Tensor):
            return False, "its forward does not return (context, probabilities)"
        ok, err = agree(got[0], want[0], dtype)
        if not ok:
            return False, f"differs on a probe (err {err:.2g})"
        if isinstance(getattr(m, "layer_idx", None), int):
            return _cache_probe(m, x, device, dtype)
    except Exception as e:  # noqa: BLE001 - a module we can't call plainly is left alone
        return False, f"probe raised {type(e).__name__}: {e}"
    return True, ""


def details(m: nn.Module) -> dict:
    return {"op": "attention", "num_heads": m.num_attention_heads, "head_dim": m.attention_head_size,
            "rotary_value": m.rotary_value}
