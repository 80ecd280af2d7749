"""SqueezeBERT-style self-attention written inline (not through transformers' AttentionInterface)
-> `lz.attention`.

Recognised by structure: `query` / `key` / `value` pointwise Conv1d projections (kernel 1, stride
1, no padding or dilation; grouped or not) of hidden states laid out (batch, channels, length) into
`num_attention_heads` x `attention_head_size` channels, a Dropout on the probabilities, and a
forward `(hidden_states, attention_mask, output_attentions)` returning {"context_layer": (batch,
channels, length)}. BERT's recogniser wants Linear projections, so it leaves these alone. The
replacement runs only the plain call: a float additive mask or none, no returned scores; any other
call runs the module's own forward. Before swapping, both forwards run on a probe (random hidden
states and a padding mask) and must agree.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ... import ops
from ...patch import agree, probe, probe_input
from . import forward_params

DESCRIPTION = "inline SqueezeBERT-style self-attention (Conv1d projections)"

_PROJ = ("query", "key", "value")
_PARAMS = ["hidden_states", "attention_mask", "output_attentions"]


def _pointwise(c, channels: int) -> bool:
    """A Conv1d acting per position: channels -> channels, kernel 1, no padding."""
    return (isinstance(c, nn.Conv1d) and c.in_channels == c.out_channels == channels
            and tuple(c.kernel_size) == (1,) and tuple(c.stride) == (1,) and tuple(c.dilation) == (1,)
            and c.padding in ((0,), 0, "valid"))


def recognised(m: nn.Module) -> bool:
    """Does `m` look like SqueezeBERT's self-attention?"""
    h, d = getattr(m, "num_attention_heads", None), getattr(m, "attention_head_size", None)
    if not (isinstance(h, int) and isinstance(d, int)
            and all(_pointwise(getattr(m, n, None), h * d) for n in _PROJ)):
        return False
    if not isinstance(getattr(m, "dropout", None), nn.Dropout):
        return False
    return forward_params(m) == _PARAMS


def make_forward(original):
    def forward(self, hidden_states, attention_mask, output_attentions):
        if (output_attentions or hidden_states.dim() != 3
                or (attention_mask is not None
                    and not (attention_mask.is_floating_point() and attention_mask.dim() == 4))):
            return original(hidden_states, attention_mask, output_attentions)
        b, _, s = hidden_states.shape
        h, d = self.num_attention_heads, self.attention_head_size
        # (batch, h * d, length) -> (batch, h, length, d), made contiguous: kernels want unit-stride heads
        q, k, v = (getattr(self, n)(hidden_states).view(b, h, d, s).transpose(2, 3).contiguous() for n in _PROJ)
        out = ops.attention(q, k, v, attn_mask=attention_mask, scale=1.0 / math.sqrt(d),
                            dropout_p=self.dropout.p if self.training else 0.0)
        return {"context_layer": out.transpose(2, 3).reshape(b, h * d, s)}
    forward.__name__ = "lz_inline_squeezebert_attention_forward"
    return forward


def check(m: nn.Module, device) -> tuple[bool, str]:
    """Run the module's forward and the replacement on a probe; (agree, why not)."""
    channels = m.query.in_channels
    dtype = m.query.weight.dtype
    x = probe_input((2, channels, 5), None, dtype=dtype, device=device)
    mask = torch.zeros(2, 1, 1, 5, dtype=dtype, device=device)
    mask[1, ..., :2] = torch.finfo(dtype).min
    try:
        want, got = probe(m, make_forward, x, attention_mask=mask, output_attentions=False)
    except Exception as e:  # noqa: BLE001 - a module we can't call plainly is left alone
        return False, f"probe raised {type(e).__name__}: {e}"
    if not isinstance(want, dict) or set(want) != {"context_layer"}:
        return False, "its forward does not return {'context_layer': ...}"
    ok, err = agree(got["context_layer"], want["context_layer"], dtype)
    return ok, "" if ok else f"differs on a probe (err {err:.2g})"


def details(m: nn.Module) -> dict:
    return {"op": "attention", "num_heads": m.num_attention_heads, "head_dim": m.attention_head_size}
