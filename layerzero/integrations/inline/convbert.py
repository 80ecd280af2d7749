"""ConvBERT-style mixed attention written inline (not through transformers' AttentionInterface) ->
`lz.attention` for its attention half.

ConvBERT's self-attention splits its output between `num_attention_heads` heads of softmax
attention (BERT's: softmax(q k^T / sqrt(d) + mask) v, dropout on the probabilities) and as many
heads of span-based dynamic convolution: a kernel of `conv_kernel_size` taps per position and head,
softmax(conv_kernel_layer(key_conv_attn_layer(x) * query(x))), applied to the span of
`conv_out_layer(x)` around the position (zero-padded, as `nn.functional.unfold`). The output is
[attention heads | convolution heads] per position. The replacement computes the convolution half
as the module does and the attention half through `lz.attention`.

Recognised by structure: `query` / `key` / `value` / `conv_kernel_layer` / `conv_out_layer` Linear
layers sized for `num_attention_heads` x `attention_head_size` and `conv_kernel_size`, a separable
`key_conv_attn_layer` (depthwise and pointwise Conv1d), an `unfold` (nn.Unfold), a Dropout, and a
forward (hidden_states, attention_mask, encoder_hidden_states, **kwargs). (`inline/bert.py`'s
recogniser also matches it: this style must be tried first.) The replacement runs only the plain
call: self-attention with an additive (float) mask or none, no returned probabilities (it returns
(context, None) where the module returns (context, probabilities)), and not while transformers
records the attentions through its output hooks (`output_attentions` in the config); any other call
(encoder states, output_attentions, a keyword it does not know) runs the module's own forward.
Before swapping, both forwards run on a probe and must agree.
"""
from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from ... import ops
from ...patch import agree, observe, probe, probe_input
from . import attentions_recorded, forward_params
from .bert import _plain

DESCRIPTION = "inline ConvBERT-style self-attention + span convolution"

_PROJ = ("query", "key", "value")
_PARAMS = ["hidden_states", "attention_mask", "encoder_hidden_states", "kwargs"]


def recognised(m: nn.Module) -> bool:
    """Does `m` look like ConvBERT's self-attention?"""
    if not all(isinstance(getattr(m, n, None), nn.Linear) for n in (*_PROJ, "conv_kernel_layer", "conv_out_layer")):
        return False
    h, d, kk = (getattr(m, a, None) for a in ("num_attention_heads", "attention_head_size", "conv_kernel_size"))
    if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in (h, d, kk)):
        return False
    conv = getattr(m, "key_conv_attn_layer", None)
    if not (isinstance(conv, nn.Module) and isinstance(getattr(conv, "depthwise", None), nn.Conv1d)
            and isinstance(getattr(conv, "pointwise", None), nn.Conv1d)
            and isinstance(getattr(m, "unfold", None), nn.Unfold)
            and isinstance(getattr(m, "dropout", None), nn.Dropout)):
        return False
    if not (all(getattr(m, n).out_features == h * d for n in (*_PROJ, "conv_out_layer"))
            and m.conv_kernel_layer.in_features == h * d and m.conv_kernel_layer.out_features == h * kk
            and conv.pointwise.out_channels == h * d):
        return False
    return forward_params(m) == _PARAMS


def _span_convolution(self, hidden_states, query):
    """The convolution half, as the module computes it: (B, S, H, D)."""
    b, s, _ = hidden_states.shape
    h, d, kk = self.num_attention_heads, self.attention_head_size, self.conv_kernel_size
    key_conv = self.key_conv_attn_layer(hidden_states.transpose(1, 2)).transpose(1, 2)
    kernel = torch.softmax(self.conv_kernel_layer(key_conv * query).view(b, s, h, kk, 1), dim=-2)
    spans = nn.functional.unfold(self.conv_out_layer(hidden_states).transpose(1, 2).unsqueeze(-1),
                                 kernel_size=[kk, 1], padding=[(kk - 1) // 2, 0])     # (B, H*D*K, S)
    return torch.matmul(spans.transpose(1, 2).reshape(b, s, h, d, kk), kernel).view(b, s, h, d)


def make_forward(original):
    names = list(inspect.signature(original).parameters)

    def forward(self, *args, **kwargs):
        call = _plain(names, args, kwargs)
        if call is None or attentions_recorded():
            return original(*args, **kwargs)
        hidden_states, attention_mask, _, _ = call
        if (not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3
                or (attention_mask is not None and (attention_mask.dim() != 4
                                                    or not attention_mask.is_floating_point()))):
            return original(*args, **kwargs)
        b, s, _ = hidden_states.shape
        h, d = self.num_attention_heads, self.attention_head_size
        query = self.query(hidden_states)
        q = query.view(b, s, h, d)
        k, v = (getattr(self, n)(hidden_states).view(b, s, h, d) for n in ("key", "value"))
        observe(self, (b, s, s))
        out = ops.attention(q, k, v, attn_mask=attention_mask, scale=1.0 / math.sqrt(d),
                            dropout_p=self.dropout.p if self.training else 0.0, layout="bshd")
        conv = _span_convolution(self, hidden_states, query)
        return torch.cat([out, conv], dim=2).reshape(b, s, 2 * h * d), None
    forward.__name__ = "lz_inline_convbert_attention_forward"
    return forward


def check(m: nn.Module, device) -> tuple[bool, str]:
    """Run the module's forward and the replacement on a probe; (agree, why not)."""
    dtype = m.query.weight.dtype
    x = probe_input((2, 5, m.query.in_features), None, dtype=dtype, device=device)
    mask = torch.zeros(2, 1, 1, 5, dtype=dtype, device=device)
    mask[1, ..., :2] = torch.finfo(dtype).min
    try:
        want, got = probe(m, make_forward, x, attention_mask=mask)
        if not isinstance(want, tuple) or len(want) != 2 or not isinstance(want[0], torch.Tensor):
            return False, "its forward does not return (context, probabilities)"
        ok, err = agree(got[0], want[0], dtype)
    except Exception as e:  # noqa: BLE001 - a module we can't call plainly is left alone
        return False, f"probe raised {type(e).__name__}: {e}"
    return (True, "") if ok else (False, f"differs on a probe (err {err:.2g})")


def details(m: nn.Module) -> dict:
    return {"op": "attention", "num_heads": m.num_attention_heads, "head_dim": m.attention_head_size,
            "conv_heads": m.num_attention_heads, "conv_kernel_size": m.conv_kernel_size}
