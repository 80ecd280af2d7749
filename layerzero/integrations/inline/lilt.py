"""LiLT-style self-attention written inline (not through transformers' AttentionInterface) ->
`lz.attention`.

LiLT runs a text stream (`query` / `key` / `value`, heads of `attention_head_size` = d) and a
layout stream (`layout_query` / `layout_key` / `layout_value`, heads of d // `channel_shrink_ratio`
= dl) that share their scores: both softmax `q_t k_t^T / sqrt(d) + q_l k_l^T / sqrt(dl) + mask`, the
text stream over its values and the layout stream over its own. One `lz.attention` call gives both:
queries [q_t / sqrt(d), q_l / sqrt(dl)] and keys [k_t, k_l] (concatenated per head) have exactly
that dot product, and values [v_t, v_l] give both contexts, split afterwards.

Recognised by structure: the six Linear projections, `num_attention_heads`, `attention_head_size`,
`channel_shrink_ratio`, a Dropout, and a forward `(hidden_states, layout_inputs, attention_mask,
output_attentions)` returning (text context, layout context). The replacement runs only the plain
call: a float additive mask or none, no returned probabilities, and no dropout in training (the
module draws one dropout mask per stream, a single call cannot); any other call runs the module's
own forward. Before swapping, both forwards run on a probe and must agree.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ... import ops
from ...patch import agree, probe, probe_input
from . import forward_params

DESCRIPTION = "inline LiLT-style text + layout self-attention"

_TEXT = ("query", "key", "value")
_LAYOUT = ("layout_query", "layout_key", "layout_value")
_PARAMS = ["hidden_states", "layout_inputs", "attention_mask", "output_attentions"]


def recognised(m: nn.Module) -> bool:
    """Does `m` look like LiLT's self-attention?"""
    if not all(isinstance(getattr(m, n, None), nn.Linear) for n in (*_TEXT, *_LAYOUT)):
        return False
    h, d = getattr(m, "num_attention_heads", None), getattr(m, "attention_head_size", None)
    r = getattr(m, "channel_shrink_ratio", None)
    if not (isinstance(h, int) and isinstance(d, int) and isinstance(r, int) and r > 0 and d // r > 0
            and all(getattr(m, n).out_features == h * d for n in _TEXT)
            and all(getattr(m, n).out_features == h * (d // r) for n in _LAYOUT)):
        return False
    if not isinstance(getattr(m, "dropout", None), nn.Dropout):
        return False
    return forward_params(m) == _PARAMS


def make_forward(original):
    def forward(self, hidden_states, layout_inputs, attention_mask=None, output_attentions=False):
        if (output_attentions or (self.training and self.dropout.p > 0)
                or hidden_states.dim() != 3 or layout_inputs.dim() != 3
                or (attention_mask is not None
                    and not (attention_mask.is_floating_point() and attention_mask.dim() == 4))):
            return original(hidden_states, layout_inputs, attention_mask, output_attentions)
        b, s, _ = hidden_states.shape
        h, d = self.num_attention_heads, self.attention_head_size
        dl = d // self.channel_shrink_ratio
        qt, kt, vt = (getattr(self, n)(hidden_states).view(b, s, h, d) for n in _TEXT)
        ql, kl, vl = (getattr(self, n)(layout_inputs).view(b, s, h, dl) for n in _LAYOUT)
        q = torch.cat([qt / math.sqrt(d), ql / math.sqrt(dl)], dim=-1)
        out = ops.attention(q, torch.cat([kt, kl], -1), torch.cat([vt, vl], -1), attn_mask=attention_mask,
                            scale=1.0, layout="bshd")
        return out[..., :d].reshape(b, s, h * d), out[..., d:].reshape(b, s, h * dl)
    forward.__name__ = "lz_inline_lilt_attention_forward"
    return forward


def check(m: nn.Module, device) -> tuple[bool, str]:
    """Run the module's forward and the replacement on a probe; (agree, why not)."""
    dtype = m.query.weight.dtype
    x = probe_input((2, 5, m.query.in_features), None, dtype=dtype, device=device)
    lay = probe_input((2, 5, m.layout_query.in_features), None, dtype=dtype, device=device).flip(1)
    mask = torch.zeros(2, 1, 1, 5, dtype=dtype, device=device)
    mask[1, ..., :2] = torch.finfo(dtype).min
    try:
        want, got = probe(m, make_forward, x, layout_inputs=lay, attention_mask=mask)
    except Exception as e:  # noqa: BLE001 - a module we can't call plainly is left alone
        return False, f"probe raised {type(e).__name__}: {e}"
    if not isinstance(want, tuple) or len(want) != 2:
        return False, "its forward does not return (text context, layout context)"
    for a, b in zip(got, want):
        ok, err = agree(a, b, dtype)
        if not ok:
            return False, f"differs on a probe (err {err:.2g})"
    return True, ""


def details(m: nn.Module) -> dict:
    return {"op": "attention", "num_heads": m.num_attention_heads, "head_dim": m.attention_head_size,
            "layout_head_dim": m.attention_head_size // m.channel_shrink_ratio}
