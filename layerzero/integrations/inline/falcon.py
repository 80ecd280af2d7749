"""Falcon-style attention written inline (fused query-key-value projection: multi-head,
multi-query or the new decoder architecture's grouped layout; rotary or ALiBi) -> `lz.attention`.

Falcon's attention class is picked from its own table (eager and sdpa: FalconAttention), not from
transformers' AttentionInterface. Its forward branches on `alibi is None` (rotary) and on
`config._attn_implementation == "sdpa"`; each branch is reproduced:

  rotary, eager   softmax(q @ k^T / sqrt(d) + mask) @ v (float mask), no dropout
  rotary, sdpa    SDPA(q, k, v, mask, causal when there is no mask and Sq > 1), no dropout
  alibi,  eager   softmax((q @ k^T + alibi) * inv_norm_factor + mask) @ v: the bias handed to
                  `lz.attention` is `alibi * inv_norm_factor + mask`, materialised (Falcon's model
                  also folds ALiBi into that mask, so eager counts it twice: reproduced as is)
  alibi,  sdpa    SDPA(q, k, v, mask) with the attention dropout (the mask holds the ALiBi)

Recognised by structure: a `query_key_value` Linear sized for the module's layout
(`new_decoder_architecture` / `multi_query`), split by the module's own `_split_heads`, a `dense`
Linear, a Dropout, a `config`, a forward taking (hidden_states, alibi, attention_mask,
position_ids, layer_past, use_cache, output_attentions, position_embeddings) whose code has both
the softmax and the SDPA branch (FalconFlashAttention2's does not). RoPE runs through `lz.rope`
(the rotate-half form of Falcon's `apply_rotary_pos_emb`; the probe checks it). The cache is updated
as the original does; returns (output, None). Any other call (output_attentions, a keyword it
does not know, a mask the original could not add, cos/sin of other sizes) runs the module's own
forward.
"""
from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from ... import ops
from ...patch import agree, observe, probe, probe_input

DESCRIPTION = "inline Falcon-style attention (fused QKV, rotary or ALiBi)"
ROPE = True   # q/k rotate through lz.rope inside the replacement

_PARAMS = ["hidden_states", "alibi", "attention_mask", "position_ids", "layer_past", "use_cache",
           "output_attentions", "position_embeddings", "kwargs"]


def _qkv_width(m, h, d) -> int:
    if m.new_decoder_architecture:
        return (2 * m.num_kv_heads + h) * d
    return (h + 2) * d if m.multi_query else 3 * h * d


def recognised(m: nn.Module) -> bool:
    """Does `m` look like Falcon's (eager / sdpa) self-attention?"""
    qkv, dense = getattr(m, "query_key_value", None), getattr(m, "dense", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(dense, nn.Linear)):
        return False
    h, d, kv = (getattr(m, a, None) for a in ("num_heads", "head_dim", "num_kv_heads"))
    if not (all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in (h, d, kv))
            and all(isinstance(getattr(m, a, None), bool) for a in ("new_decoder_architecture", "multi_query"))
            and isinstance(getattr(m, "inv_norm_factor", None), float)
            and isinstance(getattr(m, "attention_dropout", None), nn.Dropout)
            and isinstance(getattr(getattr(m, "config", None), "_attn_implementation", None), str)
            and callable(getattr(m, "_split_heads", None))):
        return False
    if h * d != qkv.in_features or dense.in_features != h * d or qkv.out_features != _qkv_width(m, h, d):
        return False
    try:
        fn = inspect.unwrap(type(m).forward)
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    names = set(getattr(getattr(fn, "__code__", None), "co_names", ()))
    return params[1:] == _PARAMS and {"softmax", "scaled_dot_product_attention"} <= names


def _fits(t, b, s, d) -> bool:
    """cos/sin as Falcon's rotary embedding gives them: (1 or B, S, D)."""
    return (isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[0] in (1, b) and t.shape[1] == s
            and t.shape[2] == d)


