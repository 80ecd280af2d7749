"""MPT-style attention written inline (fused `Wqkv`, ALiBi as `position_bias`) -> `lz.attention`.

Recognised by structure: a `Wqkv` Linear (hidden -> 3 x hidden, chunked into q, k, v), an
`out_proj` Linear, `n_heads` x `head_dim`, `softmax_scale`, `clip_qkv`, `attn_dropout_p`, and a
forward taking (hidden_states, position_bias, cache, attention_mask, **kwargs). The original
scores are `q @ k^T * softmax_scale + position_bias` (sliced to the last keys), then
`masked_fill(attention_mask, min)` with a bool mask (True = masked): the replacement hands
`lz.attention` that bias with the masked positions set to the dtype's minimum (materialised, as
a float mask). It clamps the projection (`clip_qkv`) and updates the cache as the original does
and returns (output, None). Any other call (a keyword it does not know, a float mask, a bias of
another rank) runs the module's own forward, and so does a call whose block was asked for the
probabilities (MptBlock does not pass output_attentions on to the module: `attach` notes it with
a pre-hook on the block).
"""
from __future__ import annotations


import torch
from torch import nn

from ... import ops
from ...patch import observe, probe_input
from . import forward_params, probe_tuple

DESCRIPTION = "inline MPT-style attention (fused Wqkv, ALiBi)"

_PARAMS = ["hidden_states", "position_bias", "cache", "attention_mask", "kwargs"]


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def recognised(m: nn.Module) -> bool:
    """Does `m` look like MPT's self-attention?"""
    qkv, out = getattr(m, "Wqkv", None), getattr(m, "out_proj", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(out, nn.Linear)):
        return False
    h, d = getattr(m, "n_heads", None), getattr(m, "head_dim", None)
    if not (isinstance(h, int) and isinstance(d, int) and h * d == qkv.in_features
            and qkv.out_features == 3 * h * d and out.in_features == h * d):
        return False
    clip = getattr(m, "clip_qkv", None)
    if not (_number(getattr(m, "softmax_scale", None)) and _number(getattr(m, "attn_dropout_p", None))
            and (clip is None or _number(clip))):
        return False
    return forward_params(m) == _PARAMS


def _bias(position_bias, attention_mask, cache, s, sk, dtype):
    """The additive (.., Sq, Sk) bias the original adds and masks, or None if it would not run."""
    bias = torch.zeros((), dtype=dtype, device=attention_mask.device if attention_mask is not None else None)
    if position_bias is not None:
        if not isinstance(position_bias, torch.Tensor) or position_bias.dim() != 3:
            return None
        ql = s if cache is None else s + cache.get_seq_length()      # as the original counts it
        bias = position_bias[:, max(0, position_bias.size(1) - ql):, max(0, position_bias.size(2) - sk):]
        if bias.shape[-1] not in (1, sk) or bias.shape[-2] not in (1, s):
            return None
        bias = bias.to(dtype)
    if attention_mask is not None:
        bias = torch.where(attention_mask, torch.finfo(dtype).min, bias)
    return bias


def make_forward(original):
    def forward(self, hidden_states, position_bias=None, cache=None, attention_mask=None, **kwargs):
        if (kwargs or getattr(self, "_lz_weights_wanted", False) or hidden_states.dim() != 3 or (position_bias is None and attention_mask is None)
                or (attention_mask is not None and (attention_mask.dtype != torch.bool or attention_mask.dim() != 4))):
            return original(hidden_states, position_bias, cache, attention_mask, **kwargs)
        b, s, _ = hidden_states.shape
        h, d = self.n_heads, self.head_dim
        qkv = self.Wqkv(hidden_states)
        if self.clip_qkv:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        q, k, v = (t.reshape(b, s, h, d).transpose(1, 2) for t in qkv.chunk(3, dim=2))
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        bias = _bias(position_bias, attention_mask, cache, s, k.shape[-2], q.dtype)
        if bias is None:
            raise ValueError(f"position_bias of shape {tuple(position_bias.shape)} does not fit the scores")
        observe(self, (b, s, k.shape[-2]))
        out = ops.attention(q, k, v, attn_mask=bias, scale=self.softmax_scale,
                            dropout_p=self.attn_dropout_p if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, h * d)), None
    forward.__name__ = "lz_inline_mpt_attention_forward"
    return forward


def check(m: nn.Module, device) -> tuple[bool, str]:
    """Run the module's forward and the replacement on a probe; (agree, why not)."""
    hidden, dtype = m.Wqkv.in_features, m.Wqkv.weight.dtype
    b, s = 2, 5
    x = probe_input((b, s, hidden), None, dtype=dtype, device=device)
    bias = probe_input((m.n_heads, 1, s + 3), None, dtype=torch.float32, device=device)
    mask = torch.ones(s, s, dtype=torch.bool, device=device).triu(1).expand(b, 1, s, s).clone()
    mask[1, ..., 1] = True     # a padded key (no row left without a key)
    return probe_tuple(m, make_forward, 2, "(output, probabilities)", dtype, x, position_bias=bias, attention_mask=mask)


def attach(model: nn.Module, name: str, m: nn.Module, undo: list) -> None:
    """Note on `m`, before each call of the block holding it, whether the block was asked for
    the attention probabilities (which only the module's own forward returns)."""
    block = model.get_submodule(name.rpartition(".")[0])

    def note(_block, args, kwargs):
        m._lz_weights_wanted = bool(kwargs.get("output_attentions", False))

    hook = block.register_forward_pre_hook(note, with_kwargs=True)
    undo.append(hook.remove)
    undo.append(lambda: m.__dict__.pop("_lz_weights_wanted", None))


def details(m: nn.Module) -> dict:
    return {"op": "attention", "num_heads": m.n_heads, "head_dim": m.head_dim}
