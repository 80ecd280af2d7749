"""flash-attn as LayerZero kernels: `flash_attn.fa2`, `flash_attn.fa3`, `flash_attn.fa4`.

- fa2: flash-attn 2.x, `flash_attn.flash_attn_func` (sm80+; softcap, ALiBi, window, dropout).
- fa3: flash-attn 3 (Hopper build), `flash_attn_interface.flash_attn_func` (sm90; softcap, window).
- fa4: flash-attn-4 (CuTe DSL), `flash_attn.cute.flash_attn_func` (sm90/sm100; softcap, window,
  learnable sinks). Its first call per configuration compiles (~2-3 s on an H100).

All three take (B, S, H, D) tensors ("bshd"); "bhsd" calls are transposed views (no copy: FA
needs only the last dim contiguous). GQA/MQA is native. Each kernel is a `torch.library`
custom op (`layerzero::fa2` ...) with a fake implementation, so `torch.compile` traces it.
The adapters are forward-only (a call needing backward goes to another kernel).

Masks. flash-attn aligns causal masks and windows bottom-right: query i sits at key position
i + Sk - Sq. For Sq=2, Sk=4, causal (x = attended)::

    flash-attn / bottom_right:  x x x .      SDPA / top_left:  x . . .
                                x x x x                        x x . .

A window (left, right) is inclusive: keys i + off - left <= j <= i + off + right, -1 = unbounded.
Top-left calls are translated into FA's frame by shifting the window by d = Sk - Sq:
left' = left + d, right' = right - d (causal is right = 0). When a shifted bound would be
negative (e.g. top-left causal with Sq < Sk) FA can't express it and the kernel says so.
ALiBi in FA2 is always bottom-right: -slope * |i + Sk - Sq - j|, so top-left ALiBi needs Sq == Sk.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import probe
from ..call import device_sm
from ..registry import register
from . import priorities
from ._gpu import HALF, cuda_reasons, eager

_FA2, _FA3, _FA4 = "flash_attn.flash_attn_interface", "flash_attn_interface", "flash_attn.cute"


def fa_window(sq: int, sk: int, is_causal: bool, window, causal_align: str):
    """(causal, left, right) in flash-attn's bottom-right frame (-1 = unbounded), or a str
    saying why FA can't express this causal/window combination."""
    left, right = window if window is not None else (-1, -1)
    if is_causal:
        right = 0                      # causal and a window's right bound: the tighter one
    d = sk - sq
    if causal_align == "top_left" and d:
        bounded = (left >= 0, right >= 0)
        left = left + d if bounded[0] else -1
        right = right - d if bounded[1] else -1
        if (bounded[0] and left < 0) or (bounded[1] and right < 0):
            return (f"top-left {'causal ' if is_causal else ''}{'window ' if window else ''}with "
                    f"Sq={sq} != Sk={sk} needs a bound before flash-attn's bottom-right diagonal; "
                    f"use causal_align='bottom_right' (the KV-cache convention) or another kernel")
    return right == 0 and left == -1, left, right


def _bshd(q, k, v, layout):
    if layout == "bhsd":
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return q, k, v


def _scale(scale, d):
    return 1.0 / math.sqrt(d) if scale is None else float(scale)


def _first(res):
    return res[0] if isinstance(res, (tuple, list)) else res


def _fake(q, k, v, *args):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


# ---- the custom ops: (B, S, H, D) in, (B, S, H, Dv) out ----------------------------------------

def fa2_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool,
           window_left: int, window_right: int, softcap: float, alibi_slopes: Optional[torch.Tensor],
           dropout_p: float) -> torch.Tensor:
    from flash_attn import flash_attn_func
    return _first(flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale,
                                  causal=causal, window_size=(window_left, window_right),
                                  softcap=softcap, alibi_slopes=alibi_slopes))