def _plain(self, hidden_states, alibi, attention_mask, output_attentions, position_embeddings, kwargs) -> bool:
    """Can the replacement run this call exactly like the original?"""
    if output_attentions or kwargs or hidden_states.dim() != 3:
        return False
    b, s, _ = hidden_states.shape
    if alibi is None:
        pe = position_embeddings
        if not (isinstance(pe, (tuple, list)) and len(pe) == 2 and _fits(pe[0], b, s, self.head_dim)
                and _fits(pe[1], b, s, self.head_dim) and pe[1].shape == pe[0].shape):
            return False
    elif not (isinstance(alibi, torch.Tensor) and alibi.dim() == 3 and alibi.shape[0] == b * self.num_heads):
        return False
    if self.config._attn_implementation == "sdpa":
        return attention_mask is None or (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4)
    return isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and attention_mask.is_floating_point()


def make_forward(original):
    def forward(self, hidden_states, alibi, attention_mask, position_ids=None, layer_past=None, use_cache=False,
                output_attentions=False, position_embeddings=None, **kwargs):
        if not _plain(self, hidden_states, alibi, attention_mask, output_attentions, position_embeddings, kwargs):
            return original(hidden_states, alibi, attention_mask, position_ids, layer_past, use_cache,
                            output_attentions, position_embeddings, **kwargs)
        h, d = self.num_heads, self.head_dim
        hkv = h if self.new_decoder_architecture else self.num_kv_heads
        q, k, v = self._split_heads(self.query_key_value(hidden_states))      # (B, S, H, D)
        b, s = q.shape[:2]
        q = q.transpose(1, 2).reshape(b, h, s, d)
        k = k.transpose(1, 2).reshape(b, hkv, s, d)
        v = v.transpose(1, 2).reshape(b, hkv, s, d)
        if alibi is None:
            q, k = ops.rope(q, k, *position_embeddings, layout="bhsd")
        if layer_past is not None:
            k, v = layer_past.update(k, v, self.layer_idx)
        dropout = self.attention_dropout.p if self.training and alibi is not None else 0.0
        mask, causal, scale = attention_mask, False, None
        if self.config._attn_implementation == "sdpa":
            causal = self.is_causal and attention_mask is None and s > 1
        elif alibi is None:
            scale = 1.0 / math.sqrt(d)
        else:
            scale = self.inv_norm_factor
            mask = alibi.reshape(b, h, 1, -1) * self.inv_norm_factor + attention_mask
        observe(self, (b, s, k.shape[-2]))
        out = ops.attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, dropout_p=dropout)
        return self.dense(out.transpose(1, 2).reshape(b, s, h * d)), None
    forward.__name__ = "lz_inline_falcon_attention_forward"
    return forward


def check(m: nn.Module, device) -> tuple[bool, str]:
    """Run the module's forward and the replacement on a probe, through both of its position
    schemes (rotary, ALiBi); (agree, why not)."""
    hidden, dtype = m.query_key_value.in_features, m.query_key_value.weight.dtype
    b, s, h, d = 2, 5, m.num_heads, m.head_dim
    x = probe_input((b, s, hidden), None, dtype=dtype, device=device)
    angles = probe_input((1, s, d // 2), None, dtype=dtype, device=device)
    angles = torch.cat((angles, angles), dim=-1)
    rotary = (angles.cos(), angles.sin())
    alibi = probe_input((b * h, 1, s), None, dtype=dtype, device=device).abs()
    mask = torch.full((s, s), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    mask = mask.expand(b, 1, s, s).clone()
    mask[1, ..., 1] = torch.finfo(dtype).min   # a padded key (no row left without a key)
    for name, kw in (("rotary", {"alibi": None, "position_embeddings": rotary}), ("alibi", {"alibi": alibi})):
        try:
            want, got = probe(m, make_forward, x, attention_mask=mask, **kw)
        except Exception as e:  # noqa: BLE001 - a module we can't call plainly is left alone
            return False, f"probe ({name}) raised {type(e).__name__}: {e}"
        if not isinstance(want, tuple) or len(want) != 2 or not isinstance(want[0], torch.Tensor):
            return False, "its forward does not return (output, probabilities)"
        ok, err = agree(got[0], want[0], dtype)
        if not ok:
            return False, f"differs on a probe ({name}, err {err:.2g})"
    return True, ""


def details(m: nn.Module) -> dict:
    kv = m.num_heads if m.new_decoder_architecture else m.num_kv_heads
    return {"op": "attention", "num_heads": m.num_heads, "num_kv_heads": kv, "head_dim": m.head_dim}
