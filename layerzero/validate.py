"""Argument checks for every op, producing the op's CallSpec.

Run only when a call's raw key misses the decision cache: everything checked here is a function of
that key. Errors name the argument, the value and what is allowed.
"""
from __future__ import annotations

import math

import torch

from .call import CallSpec, device_sm, needs_grad

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_NAMES = "float16, bfloat16, float32, float64"


def _tensor(name, t, *, ndim=None, min_ndim=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    return t


def _float(name, t):
    if t.dtype not in FLOATS:
        raise TypeError(f"{name} has dtype {t.dtype}; allowed: {_FLOAT_NAMES}")


def _same(name, t, ref, ref_name, *, dtype=True):
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must match")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")


def _sinks(sinks, q: torch.Tensor, hq: int) -> None:
    """Attention sinks, when given: one float logit per query head, on q's device."""
    if sinks is not None:
        _tensor("sinks", sinks)
        _float("sinks", sinks)
        _same("sinks", sinks, q, "q", dtype=False)
        if tuple(sinks.shape) != (hq,):
            raise ValueError(f"sinks has shape {tuple(sinks.shape)}; allowed: (Hq,) = ({hq},)")


def _number(name, x, *, lo=None, hi=None, lo_open=False, hi_open=False, allow_none=False):
    if x is None and allow_none:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a Python number, got {type(x).__name__}")
    x = float(x)
    bad = (not math.isfinite(x)
           or (lo is not None and (x <= lo if lo_open else x < lo))
           or (hi is not None and (x >= hi if hi_open else x > hi)))
    if bad:
        lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
        hi_s = "" if hi is None else f"{'<' if hi_open else '<='} {hi}"
        raise ValueError(f"{name}={x!r} is out of range; allowed: a finite number "
                         f"{' and '.join(s for s in (lo_s, hi_s) if s)}".rstrip())
    return x


def _choice(name, x, allowed):
    if x not in allowed:
        raise ValueError(f"{name}={x!r}; allowed: {', '.join(map(repr, allowed))}")


def _flag(name, x):
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")


def window_tuple(window):
    """Normalise `window` to (left, right) ints >= -1, or raise naming it."""
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be a (left, right) pair of ints, got {window!r}")
    left, right = window
    for side, v in (("left", left), ("right", right)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"window {side} must be an int, got {v!r}")
        if v < -1:
            raise ValueError(f"window {side}={v}; allowed: >= 0, or -1 for unbounded")
    return (left, right)


def attention(q, k, v, attn_mask, is_causal, scale, dropout_p, window, softcap, alibi_slopes,
              sinks, layout, causal_align) -> CallSpec:
    _choice("layout", layout, ("bhsd", "bshd"))
    for name, t in (("q", q), ("k", k), ("v", v)):
        _tensor(name, t, ndim=4)
        _float(name, t)
    _same("k", k, q, "q")
    _same("v", v, q, "q")
    if layout == "bhsd":
        (b, hq, sq, d), (bk, hk, sk, dk), (bv, hv, sv, dv) = q.shape, k.shape, v.shape
    else:
        (b, sq, hq, d), (bk, sk, hk, dk), (bv, sv, hv, dv) = q.shape, k.shape, v.shape
    dims = f"(layout {layout!r}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)})"
    if not (b == bk == bv):
        raise ValueError(f"q, k and v must have the same batch size {dims}")
    if d != dk:
        raise ValueError(f"q and k must have the same head_dim {dims}")
    if hk != hv or sk != sv:
        raise ValueError(f"k and v must have the same heads and sequence length {dims}")
    if min(b, hq, hk, d, dv) == 0:
        raise ValueError(f"q, k and v must have non-zero batch, heads and head_dim {dims}")
    if hq % hk != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hk}) for GQA/MQA {dims}")
    _flag("is_causal", is_causal)
    _choice("causal_align", causal_align, ("top_left", "bottom_right"))
    _number("scale", scale, lo=0.0, lo_open=True, allow_none=True)
    _number("dropout_p", dropout_p, lo=0.0, hi=1.0, hi_open=True)
    window = window_tuple(window)
    _number("softcap", softcap, lo=0.0, lo_open=True, allow_none=True)
    mask = "none"
    if attn_mask is not None:
        _tensor("attn_mask", attn_mask)
        _same("attn_mask", attn_mask, q, "q", dtype=False)
        if attn_mask.dtype == torch.bool:
            mask = "bool"
        elif attn_mask.dtype in FLOATS:
            mask = "float"
        else:
            raise TypeError(f"attn_mask has dtype {attn_mask.dtype}; allowed: bool (True = attend) "
                            f"or a floating additive mask")
        target = (b, hq, sq, sk)
        shape = tuple(attn_mask.shape)
        if len(shape) > 4 or any(s not in (1, t) for s, t in zip(shape[::-1], target[::-1])):
            raise ValueError(f"attn_mask of shape {shape} is not broadcastable to (B, Hq, Sq, Sk) = {target}")
    if alibi_slopes is not None:
        _tensor("alibi_slopes", alibi_slopes)
        _float("alibi_slopes", alibi_slopes)
        _same("alibi_slopes", alibi_slopes, q, "q", dtype=False)
        if tuple(alibi_slopes.shape) not in ((hq,), (b, hq)):
            raise ValueError(f"alibi_slopes has shape {tuple(alibi_slopes.shape)}; allowed: "
                             f"(Hq,) = ({hq},) or (B, Hq) = ({b}, {hq})")
    _sinks(sinks, q, hq)
    return CallSpec("attention", q.device.type, device_sm(q.device), q.dtype, b, hq, hk, sq, sk, d,
                    dv, layout, is_causal, causal_align, mask, window, softcap is not None,
                    alibi_slopes is not None, sinks is not None, dropout_p > 0.0,
                    needs_grad(q, k, v))