def fa3_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool,
           window_left: int, window_right: int, softcap: float) -> torch.Tensor:
    from flash_attn_interface import flash_attn_func
    return _first(flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=causal,
                                  window_size=(window_left, window_right), softcap=softcap))


def fa4_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool,
           window_left: int, window_right: int, softcap: float, sinks: Optional[torch.Tensor],
           num_splits: int) -> torch.Tensor:
    from flash_attn.cute import flash_attn_func
    window = (None if window_left < 0 else window_left, None if window_right < 0 else window_right)
    return _first(flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=causal,
                                  window_size=window, learnable_sink=sinks, softcap=softcap,
                                  num_splits=num_splits))


# The custom ops are what torch.compile traces (one opaque call with a fake implementation);
# eager calls run the implementation directly: the dispatcher round trip of a custom op costs
# host time that a small attention call feels.
fa2_op = torch.library.custom_op("layerzero::fa2", fa2_impl, mutates_args=())
fa3_op = torch.library.custom_op("layerzero::fa3", fa3_impl, mutates_args=())
fa4_op = torch.library.custom_op("layerzero::fa4", fa4_impl, mutates_args=())
_EAGER = {fa2_op: fa2_impl, fa3_op: fa3_impl, fa4_op: fa4_impl}
for _op in (fa2_op, fa3_op, fa4_op):
    _op.register_fake(_fake)


# ---- kernels: lz.attention's arguments in, q's layout out ---------------------------------------

def _run(op, q, k, v, scale, is_causal, window, causal_align, layout, *extra):
    qb, kb, vb = _bshd(q, k, v, layout)
    tw = fa_window(qb.shape[1], kb.shape[1], is_causal, window, causal_align)
    if isinstance(tw, str):
        raise ValueError(tw)  # supports() rejects these calls; reaching here is a bug
    causal, left, right = tw
    run = _EAGER[op] if eager(qb) else op
    out = run(qb, kb, vb, _scale(scale, q.shape[-1]), causal, left, right, *extra)
    return out.transpose(1, 2) if layout == "bhsd" else out


def fa2(q, k, v, attn_mask, is_causal, scale, dropout_p, window, softcap, alibi_slopes, sinks,
        layout, causal_align):
    slopes = None if alibi_slopes is None else alibi_slopes.float()
    return _run(fa2_op, q, k, v, scale, is_causal, window, causal_align, layout,
                float(softcap or 0.0), slopes, float(dropout_p))


def fa3(q, k, v, attn_mask, is_causal, scale, dropout_p, window, softcap, alibi_slopes, sinks,
        layout, causal_align):
    return _run(fa3_op, q, k, v, scale, is_causal, window, causal_align, layout,
                float(softcap or 0.0))


def fa4(q, k, v, attn_mask, is_causal, scale, dropout_p, window, softcap, alibi_slopes, sinks,
        layout, causal_align):
    s = q.shape[2] if layout == "bhsd" else q.shape[1]
    # 0 = FA4's split-KV heuristic, for decode; FA4 has split-KV on sm100+ only ("SplitKV not
    # supported on SM 9.0"), so sm90 keeps 1.
    splits = 0 if s <= priorities.DECODE_MAX_Q and device_sm(q.device) >= 100 else 1
    return _run(fa4_op, q, k, v, scale, is_causal, window, causal_align, layout,
                float(softcap or 0.0), None if sinks is None else sinks.float(), splits)


# ---- supports(): the reasons --------------------------------------------------------------------

