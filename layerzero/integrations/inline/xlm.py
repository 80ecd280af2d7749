"""XLM-style multi-head attention written inline (transformers' xlm `MultiHeadAttention`, copied
by flaubert) -> `lz.attention`.

Recognised by structure: `q_lin` / `k_lin` / `v_lin` / `out_lin` Linear projections of `dim` into
`n_heads` x `head_dim`, a float `dropout` probability, a `layer_id`, and the forward
(input, mask, kv, cache, output_attentions, **kwargs). The model builds the masks itself: a
(batch, keys) padding mask, or a (batch, queries, keys) causal one for a causal LM; a position
whose mask entry is 0 is not attended. The replacement runs self-attention (no `kv`) with either
mask, with or without a cache (the model passes an EncoderDecoderCache on every call: its
self-attention part, or a plain Cache, is updated exactly as the module's own forward does);
it returns the same 1-tuple (output,). Any other call (cross-attention over `kv`, returned
probabilities, extra keywords, a cache that is not a transformers Cache) runs the module's own
forward. A query whose every key is masked gets zeros, where the original averages all values:
such rows exist only for an all-padding sample. Before swapping, both forwards run on a probe
(random hidden states and a padding mask) and must agree, as for norms and MLPs.
"""
from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from ... import ops
from ...patch import probe_input
from . import probe_tuple

DESCRIPTION = "inline XLM-style multi-head attention"

_PROJ = ("q_lin", "k_lin", "v_lin", "out_lin")
_PARAMS = ["input", "mask", "kv", "cache", "output_attentions"]


def recognised(m: nn.Module) -> bool:
    """Does `m` look like XLM's MultiHeadAttention?"""
    if not all(isinstance(getattr(m, n, None), nn.Linear) for n in _PROJ):
        return False
    h, d, dim = getattr(m, "n_heads", None), getattr(m, "head_dim", None), getattr(m, "dim", None)
    ints = (h, d, dim, getattr(m, "layer_id", None))
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in ints):
        return False
    if not (h * d == dim == m.q_lin.out_features == m.k_lin.out_features == m.v_lin.out_features
            == m.out_lin.in_features):
        return False
    p = getattr(m, "dropout", None)
    if not isinstance(p, (int, float)) or isinstance(p, bool):   # a probability, not nn.Dropout
        return False
    try:
        params = list(inspect.signature(type(m).forward).parameters.values())
    except (TypeError, ValueError):
        return False
    rest = params[1 + len(_PARAMS):]
    return ([q.name for q in params[1:1 + len(_PARAMS)]] == _PARAMS
            and all(q.kind is inspect.Parameter.VAR_KEYWORD for q in rest))


def _self_cache(cache):
    """The cache the module's forward updates for self-attention: the self-attention part of an
    EncoderDecoderCache, else the cache itself."""
    from transformers.cache_utils import EncoderDecoderCache  # the module's own forward uses it
    return cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache


def _plain_cache(cache) -> bool:
    if cache is None:
        return True
    from transformers.cache_utils import Cache
    return isinstance(cache, Cache)


def make_forward(original):
    def forward(self, input, mask, kv=None, cache=None, output_attentions=False, **kwargs):
        if (kv is not None or output_attentions or kwargs or not isinstance(input, torch.Tensor)
                or input.dim() != 3 or not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 3)
                or not _plain_cache(cache)):
            return original(input, mask, kv, cache, output_attentions, **kwargs)
        b, s, _ = input.shape
        h, d = self.n_heads, self.head_dim
        q, k, v = (getattr(self, n)(input).view(b, -1, h, d).transpose(1, 2) for n in _PROJ[:3])
        if cache is not None:
            k, v = _self_cache(cache).update(k, v, self.layer_id, kwargs={})
        keep = (mask != 0).view((b, 1, s, -1) if mask.dim() == 3 else (b, 1, 1, -1))
        out = ops.attention(q, k, v, attn_mask=keep, scale=1.0 / math.sqrt(d),
                            dropout_p=self.dropout if self.training else 0.0)
        return (self.out_lin(out.transpose(1, 2).reshape(b, s, h * d)),)
    forward.__name__ = "lz_inline_xlm_attention_forward"
    return forward


def check(m: nn.Module, device) -> tuple[bool, str]:
    """Run the module's forward and the replacement on a probe; (agree, why not)."""
    dtype = m.q_lin.weight.dtype
    x = probe_input((2, 5, m.q_lin.in_features), None, dtype=dtype, device=device)
    mask = torch.ones(2, 5, dtype=torch.bool, device=device)
    mask[1, :2] = False
    return probe_tuple(m, make_forward, 1, "(output,)", dtype, x, mask=mask)


def details(m: nn.Module) -> dict:
    return {"op": "attention", "num_heads": m.n_heads, "head_dim": m.head_dim}