_INTS = (torch.int32, torch.int64)


def _index(name, t, ref, shape_desc, ndim):
    """An int32/int64 metadata tensor on `ref`'s device with `ndim` dims."""
    _tensor(name, t, ndim=ndim)
    if t.dtype not in _INTS:
        raise TypeError(f"{name} has dtype {t.dtype}; allowed: int32, int64 ({shape_desc})")
    _same(name, t, ref, "q", dtype=False)


def paged_attention(q, k_pages, v_pages, page_table, seq_lens, scale, is_causal, window, softcap,
                    sinks, layout) -> CallSpec:
    """Shapes, dtypes and devices of a paged call. The metadata's values (page ids in range,
    lengths within the table) are never read here: that would cost a device sync per call, and
    a `lz.PagedKVCache` guarantees them; the reference kernel checks them when it reads them."""
    _choice("layout", layout, ("bhsd", "bshd"))
    _tensor("q", q, ndim=4)
    _float("q", q)
    for name, t in (("k_pages", k_pages), ("v_pages", v_pages)):
        _tensor(name, t, ndim=4)
        _float(name, t)
        _same(name, t, q, "q")
    b, hq, sq, d = q.shape if layout == "bhsd" else (q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    n, p, hk, dk = k_pages.shape
    dv = v_pages.shape[3]
    dims = (f"(q {tuple(q.shape)} in layout {layout!r}; k_pages {tuple(k_pages.shape)}, "
            f"v_pages {tuple(v_pages.shape)} as (num_pages, page_size, kv_heads, head_dim))")
    if tuple(v_pages.shape[:3]) != (n, p, hk):
        raise ValueError(f"k_pages and v_pages must have the same num_pages, page_size and kv_heads {dims}")
    if d != dk:
        raise ValueError(f"q and k_pages must have the same head_dim {dims}")
    if min(b, hq, n, p, hk, d, dv) == 0:
        raise ValueError(f"q, k_pages and v_pages must have non-zero batch, heads, pages, page_size "
                         f"and head_dim {dims}")
    if hq % hk != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of the pages' kv heads ({hk}) for GQA/MQA {dims}")
    _index("page_table", page_table, q, "(B, max_pages): row b's page ids, in order", 2)
    if page_table.shape[0] != b:
        raise ValueError(f"page_table has shape {tuple(page_table.shape)}; allowed: (B, max_pages) "
                         f"with B = {b}, q's batch")
    _index("seq_lens", seq_lens, q, "(B,): each row's number of keys", 1)
    if tuple(seq_lens.shape) != (b,):
        raise ValueError(f"seq_lens has shape {tuple(seq_lens.shape)}; allowed: (B,) = ({b},)")
    _flag("is_causal", is_causal)
    _number("scale", scale, lo=0.0, lo_open=True, allow_none=True)
    window = window_tuple(window)
    _number("softcap", softcap, lo=0.0, lo_open=True, allow_none=True)
    _sinks(sinks, q, hq)
    return CallSpec("paged_attention", q.device.type, device_sm(q.device), q.dtype, b, hq, hk, sq,
                    page_table.shape[1] * p, d, dv, layout, is_causal, "bottom_right", "none", window,
                    softcap is not None, False, sinks is not None, False,
                    needs_grad(q, k_pages, v_pages, sinks), page_size=p)

def _norm_common(op, x, weight, eps, residual, extra_params=()):
    _tensor("x", x, min_ndim=1)
    _float("x", x)
    hidden = x.shape[-1]
    if hidden == 0:
        raise ValueError(f"x has an empty last dimension, shape {tuple(x.shape)}")
    for name, p in (("weight", weight),) + tuple(extra_params):
        if p is not None:
            _tensor(name, p, ndim=1)
            _float(name, p)
            _same(name, p, x, "x", dtype=False)
            if p.shape[0] != hidden:
                raise ValueError(f"{name} has shape {tuple(p.shape)}; allowed: ({hidden},), the last dim of x")
    _number("eps", eps, lo=0.0)
    flags = set()
    if residual is not None:
        _tensor("residual", residual)
        _same("residual", residual, x, "x")
        if residual.shape != x.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)}; it must match x {tuple(x.shape)}")
        flags.add("residual")
    if weight is None:
        flags.add("no_weight")
    return flags