def _common(spec, name, *, min_sm, max_sm=None, dropout=False, alibi=False, sinks=False) -> list[str]:
    r = cuda_reasons(spec, name, min_sm=min_sm, max_sm=max_sm, dtypes=HALF)
    if spec.mask != "none":
        r.append(f"{name} takes no attn_mask (only causal/window); use flex, FlashInfer or SDPA")
    if spec.dropout and not dropout:
        r.append(f"{name} has no dropout")
    if spec.alibi and not alibi:
        r.append(f"{name} has no ALiBi")
    if spec.sinks and not sinks:
        r.append(f"{name} has no attention sinks")
    if spec.grad:
        r.append(f"the {name} adapter is forward-only (inputs require grad)")
    tw = fa_window(spec.seq_len_q, spec.seq_len_k, spec.causal, spec.window, spec.causal_align)
    if isinstance(tw, str):
        r.append(tw)
    if (spec.alibi and spec.causal_align == "top_left" and spec.seq_len_q != spec.seq_len_k):
        r.append(f"{name}'s ALiBi is bottom-right aligned; top-left ALiBi needs Sq == Sk "
                 f"(got {spec.seq_len_q}, {spec.seq_len_k})")
    return r


def supports_fa2(spec) -> list[str]:
    r = _common(spec, "flash-attn 2", min_sm=80, dropout=True, alibi=True)
    if spec.head_dim > 256 or spec.head_dim_v != spec.head_dim:
        r.append(f"flash-attn 2 needs head_dim <= 256 and v's head_dim equal to q's, got "
                 f"{spec.head_dim}/{spec.head_dim_v}")
    return r


def supports_fa3(spec) -> list[str]:
    r = _common(spec, "flash-attn 3", min_sm=90, max_sm=90)
    if spec.head_dim > 256 or spec.head_dim % 8 or spec.head_dim_v != spec.head_dim:
        r.append(f"flash-attn 3 needs head_dim a multiple of 8, <= 256, equal for q and v, got "
                 f"{spec.head_dim}/{spec.head_dim_v}")
    return r


def supports_fa4(spec) -> list[str]:
    r = _common(spec, "flash-attn-4", min_sm=90, sinks=True)
    d, dv = spec.head_dim, spec.head_dim_v
    if spec.device == "cuda" and not (90 <= spec.sm < 100 or 100 <= spec.sm < 120):
        r.append(f"flash-attn-4 is used here on sm90 and sm100-sm110 only, this GPU is sm{spec.sm}")
    if d % 8 or dv % 8:
        r.append(f"flash-attn-4 needs head_dim a multiple of 8, got {d}/{dv}")
    elif 90 <= spec.sm < 100 and not (8 <= d <= 256 and 8 <= dv <= 256):
        r.append(f"flash-attn-4 on sm90 needs head_dim in 8..256, got {d}/{dv}")
    elif spec.sm >= 100 and not (max(d, dv) <= 128 or (d, dv) in ((192, 128), (256, 256))):
        r.append(f"flash-attn-4 on sm{spec.sm} needs head_dim <= 128, (192, 128) or (256, 256), got {d}/{dv}")
    return r


_TINY = """
q = torch.randn(1, 16, 2, 64, device=dev, dtype=torch.float16) if dev else None
"""
probe.define(_FA2, "from flash_attn.flash_attn_interface import flash_attn_func\n" + _TINY +
             "if dev and sm >= 80:\n    flash_attn_func(q, q, q, causal=True)", ("flash-attn",))
probe.define(_FA3, "from flash_attn_interface import flash_attn_func\n" + _TINY +
             "if dev and 90 <= sm < 100:\n    flash_attn_func(q, q, q, causal=True)", ("flash-attn-3", "flash_attn_3"))
probe.define(_FA4, "from flash_attn.cute import flash_attn_func\n" + _TINY +
             "if dev and 90 <= sm < 120:\n    flash_attn_func(q, q, q, causal=True)",
             ("flash-attn-4", "nvidia-cutlass-dsl"))

register("attention", "flash_attn.fa2", fa2, priority=priorities.attention("flash_attn.fa2", 44),
         supports=supports_fa2, requires=(_FA2,))
register("attention", "flash_attn.fa3", fa3, priority=priorities.attention("flash_attn.fa3", 66),
         supports=supports_fa3, requires=(_FA3,))
register("attention", "flash_attn.fa4", fa4, priority=priorities.attention("flash_attn.fa4", 70),
         supports=supports_fa4, requires=(_FA4,))
