"""MPNet-style self-attention written inline (not through transformers' AttentionInterface) ->
`lz.attention`.

Recognised by structure: `q` / `k` / `v` Linear projections into `num_attention_heads` x
`attention_head_size`, an output Linear `o` applied inside the module, a Dropout on the
probabilities, and a forward `(hidden_states, attention_mask, position_bias, output_attentions,
**kwargs)`: the scores are `q k^T / sqrt(d) + position_bias + attention_mask` (the relative
position bias precomputed once per encoder). The replacement adds the bias and the mask into one
float `attn_mask`; it runs only the plain call (float or no mask and bias, no returned
probabilities, no other keyword); any other call runs the module's own forward. Before swapping,
both forwards run on a probe (random hidden states, a random position bias, a padding mask) and
must agree.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ... import ops
from ...patch import probe_input
from . import forward_params, probe_tuple

DESCRIPTION = "inline MPNet-style self-attention (relative position bias)"

_PROJ = ("q", "k", "v", "o")
_PARAMS = ["hidden_states", "attention_mask", "position_bias", "output_attentions", "kwargs"]


def recognised(m: nn.Module) -> bool:
    """Does `m` look like MPNet's self-attention (q/k/v/o, position_bias forward)?"""
    if not all(isinstance(getattr(m, n, None), nn.Linear) for n in _PROJ):
        return False
    h, d = getattr(m, "num_attention_heads", None), getattr(m, "attention_head_size", None)
    if not (isinstance(h, int) and isinstance(d, int)
            and all(getattr(m, n).out_features == h * d for n in ("q", "k", "v"))
            and m.o.in_features == h * d):
        return False
    if not isinstance(getattr(m, "dropout", None), nn.Dropout):
        return False
    return forward_params(m) == _PARAMS


def _bias(position_bias, attention_mask):
    """position_bias + attention_mask (either may be None; None if both are), as the module adds
    them to the scores; False when one is not a 4-D float tensor (the call is left to the original)."""
    terms = [t for t in (position_bias, attention_mask) if t is not None]
    if any(not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 4) for t in terms):
        return False
    if not terms:
        return None
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


def make_forward(original):
    def forward(self, hidden_states, attention_mask=None, position_bias=None, output_attentions=False,
                **kwargs):
        mask = _bias(position_bias, attention_mask)
        if (output_attentions or any(v is not None for v in kwargs.values())
                or hidden_states.dim() != 3 or mask is False):
            return original(hidden_states, attention_mask, position_bias,
                            output_attentions=output_attentions, **kwargs)
        b, s, _ = hidden_states.shape
        d = self.attention_head_size
        q, k, v = (getattr(self, n)(hidden_states).view(b, s, -1, d) for n in ("q", "k", "v"))
        out = ops.attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(d),
                            dropout_p=self.dropout.p if self.training else 0.0, layout="bshd")
        return (self.o(out.reshape(b, s, -1)),)
    forward.__name__ = "lz_inline_mpnet_attention_forward"
    return forward


def check(m: nn.Module, device) -> tuple[bool, str]:
    """Run the module's forward and the replacement on a probe; (agree, why not)."""
    hidden = m.q.in_features
    dtype = m.q.weight.dtype
    h = m.num_attention_heads
    x = probe_input((2, 5, hidden), None, dtype=dtype, device=device)
    bias = probe_input((2, h, 5, 5), None, dtype=dtype, device=device).flip(-1)
    mask = torch.zeros(2, 1, 1, 5, dtype=dtype, device=device)
    mask[1, ..., :2] = torch.finfo(dtype).min
    return probe_tuple(m, make_forward, 1, "(output,)", dtype, x, attention_mask=mask, position_bias=bias)


def details(m: nn.Module) -> dict:
    return {"op": "attention", "num_heads": m.num_attention_heads, "head_dim": m.attention_head_size,
            "bias": "relative position"}
