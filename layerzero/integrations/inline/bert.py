"""BERT-style self-attention written inline (not through transformers' AttentionInterface) ->
`lz.attention`, for the families that keep their own copy of it (megatron-bert, rembert, tapas,
canine, big_bird's full attention, ...).

Recognised by structure: `query` / `key` / `value` Linear projections of the hidden states into
`num_attention_heads` x `attention_head_size`, a Dropout on the probabilities, absolute positions.
The replacement runs only the plain call: self-attention with an additive or bool mask, no cache,
no cross-attention, no returned probabilities; any other call (keyword it does not know, a cache,
encoder states, output_attentions) runs the module's own forward. Before swapping, both forwards
run on a probe (random hidden states and a padding mask) and must agree, as for norms and MLPs.
"""
from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from ... import ops
from ...patch import agree, probe, probe_input

DESCRIPTION = "inline BERT-style self-attention"

_PROJ = ("query", "key", "value")


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
    try:
        params = list(inspect.signature(type(m).forward).parameters)
    except (TypeError, ValueError):
        return False
    return params[1:3] == ["hidden_states", "attention_mask"]


def make_forward(original):
    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        plain = all(v is None or v is False for v in (*args, *kwargs.values()))
        if (not plain or hidden_states.dim() != 3
                or (attention_mask is not None and attention_mask.dim() != 4)):
            return original(hidden_states, attention_mask, *args, **kwargs)
        b, s, _ = hidden_states.shape
        h, d = self.num_attention_heads, self.attention_head_size
        q, k, v = (getattr(self, n)(hidden_states).view(b, s, h, d) for n in _PROJ)
        out = ops.attention(q, k, v, attn_mask=attention_mask, scale=1.0 / math.sqrt(d),
                            dropout_p=self.dropout.p if self.training else 0.0, layout="bshd")
        return out.reshape(b, s, h * d), None
    forward.__name__ = "lz_inline_self_attention_forward"
    return forward


def check(m: nn.Module, device) -> tuple[bool, str]:
    """Run the module's forward and the replacement on a probe; (agree, why not)."""
    hidden = m.query.in_features
    dtype = m.query.weight.dtype
    x = probe_input((2, 5, hidden), None, dtype=dtype, device=device)
    mask = torch.zeros(2, 1, 1, 5, dtype=dtype, device=device)
    mask[1, ..., :2] = torch.finfo(dtype).min
    try:
        want, got = probe(m, make_forward, x, attention_mask=mask)
    except Exception as e:  # noqa: BLE001 - a module we can't call plainly is left alone
        return False, f"probe raised {type(e).__name__}: {e}"
    if not isinstance(want, tuple) or len(want) != 2 or not isinstance(want[0], torch.Tensor):
        return False, "its forward does not return (context, probabilities)"
    ok, err = agree(got[0], want[0], dtype)
    return ok, "" if ok else f"differs on a probe (err {err:.2g})"


def details(m: nn.Module) -> dict:
    return {"op": "attention", "num_heads": m.num_attention_heads, "head_dim": m.attention_head_size}