def rms_norm(x, weight, eps, residual, offset) -> CallSpec:
    flags = _norm_common("rms_norm", x, weight, eps, residual)
    if _number("offset", offset) != 0.0:
        flags.add("offset")
    return CallSpec("rms_norm", x.device.type, device_sm(x.device), x.dtype,
                    batch=x.numel() // x.shape[-1], head_dim=x.shape[-1], flags=frozenset(flags),
                    grad=needs_grad(x, weight, residual))


def layer_norm(x, weight, bias, eps, residual) -> CallSpec:
    flags = _norm_common("layer_norm", x, weight, eps, residual, (("bias", bias),))
    if bias is None:
        flags.add("no_bias")
    return CallSpec("layer_norm", x.device.type, device_sm(x.device), x.dtype,
                    batch=x.numel() // x.shape[-1], head_dim=x.shape[-1], flags=frozenset(flags),
                    grad=needs_grad(x, weight, bias, residual))


def rope(q, k, cos, sin, layout, interleaved) -> CallSpec:
    _choice("layout", layout, ("bhsd", "bshd"))
    _flag("interleaved", interleaved)
    for name, t in (("q", q), ("k", k)):
        _tensor(name, t, ndim=4)
        _float(name, t)
    _same("k", k, q, "q")
    for name, t in (("cos", cos), ("sin", sin)):
        _tensor(name, t)
        _float(name, t)
        _same(name, t, q, "q", dtype=False)
        if t.dim() not in (2, 3):
            raise ValueError(f"{name} must be (S, D_rot) or (B, S, D_rot), got shape {tuple(t.shape)}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
    seq_axis, head_axis = (2, 1) if layout == "bhsd" else (1, 2)
    b, s, d = q.shape[0], q.shape[seq_axis], q.shape[-1]
    if k.shape[0] != b or k.shape[seq_axis] != s or k.shape[-1] != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch, sequence and "
                         f"head_dim (layout {layout!r})")
    rot = cos.shape[-1]
    if rot > d or rot % 2:
        raise ValueError(f"cos/sin last dim (D_rot={rot}) must be even and <= head_dim ({d})")
    cb = cos.shape[0] if cos.dim() == 3 else 1
    if cos.shape[-2] not in (1, s) or cb not in (1, b):
        raise ValueError(f"cos/sin of shape {tuple(cos.shape)} are not broadcastable to (B, S, D_rot) "
                         f"= ({b}, {s}, {rot})")
    flags = {"interleaved"} if interleaved else set()
    if rot < d:
        flags.add("partial")
    return CallSpec("rope", q.device.type, device_sm(q.device), q.dtype, b, q.shape[head_axis],
                    k.shape[head_axis], s, s, d, layout=layout, flags=frozenset(flags),
                    grad=needs_grad(q, k, cos, sin))


def gated(op, gate, up, approximate="none") -> CallSpec:
    for name, t in (("gate", gate), ("up", up)):
        _tensor(name, t, min_ndim=1)
        _float(name, t)
    _same("up", up, gate, "gate")
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    flags = frozenset()
    if op == "geglu":
        _choice("approximate", approximate, ("none", "tanh"))
        flags = frozenset({f"gelu_{approximate}"})
    return CallSpec(op, gate.device.type, device_sm(gate.device), gate.dtype,
                    batch=gate.numel() // max(gate.shape[-1], 1), head_dim=gate.shape[-1],
                    flags=flags, grad=needs_grad(gate, up))


def swiglu(gate, up) -> CallSpec:
    return gated("swiglu", gate, up)


def geglu(gate, up, approximate) -> CallSpec:
    return gated("geglu", gate, up, approximate)


def sample(logits, temperature, top_k, top_p, min_p, generator) -> CallSpec:
    _tensor("logits", logits, ndim=2)
    _float("logits", logits)
    if logits.shape[1] == 0:
        raise ValueError(f"logits has an empty vocabulary dimension, shape {tuple(logits.shape)}")
    _number("temperature", temperature, lo=0.0)
    flags = set()
    if temperature == 0.0:
        flags.add("greedy")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise TypeError(f"top_k must be an int or None, got {type(top_k).__name__}")
        if top_k < 1:
            raise ValueError(f"top_k={top_k}; allowed: >= 1")
        flags.add("top_k")
    if _number("top_p", top_p, lo=0.0, hi=1.0, lo_open=True, allow_none=True) is not None:
        flags.add("top_p")
    if _number("min_p", min_p, lo=0.0, hi=1.0, allow_none=True) is not None:
        flags.add("min_p")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != logits.device.type:
            raise ValueError(f"generator is on {generator.device} but logits are on {logits.device}")
        flags.add("generator")
    return CallSpec("sample", logits.device.type, device_sm(logits.device), logits.dtype,
                    batch=logits.shape[0], head_dim=logits.shape[1], flags=frozenset(flags))
