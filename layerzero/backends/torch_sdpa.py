"""torch.nn.functional.scaled_dot_product_attention as LayerZero kernels.

- torch.sdpa        : SDPA with torch's own backend choice.
- torch.sdpa_flash  : the flash kernel (CPU: aten's flash-for-CPU op, which also returns the
                      log-sum-exp, so it can add attention sinks; CUDA: SDPBackend.FLASH_ATTENTION).
- torch.sdpa_efficient, torch.sdpa_cudnn : CUDA memory-efficient / cuDNN kernels.
- torch.sdpa_math   : the math kernel forced.

Features SDPA has no argument for are translated: bottom-right causal, sliding windows and ALiBi
become an explicit mask (bool, or additive in q's dtype when a float term is present). Softcap
can't be expressed, so these kernels reject it.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import reference
from ..registry import register
from ._torch_version import TORCH

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_HALF = (torch.float16, torch.bfloat16)


def needs_explicit_mask(spec) -> bool:
    return (spec.mask != "none" or spec.window is not None or spec.alibi
            or (spec.causal and spec.causal_align == "bottom_right" and spec.seq_len_q != spec.seq_len_k))


def explicit_mask(q, sq, sk, attn_mask, is_causal, window, alibi_slopes, causal_align, float_mask=False):
    """One SDPA mask carrying causal/window/ALiBi and the caller's mask: bool when every term is
    bool (unless float_mask), else additive in q's dtype with -inf where not allowed."""
    allowed = reference.attention_allowed(sq, sk, is_causal=is_causal, window=window,
                                          causal_align=causal_align, device=q.device)
    bias = None
    if alibi_slopes is not None:
        bias = reference.alibi_bias(alibi_slopes, sq, sk, causal_align, torch.float32)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = attn_mask if allowed is None else allowed & attn_mask
        else:
            bias = attn_mask.float() if bias is None else bias + attn_mask.float()
    if bias is None and not float_mask:
        return allowed
    if bias is None:
        bias = torch.zeros((), device=q.device)
    if allowed is not None:
        bias = bias.masked_fill(~allowed, float("-inf"))
    return bias.to(q.dtype)


def _to_bhsd(q, k, v, layout):
    if layout == "bshd":
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return q, k, v


def _prepare(q, k, v, attn_mask, is_causal, window, alibi_slopes, layout, causal_align, float_mask=False):
    q, k, v = _to_bhsd(q, k, v, layout)
    sq, sk = q.shape[2], k.shape[2]
    if (attn_mask is None and window is None and alibi_slopes is None
            and not (is_causal and causal_align == "bottom_right" and sq != sk)):
        return q, k, v, None, is_causal
    return q, k, v, explicit_mask(q, sq, sk, attn_mask, is_causal, window, alibi_slopes,
                                  causal_align, float_mask), False


_sdpa_gqa = functools.partial(F.scaled_dot_product_attention, enable_gqa=True)


def plain_sdpa(spec):
    """SDPA-expressible calls go straight to F.scaled_dot_product_attention (see registry.plain)."""
    return F.scaled_dot_product_attention if spec.num_heads == spec.num_kv_heads else _sdpa_gqa


