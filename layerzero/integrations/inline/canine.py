"""CANINE-style attention written inline (not through transformers' AttentionInterface) ->
`lz.attention`.

CANINE keeps BERT's `query` / `key` / `value` Linear projections into `num_attention_heads` x
`attention_head_size`, but its forward takes `(from_tensor, to_tensor, attention_mask,
output_attentions)`: queries from one tensor, keys and values from another (the local attention of
its character encoders attends from chunks to chunks, the first position prepended). So BERT's
recogniser (forward(hidden_states, attention_mask, ...)) leaves it alone and this one takes it.

The mask is either additive (4-D, added to the scores as it is) or a 3-D 1/0 mask (batch, from,
to) that the module turns into `(1 - mask) * finfo.min` itself; the replacement converts it the
same way and passes a float `attn_mask`. It runs only calls without returned probabilities;
`output_attentions`, an unknown keyword or a mask of another rank runs the module's own forward.
Before swapping, both forwards run on two probes (self-attention with an additive padding mask,
and from/to tensors of different lengths with a 3-D mask) and must agree.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ... import ops
from ...patch import agree, probe, probe_input
from . import forward_params

DESCRIPTION = "inline CANINE-style attention"

_PROJ = ("query", "key", "value")
_PARAMS = ["from_tensor", "to_tensor", "attention_mask", "output_attentions"]


def recognised(m: nn.Module) -> bool:
    """Does `m` look like CANINE's self-attention (from_tensor / to_tensor forward)?"""
    if not all(isinstance(getattr(m, n, None), nn.Linear) for n in _PROJ):
        return False
    h, d = getattr(m, "num_attention_heads", None), getattr(m, "attention_head_size", None)
    if not (isinstance(h, int) and isinstance(d, int)
            and all(getattr(m, n).out_features == h * d for n in _PROJ)):
        return False
    if not isinstance(getattr(m, "dropout", None), nn.Dropout):
        return False
    return forward_params(m) == _PARAMS


def _additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    """The mask as the module adds it to the scores (of `dtype`)."""
    if mask.dim() == 3:   # 1 = attend, 0 = not: made additive and broadcast over the heads
        mask = (1.0 - mask.unsqueeze(1).float()) * torch.finfo(dtype).min
    return mask.to(dtype)


def make_forward(original):
    def forward(self, from_tensor, to_tensor, attention_mask=None, output_attentions=False, **kwargs):
        if (output_attentions or any(v is not None for v in kwargs.values())
                or from_tensor.dim() != 3 or to_tensor.dim() != 3
                or (attention_mask is not None and attention_mask.dim() not in (3, 4))):
            return original(from_tensor, to_tensor, attention_mask, output_attentions, **kwargs)
        b = from_tensor.shape[0]
        h, d = self.num_attention_heads, self.attention_head_size
        q = self.query(from_tensor).view(b, -1, h, d)
        k = self.key(to_tensor).view(b, -1, h, d)
        v = self.value(to_tensor).view(b, -1, h, d)
        mask = None if attention_mask is None else _additive(attention_mask, q.dtype)
        out = ops.attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(d),
                            dropout_p=self.dropout.p if self.training else 0.0, layout="bshd")
        return (out.reshape(b, q.shape[1], h * d),)
    forward.__name__ = "lz_inline_canine_attention_forward"
    return forward


def _probes(m: nn.Module, device):
    """(from, to, mask) probes: self-attention with an additive padding mask, and from/to tensors
    of different lengths with a 3-D 1/0 mask."""
    hidden, dtype = m.query.in_features, m.query.weight.dtype
    x = probe_input((2, 5, hidden), None, dtype=dtype, device=device)
    add = torch.zeros(2, 1, 1, 5, dtype=dtype, device=device)
    add[1, ..., :2] = torch.finfo(dtype).min
    y = probe_input((2, 7, hidden), None, dtype=dtype, device=device) * 0.5
    ones = torch.ones(2, 5, 7, device=device)
    ones[1, :, :3] = 0
    return [(x, x, add), (x, y, ones)]


def check(m: nn.Module, device) -> tuple[bool, str]:
    """Run the module's forward and the replacement on the probes; (agree, why not)."""
    dtype = m.query.weight.dtype
    for x, y, mask in _probes(m, device):
        try:
            want, got = probe(m, make_forward, x, to_tensor=y, attention_mask=mask)
        except Exception as e:  # noqa: BLE001 - a module we can't call plainly is left alone
            return False, f"probe raised {type(e).__name__}: {e}"
        if not isinstance(want, tuple) or len(want) != 1 or not isinstance(want[0], torch.Tensor):
            return False, "its forward does not return (context,)"
        ok, err = agree(got[0], want[0], dtype)
        if not ok:
            return False, f"differs on a probe (err {err:.2g})"
    return True, ""


def details(m: nn.Module) -> dict:
    return {"op": "attention", "num_heads": m.num_attention_heads, "head_dim": m.attention_head_size}
