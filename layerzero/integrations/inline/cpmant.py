"""CPM-Ant-style attention written inline (not through transformers' AttentionInterface) ->
`lz.attention`.

Recognised by structure: `project_q` / `project_k` / `project_v` Linear projections into
`num_heads` x `dim_head`, an output Linear `attention_out` applied inside the module, and a
forward `(hidden_q, hidden_kv, attention_mask, position_bias, output_attentions, cache,
use_cache, **kwargs)`: scores `q k^T / sqrt(d) + position_bias`, masked to -inf where the
(batch, len_q, len_k) mask is False, softmax, probabilities zeroed where masked (a query with no
key gets zeros, as `lz.attention` gives). The replacement folds the bias and the mask into one float
`attn_mask` (-inf where masked) and updates the cache exactly as the module does
(`cache.update(key, value, layer_idx, kwargs=...)`, keys/values in (batch, heads, len, dim)), so
cached decoding runs through `lz.attention` too. Calls returning the probabilities, or with any
other keyword (the deprecated `past_key_values` name, ...), run the module's own forward. Before
swapping, both forwards run on a probe (random hidden states and bias, a causal padding mask) and
must agree.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ... import ops
from ...patch import probe_input
from . import forward_params, probe_tuple

DESCRIPTION = "inline CPM-Ant-style attention (position bias, cache)"

_PROJ = ("project_q", "project_k", "project_v")
_PARAMS = ["hidden_q", "hidden_kv", "attention_mask", "position_bias", "output_attentions", "cache",
           "use_cache", "kwargs"]


def recognised(m: nn.Module) -> bool:
    """Does `m` look like CPM-Ant's attention?"""
    if not all(isinstance(getattr(m, n, None), nn.Linear) for n in (*_PROJ, "attention_out")):
        return False
    h, d = getattr(m, "num_heads", None), getattr(m, "dim_head", None)
    if not (isinstance(h, int) and isinstance(d, int)
            and all(getattr(m, n).out_features == h * d for n in _PROJ)
            and m.attention_out.in_features == h * d):
        return False
    if not isinstance(getattr(m, "dropout", None), (nn.Dropout, type(None))) or not hasattr(m, "layer_idx"):
        return False
    return forward_params(m) == _PARAMS


def _float_mask(attention_mask, position_bias, b, lq):
    """position_bias (batch, heads, len_q, len_k), -inf where the (batch, len_q, len_k) mask is False
    (the module's masked_fill); None when the call has another form."""
    if not (isinstance(attention_mask, torch.Tensor) and isinstance(position_bias, torch.Tensor)
            and position_bias.is_floating_point() and position_bias.dim() == 4):
        return None
    lk = position_bias.shape[-1]
    if attention_mask.numel() != b * lq * lk:
        return None
    masked = attention_mask.view(b, 1, lq, lk) == torch.tensor(False)
    return position_bias.masked_fill(masked, float("-inf"))


def make_forward(original):
    def forward(self, hidden_q, hidden_kv, attention_mask, position_bias, output_attentions=False,
                cache=None, use_cache=None, **kwargs):
        def fallback():
            return original(hidden_q, hidden_kv, attention_mask, position_bias, output_attentions, cache,
                            use_cache, **kwargs)
        if output_attentions or kwargs or hidden_q.dim() != 3 or hidden_kv.dim() != 3:
            return fallback()
        b, lq, _ = hidden_q.shape
        h, d = self.num_heads, self.dim_head
        q = self.project_q(hidden_q).view(b, lq, h, d).permute(0, 2, 1, 3)
        k = self.project_k(hidden_kv).view(b, -1, h, d).permute(0, 2, 1, 3)
        v = self.project_v(hidden_kv).view(b, -1, h, d).permute(0, 2, 1, 3)
        mask = _float_mask(attention_mask, position_bias, b, lq)
        if mask is None:
            return fallback()
        if cache is not None:   # (a length the bias does not cover raises, as in the module)
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        p = self.dropout.p if self.training and self.dropout is not None else 0.0
        out = ops.attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(d), dropout_p=p)
        return self.attention_out(out.transpose(1, 2).reshape(b, lq, h * d)), None
    forward.__name__ = "lz_inline_cpmant_attention_forward"
    return forward


def check(m: nn.Module, device) -> tuple[bool, str]:
    """Run the module's forward and the replacement on a probe; (agree, why not)."""
    hidden = m.project_q.in_features
    dtype = m.project_q.weight.dtype
    x = probe_input((2, 5, hidden), None, dtype=dtype, device=device)
    bias = probe_input((2, m.num_heads, 5, 5), None, dtype=dtype, device=device).flip(-1)
    mask = torch.ones(5, 5, dtype=torch.bool, device=device).tril().repeat(2, 1, 1)
    mask[1, :2, :] = False   # left padding: padded queries see nothing, real ones skip them
    mask[1, :, :2] = False
    return probe_tuple(m, make_forward, 2, "(output, probabilities)", dtype, x, hidden_kv=x, attention_mask=mask, position_bias=bias)


def details(m: nn.Module) -> dict:
    return {"op": "attention", "num_heads": m.num_heads, "head_dim": m.dim_head, "bias": "position"}
