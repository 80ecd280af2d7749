"""GPT-NeoX-Japanese-style attention written inline (fused query-key-value projection, partial
rotary, the dense bias returned for the layer to add) -> `lz.attention`.

Recognised by structure: a `query_key_value` Linear (hidden -> heads x 3 x head_size, each head's
q, k, v side by side), a `dense` Linear, `rotary_ndims` (the rotated leading features of a head),
`norm_factor`, a Dropout on the probabilities, `dense_bias` (None or a Parameter), and a forward
taking (hidden_states, attention_mask, position_ids, layer_past, use_cache, output_attentions,
position_embeddings). The original scores are `q @ k^T / norm_factor + attention_mask` (the
model's float mask, or none); the replacement rotates the first `rotary_ndims` features with
`lz.rope` (the rotate-half form of the family's `apply_rotary_pos_emb`; the probe checks it),
updates the cache as the original does, runs `lz.attention` with that mask and returns
(output, None, dense_bias): the layer adds the bias itself. Any other call (output_attentions, a
bool mask, a keyword it does not know, cos/sin of other sizes) runs the module's own forward.
"""
from __future__ import annotations


import torch
from torch import nn

from ... import ops
from ...patch import observe, probe_input
from . import forward_params, probe_tuple

DESCRIPTION = "inline GPT-NeoX-Japanese-style attention (fused QKV, partial rotary)"
ROPE = True   # q/k rotate through lz.rope inside the replacement

_PARAMS = ["hidden_states", "attention_mask", "position_ids", "layer_past", "use_cache",
           "output_attentions", "position_embeddings", "kwargs"]


def recognised(m: nn.Module) -> bool:
    """Does `m` look like GPT-NeoX-Japanese's self-attention?"""
    qkv, dense = getattr(m, "query_key_value", None), getattr(m, "dense", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(dense, nn.Linear)):
        return False
    h, d, rot = (getattr(m, a, None) for a in ("num_attention_heads", "head_size", "rotary_ndims"))
    if not (all(isinstance(x, int) and not isinstance(x, bool) for x in (h, d, rot))
            and h * d == qkv.in_features and qkv.out_features == 3 * h * d and dense.in_features == h * d
            and 0 < rot <= d and rot % 2 == 0):
        return False
    bias = getattr(m, "dense_bias", False)
    if not (isinstance(getattr(m, "norm_factor", None), float)
            and isinstance(getattr(m, "attention_dropout", None), nn.Dropout)
            and (bias is None or isinstance(bias, nn.Parameter))):
        return False
    return forward_params(m) == _PARAMS


def _fits(t, b, s, rot) -> bool:
    """cos/sin as the family's rotary embedding gives them: (1 or B, S, rotary_ndims)."""
    return (isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[0] in (1, b) and t.shape[1] == s
            and t.shape[2] == rot)


def make_forward(original):
    def forward(self, hidden_states, attention_mask=None, position_ids=None, layer_past=None, use_cache=False,
                output_attentions=False, position_embeddings=None, **kwargs):
        b, s = hidden_states.shape[:2] if hidden_states.dim() == 3 else (0, 0)
        pe = position_embeddings
        if (output_attentions or kwargs or hidden_states.dim() != 3
                or not (isinstance(pe, (tuple, list)) and len(pe) == 2
                        and all(_fits(t, b, s, self.rotary_ndims) for t in pe))
                or not (attention_mask is None or (attention_mask.dim() == 4 and attention_mask.is_floating_point()))):
            return original(hidden_states, attention_mask, position_ids, layer_past, use_cache, output_attentions,
                            position_embeddings, **kwargs)
        h, d = self.num_attention_heads, self.head_size
        qkv = self.query_key_value(hidden_states).view(b, s, h, 3 * d).transpose(1, 2)
        q, k, v = qkv.split(d, dim=-1)                                    # (B, H, S, D) each
        q, k = ops.rope(q, k, *pe, layout="bhsd")                         # first rotary_ndims rotate
        if layer_past is not None:
            k, v = layer_past.update(k, v, self.layer_idx)
        observe(self, (b, s, k.shape[-2]))
        out = ops.attention(q, k, v, attn_mask=attention_mask, scale=1.0 / self.norm_factor,
                            dropout_p=self.attention_dropout.p if self.training else 0.0)
        return self.dense(out.transpose(1, 2).reshape(b, s, h * d)), None, self.dense_bias
    forward.__name__ = "lz_inline_gpt_neox_japanese_attention_forward"
    return forward


def check(m: nn.Module, device) -> tuple[bool, str]:
    """Run the module's forward and the replacement on a probe; (agree, why not)."""
    hidden, dtype = m.query_key_value.in_features, m.query_key_value.weight.dtype
    b, s = 2, 5
    x = probe_input((b, s, hidden), None, dtype=dtype, device=device)
    angles = probe_input((1, s, m.rotary_ndims // 2), None, dtype=dtype, device=device)
    angles = torch.cat((angles, angles), dim=-1)
    mask = torch.full((s, s), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    mask = mask.expand(b, 1, s, s).clone()
    mask[1, ..., 1] = torch.finfo(dtype).min   # a padded key (no row left without a key)
    return probe_tuple(m, make_forward, 3, "(output, probabilities, dense bias)", dtype, x, attention_mask=mask, position_ids=torch.arange(s, device=device)[None],
                          position_embeddings=(angles.cos(), angles.sin()))


def details(m: nn.Module) -> dict:
    return {"op": "attention", "num_heads": m.num_attention_heads, "head_dim": m.head_size}
