"""xFormers' memory_efficient_attention as kernel `xformers.mea`.

Tensors go in as (B, S, H, D) ("bshd"; "bhsd" calls are transposed views); GQA uses xFormers'
5-D (B, S, G, H/G, D) form with K/V expanded over each group (a stride-0 view, no copy).
Masks become xFormers bias objects where one exists, so no (Sq, Sk) tensor is built:

    causal, top-left (or Sq == Sk)      LowerTriangularMask
    causal, bottom-right                LowerTriangularFromBottomRightMask
    causal + window (left, .)           LowerTriangularFromBottomRightLocalAttentionMask(left + 1)
    window (left >= 0, right >= 0)      LocalAttentionFromBottomRightMask(left, right)

(window shapes need bottom-right alignment or Sq == Sk). Everything else (padding masks,
ALiBi, one-sided windows) becomes a materialised additive bias in q's dtype, allocated with its
last dim padded to a multiple of 8 (xFormers' alignment rule); query rows the bias masks
completely are set to zero afterwards (the op's contract), whatever the kernel wrote there.

A real state on the GPU host: xFormers 0.0.35 imports, but its C++/CUDA ops were built for
another torch, and every call raises NotImplementedError("No operator found ..."). The probe
below makes one tiny call in a subprocess, so that state reads "unavailable" with that reason.
"""
from __future__ import annotations

import torch

from .. import probe
from ..registry import register
from . import priorities
from ._gpu import cuda_reasons
from .torch_sdpa import explicit_mask

_MOD = "xformers.ops"


def bias_object(sq, sk, is_causal, window, causal_align):
    """The xFormers AttentionBias for a causal/window pattern, or None when it needs a tensor
    (or nothing: check `is_causal or window` first)."""
    from xformers.ops import fmha

    ab = fmha.attn_bias
    aligned = causal_align == "bottom_right" or sq == sk
    if window is None:
        if not is_causal:
            return None
        return ab.LowerTriangularMask() if causal_align == "top_left" else ab.LowerTriangularFromBottomRightMask()
    if not aligned:
        return None
    left, right = window
    if is_causal and left >= 0:
        return ab.LowerTriangularFromBottomRightLocalAttentionMask(left + 1)
    if not is_causal and left >= 0 and right >= 0:
        return ab.LocalAttentionFromBottomRightMask(window_left=left, window_right=right)
    return None


def _tensor_bias(q, b, hq, sq, sk, attn_mask, is_causal, window, alibi_slopes, causal_align):
    """(B, Hq, Sq, Sk) additive bias in q's dtype, last dim padded to a multiple of 8; and the
    (B, Hq, Sq) rows it masks completely."""
    bias = explicit_mask(q, sq, sk, attn_mask, is_causal, window, alibi_slopes, causal_align,
                         float_mask=True)
    bias = bias.expand(b, hq, sq, sk)
    padded = torch.empty(b, hq, sq, (sk + 7) // 8 * 8, dtype=q.dtype, device=q.device)[..., :sk]
    padded.copy_(bias)
    dead = torch.isneginf(padded).all(dim=-1)                     # (B, Hq, Sq)
    return padded, dead


def mea(q, k, v, attn_mask, is_causal, scale, dropout_p, window, softcap, alibi_slopes, sinks,
        layout, causal_align):
    import xformers.ops as xops

    if layout == "bhsd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # (B, S, H, D)
    b, sq, hq, _ = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    bias, dead = None, None
    if attn_mask is None and alibi_slopes is None and (is_causal or window is not None):
        bias = bias_object(sq, sk, is_causal, window, causal_align)
    if bias is None and (attn_mask is not None or alibi_slopes is not None or is_causal or window is not None):
        bias, dead = _tensor_bias(q, b, hq, sq, sk, attn_mask, is_causal, window, alibi_slopes, causal_align)
    if hq != hkv:                       # GQA: (B, S, G, Hq/G, D), K/V broadcast over the group
        g = hq // hkv
        q = q.reshape(b, sq, hkv, g, q.shape[-1])
        k = k.unsqueeze(3).expand(b, sk, hkv, g, k.shape[-1])
        v = v.unsqueeze(3).expand(b, sk, hkv, g, v.shape[-1])
        if isinstance(bias, torch.Tensor):
            bias = bias.unflatten(1, (hkv, g))                       # (B, G, Hq/G, Sq, Sk)
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout_p, scale=scale)
    out = out.reshape(b, sq, hq, out.shape[-1])                      # (B, Sq, Hq, Dv)
    if dead is not None:
        out = out.masked_fill(dead.transpose(1, 2).unsqueeze(-1), 0.0)
    return out.transpose(1, 2) if layout == "bhsd" else out


def supports(spec) -> list[str]:
    r = cuda_reasons(spec, "xFormers", min_sm=60,
                     dtypes=(torch.float16, torch.bfloat16, torch.float32))
    if spec.softcap:
        r.append("xFormers has no softcap")
    if spec.sinks:
        r.append("xFormers' memory_efficient_attention has no attention sinks")
    if spec.grad:
        r.append("the xFormers adapter is forward-only (inputs require grad)")
    return r


probe.define(_MOD, """
import xformers.ops as xops
q = torch.randn(1, 16, 2, 64, device=dev or "cpu", dtype=torch.float16 if dev else torch.float32)
xops.memory_efficient_attention(q, q, q)
""", ("xformers",))

register("attention", "xformers.mea", mea, priority=priorities.attention("xformers.mea", 36),
         supports=supports, requires=(_MOD,))