def sdpa(q, k, v, attn_mask, is_causal, scale, dropout_p, window, softcap, alibi_slopes, sinks,
         layout, causal_align):
    if layout == "bhsd" and attn_mask is None and window is None and alibi_slopes is None and (
            not is_causal or causal_align == "top_left" or q.shape[2] == k.shape[2]):
        return F.scaled_dot_product_attention(q, k, v, None, dropout_p, is_causal, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    qh, kh, vh, mask, causal = _prepare(q, k, v, attn_mask, is_causal, window, alibi_slopes,
                                        layout, causal_align)
    out = F.scaled_dot_product_attention(qh, kh, vh, mask, dropout_p, causal, scale=scale,
                                         enable_gqa=qh.shape[1] != kh.shape[1])
    return out.transpose(1, 2) if layout == "bshd" else out


def _forced(backend):
    def run(q, k, v, attn_mask, is_causal, scale, dropout_p, window, softcap, alibi_slopes, sinks,
            layout, causal_align):
        with sdpa_kernel([backend]):
            return sdpa(q, k, v, attn_mask, is_causal, scale, dropout_p, window, softcap,
                        alibi_slopes, sinks, layout, causal_align)
    run.__name__ = f"sdpa_{backend.name.lower()}"
    return run


def flash_cpu(q, k, v, attn_mask, is_causal, scale, dropout_p, window, softcap, alibi_slopes, sinks,
              layout, causal_align):
    qh, kh, vh, mask, causal = _prepare(q, k, v, attn_mask, is_causal, window, alibi_slopes,
                                        layout, causal_align, float_mask=True)
    if TORCH < (2, 6) and qh.shape[1] != kh.shape[1]:
        rep = qh.shape[1] // kh.shape[1]
        kh, vh = kh.repeat_interleave(rep, dim=1), vh.repeat_interleave(rep, dim=1)
    if mask is not None and mask.dim() not in (2, 4):  # the CPU op takes 2-D or 4-D masks
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    out, lse = _FLASH_CPU(qh, kh, vh, 0.0, causal, attn_mask=mask, scale=scale)  # lse: (B, H, Sq)
    if sinks is not None:  # softmax over [scores, sink] = softmax(scores) * sigmoid(lse - sink)
        keep = torch.sigmoid(lse - sinks.float().view(1, -1, 1)).unsqueeze(-1)
        out = (out.float() * keep).to(q.dtype)
    return out.transpose(1, 2) if layout == "bshd" else out


# ---- supports(): reasons a kernel can't run a call ------------------------------------------

def _common(spec) -> list[str]:
    return ["softcap has no SDPA equivalent"] if spec.softcap else []


def supports_sdpa(spec) -> list[str]:
    r = _common(spec)
    if spec.sinks:
        r.append("attention sinks need the log-sum-exp, which plain SDPA does not return")
    return r


def supports_math(spec) -> list[str]:
    return supports_sdpa(spec)


def supports_flash(spec) -> list[str]:
    r = _common(spec)
    if spec.dropout:
        r.append("dropout is not supported by the forced flash kernel here")
    if spec.device == "cpu":
        if _FLASH_CPU is None:
            r.append(f"torch {torch.__version__} has no flash-attention CPU op")
        if spec.head_dim_v != spec.head_dim:
            r.append("head_dim of v differs from q/k")
        return r
    if spec.device != "cuda":
        return r + [f"device {spec.device!r} is not supported (cpu, cuda)"]
    if spec.sinks:
        r.append("attention sinks need the log-sum-exp, which SDPA does not return on CUDA")
    r += _cuda_fused_reasons(spec, "flash", min_sm=80, max_dim=256, masks=False)
    return r


def _cuda_fused_reasons(spec, name, *, min_sm, max_dim, masks) -> list[str]:
    r = []
    if spec.sm < min_sm:
        r.append(f"SDPA {name} needs sm{min_sm}+, this GPU is sm{spec.sm}")
    if spec.dtype not in _HALF:
        r.append(f"SDPA {name} needs float16/bfloat16, got {str(spec.dtype)[6:]}")
    if spec.head_dim > max_dim or spec.head_dim % 8:
        r.append(f"SDPA {name} needs head_dim a multiple of 8 and <= {max_dim}, got {spec.head_dim}")
    if spec.head_dim_v != spec.head_dim:
        r.append(f"SDPA {name} needs v's head_dim equal to q's")
    if not masks and needs_explicit_mask(spec):
        r.append(f"SDPA {name} takes no explicit mask (mask, window, ALiBi or bottom-right causal)")
    return r


def supports_efficient(spec) -> list[str]:
    r = supports_sdpa(spec)
    if spec.device != "cuda":
        return r + ["SDPA memory-efficient kernel needs a CUDA device"]
    if spec.head_dim % 8 or spec.head_dim_v % 8:
        r.append(f"SDPA efficient needs head_dim a multiple of 8, got {spec.head_dim}")
    if spec.sm < 50:
        r.append(f"SDPA efficient needs sm50+, this GPU is sm{spec.sm}")
    return r


def supports_cudnn(spec) -> list[str]:
    r = supports_sdpa(spec)
    if spec.device != "cuda":
        return r + ["SDPA cuDNN kernel needs a CUDA device"]
    r += _cuda_fused_reasons(spec, "cuDNN", min_sm=80, max_dim=128, masks=True)
    if spec.dropout:
        r.append("SDPA cuDNN dropout is not used here")
    return r


_flash_cuda = _forced(SDPBackend.FLASH_ATTENTION)


def sdpa_flash(*args):
    return flash_cpu(*args) if args[0].device.type == "cpu" else _flash_cuda(*args)


register("attention", "torch.sdpa", sdpa, priority=50, supports=supports_sdpa,
         plain=plain_sdpa)
register("attention", "torch.sdpa_flash", sdpa_flash, priority=45, supports=supports_flash)
register("attention", "torch.sdpa_cudnn", _forced(SDPBackend.CUDNN_ATTENTION), priority=48,
         supports=supports_cudnn)
register("attention", "torch.sdpa_efficient", _forced(SDPBackend.EFFICIENT_ATTENTION), priority=30,
         supports=supports_efficient)
register("attention", "torch.sdpa_math", _forced(SDPBackend.MATH), priority=20, supports=supports_math)
