"""BLOOM-style attention written inline (fused query-key-value projection, ALiBi passed in) ->
`lz.attention`.

Recognised by structure: a `query_key_value` Linear (hidden -> 3 x hidden) split per head by the
module's own `_reshape`, a `dense` output Linear, a Dropout on the probabilities, the layer-wise
`inv_norm_factor` / `beta`, and a forward taking (hidden_states, residual, alibi, attention_mask,
layer_past, use_cache, output_attentions). The original scores are
`beta * alibi + inv_norm_factor * q @ k^T + attention_mask`: the replacement hands `lz.attention`
the materialised additive bias `beta * alibi + attention_mask` (the model's float mask) with
scale = inv_norm_factor. It updates the cache as the original does, adds the residual (with the
hidden dropout) and returns (output, None). Any other call (output_attentions, a bool mask, an
unknown keyword, tensor-parallel slicing of `dense`) runs the module's own forward.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ... import ops
from ...patch import observe, probe_input
from . import forward_params, probe_tuple

DESCRIPTION = "inline BLOOM-style attention (fused QKV, ALiBi)"

_PARAMS = ["hidden_states", "residual", "alibi", "attention_mask", "layer_past", "use_cache",
           "output_attentions", "kwargs"]


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def recognised(m: nn.Module) -> bool:
    """Does `m` look like BLOOM's self-attention?"""
    qkv, dense = getattr(m, "query_key_value", None), getattr(m, "dense", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(dense, nn.Linear)):
        return False
    h, d = getattr(m, "num_heads", None), getattr(m, "head_dim", None)
    if not (isinstance(h, int) and isinstance(d, int) and h * d == qkv.in_features
            and qkv.out_features == 3 * h * d and dense.in_features == h * d):
        return False
    if not (isinstance(getattr(m, "attention_dropout", None), nn.Dropout) and callable(getattr(m, "_reshape", None))
            and all(_number(getattr(m, a, None)) for a in ("inv_norm_factor", "beta", "hidden_dropout",
                                                             "pretraining_tp"))):
        return False
    return forward_params(m) == _PARAMS


def make_forward(original):
    def forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
                output_attentions=False, **kwargs):
        b, s = hidden_states.shape[:2] if hidden_states.dim() == 3 else (0, 0)
        h = self.num_heads
        if (output_attentions or kwargs or hidden_states.dim() != 3
                or (self.pretraining_tp > 1 and getattr(self, "slow_but_exact", False))
                or not isinstance(alibi, torch.Tensor) or alibi.dim() != 3 or alibi.shape[0] != b * h
                or not (attention_mask is None or (attention_mask.dim() == 4 and attention_mask.is_floating_point()))):
            return original(hidden_states, residual, alibi, attention_mask, layer_past, use_cache,
                            output_attentions, **kwargs)
        q, k, v = self._reshape(self.query_key_value(hidden_states))   # (B, H, S, D) each
        if layer_past is not None:
            k, v = layer_past.update(k, v, self.layer_idx)
        bias = alibi.reshape(b, h, *alibi.shape[1:])                     # (B, H, 1, Sk)
        if self.beta != 1.0:
            bias = bias * self.beta
        if attention_mask is not None:
            bias = bias + attention_mask
        observe(self, (b, s, k.shape[-2]))
        out = ops.attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.inv_norm_factor,
                            dropout_p=self.attention_dropout.p if self.training else 0.0)
        out = self.dense(out.transpose(1, 2).reshape(b, s, h * self.head_dim))
        return residual + F.dropout(out, p=self.hidden_dropout, training=self.training), None
    forward.__name__ = "lz_inline_bloom_attention_forward"
    return forward


def check(m: nn.Module, device) -> tuple[bool, str]:
    """Run the module's forward and the replacement on a probe; (agree, why not)."""
    hidden, dtype = m.query_key_value.in_features, m.query_key_value.weight.dtype
    b, s, h = 2, 5, m.num_heads
    x = probe_input((b, s, hidden), None, dtype=dtype, device=device)
    residual = x.flip(1)
    alibi = probe_input((b * h, 1, s), None, dtype=dtype, device=device).abs()
    mask = torch.full((s, s), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    mask = mask.expand(b, 1, s, s).clone()
    mask[1, ..., 1] = torch.finfo(dtype).min   # a padded key (no row left without a key)
    return probe_tuple(m, make_forward, 2, "(output, probabilities)", dtype, x, residual=residual, alibi=alibi, attention_mask=mask)


def details(m: nn.Module) -> dict:
    return {"op": "attention", "num_heads": m.num_heads, "head_dim": m.head_dim}
