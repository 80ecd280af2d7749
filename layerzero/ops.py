"""The public ops. Each builds a raw cache key from its arguments' metadata and hands the call to
`dispatch.call`, which runs the cached kernel or validates, selects and caches on a miss.

Kernels receive the op's arguments positionally, in the order of the op's signature.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from . import control, dispatch, health, registry, validate
from .call import CallSpec
from .validate import window_tuple

_local = control.local
_grad_mode = getattr(torch._C, "is_grad_enabled", torch.is_grad_enabled)
_fast = dispatch.fast
_breakers = health.state


def _sig(t: Any) -> tuple | None:
    """Metadata of an optional tensor argument that validation depends on."""
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return (t.shape, t.dtype, t.device)
    return (type(t),)  # not a tensor: never cached, validation raises


def attention(q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None = None,
              is_causal: bool = False, scale: float | None = None, dropout_p: float = 0.0,
              window: tuple[int, int] | None = None, softcap: float | None = None,
              alibi_slopes: Tensor | None = None, sinks: Tensor | None = None,
              layout: str = "bhsd", causal_align: str = "top_left") -> Tensor:
    """Scaled dot-product attention; the fastest kernel that can run this call runs it.

    q: (B, Hq, Sq, D) for layout="bhsd" or (B, Sq, Hq, D) for "bshd"; k, v: (B, Hkv, Sk, D[v])
    in the same layout, Hq a multiple of Hkv (GQA/MQA, no repeat needed). Returns q's layout.

    attn_mask: bool (True = attend) or additive float, broadcastable to (B, Hq, Sq, Sk).
    is_causal with causal_align "top_left" (SDPA: query i sees keys j <= i) or "bottom_right"
    (flash-attn: j <= i + Sk - Sq). For Sq=2, Sk=4 ("x" = attended)::

        top_left:  x . . .     bottom_right:  x x x .
                   x x . .                    x x x x

    window=(left, right): query i sees keys i+off-left <= j <= i+off+right (inclusive, -1 =
    unbounded, off aligned as the causal mask). softcap: scores = softcap * tanh(scores / softcap).
    alibi_slopes (Hq,) or (B, Hq): score -= slope * |i + off - j|. sinks (Hq,): per-head logits
    joining the softmax denominator only. A query with no key to attend returns zeros.
    """
    if attn_mask is None and window is None and softcap is None and alibi_slopes is None and sinks is None:
        opt = None
    else:
        window = window_tuple(window)
        opt = (_sig(attn_mask), window, softcap, _sig(alibi_slopes), _sig(sinks))
    try:
        # k/v dtypes and devices are left out of the key (reading them costs more than the rest
        # of the lookup): F.scaled_dot_product_attention checks they match q's itself, and other
        # kernels get the dtype check below; a kernel that raises goes through dispatch.recover,
        # which re-validates and names the argument. Grad mode is in the key; whether the inputs
        # require grad is read only when the cached kernel could not run backward.
        key = ("attention", q.shape, k.shape, v.shape, q.dtype, q.device, is_causal, scale,
               dropout_p, layout, causal_align, opt, _grad_mode(),
               _local.prefs if control.uses_active else ())
        e = _fast[key]
        if not e.grad_ok and (q.requires_grad or k.requires_grad or v.requires_grad):
            key = (key, "requires_grad")
            e = _fast[key]
    except KeyError:
        e = None
    except (AttributeError, TypeError):  # not tensors, or unhashable: validation says which
        key = e = None
    if e is not None and not _breakers:
        try:
            if e.plain is not None:  # F.scaled_dot_product_attention's own signature
                # defaults left out: each argument SDPA's binding parses costs host time
                # (H100 host: 17.2 us a 1x512 call with is_causal= alone, 17.7 with None, 0.0 too)
                out = (e.plain(q, k, v, is_causal=is_causal) if scale is None and not dropout_p
                       else e.plain(q, k, v, None, dropout_p, is_causal, scale=scale))
            elif k.dtype is not q.dtype or v.dtype is not q.dtype:
                raise TypeError("k/v dtype differs from q's")
            else:
                out = e.fn(q, k, v, attn_mask, is_causal, scale, dropout_p, window, softcap,
                           alibi_slopes, sinks, layout, causal_align)
        except Exception as exc:
            return dispatch.recover(e, (q, k, v, attn_mask, is_causal, scale, dropout_p, window,
                                        softcap, alibi_slopes, sinks, layout, causal_align),
                                    validate.attention, exc)
        next(e.hits)
        return out
    return dispatch.call(key, (q, k, v, attn_mask, is_causal, scale, dropout_p, window, softcap,
                               alibi_slopes, sinks, layout, causal_align), validate.attention)


# The other ops build their raw key in a try: an argument that is not a tensor has no .shape
# (AttributeError), and validation, run on the miss that a None key is, names it.

def rms_norm(x: Tensor, weight: Tensor | None, eps: float = 1e-6, *, residual: Tensor | None = None,
             offset: float = 0.0) -> Tensor | tuple[Tensor, Tensor]:
    """y = x / sqrt(mean(x^2, -1) + eps) * (offset + weight), computed in fp32, returned in x's
    dtype. With `residual`: x = x + residual first, returns (y, x + residual). offset=1.0 is
    Gemma's (1 + w) form. `weight` may be None (no scale)."""
    try:
        grad = torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad))
        key = ("rms_norm", x.shape, x.dtype, x.device, _sig(weight), eps, _sig(residual), offset,
               grad, _local.prefs)
    except AttributeError:
        key = None
    return dispatch.call(key, (x, weight, eps, residual, offset), validate.rms_norm)


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5, *,
               residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """As F.layer_norm over the last dim (weight/bias may be None); residual as in rms_norm."""
    try:
        grad = torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad))
        key = ("layer_norm", x.shape, x.dtype, x.device, _sig(weight), _sig(bias), eps,
               _sig(residual), grad, _local.prefs)
    except AttributeError:
        key = None
    return dispatch.call(key, (x, weight, bias, eps, residual), validate.layer_norm)


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, layout: str = "bhsd",
         interleaved: bool = False) -> tuple[Tensor, Tensor]:
    """Rotary embedding as transformers' apply_rotary_pos_emb -> (q, k).

    cos/sin: (S, D_rot) or (B, S, D_rot); the first D_rot features of each head rotate, the rest
    pass through (partial rotary). interleaved=False rotates halves (llama); True rotates adjacent
    pairs (GPT-J), with cos/sin holding each angle twice in adjacent positions."""
    try:
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        key = ("rope", q.shape, k.shape, q.dtype, k.dtype, q.device, k.device, _sig(cos), _sig(sin),
               layout, interleaved, grad, _local.prefs)
    except AttributeError:
        key = None
    return dispatch.call(key, (q, k, cos, sin, layout, interleaved), validate.rope)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, elementwise."""
    try:
        grad = torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)
        key = ("swiglu", gate.shape, up.shape, gate.dtype, up.dtype, gate.device, up.device, grad,
               _local.prefs)
    except AttributeError:
        key = None
    return dispatch.call(key, (gate, up), validate.swiglu)


def geglu(gate: Tensor, up: Tensor, approximate: str = "none") -> Tensor:
    """gelu(gate, approximate) * up, elementwise."""
    try:
        grad = torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)
        key = ("geglu", gate.shape, up.shape, gate.dtype, up.dtype, gate.device, up.device,
               approximate, grad, _local.prefs)
    except AttributeError:
        key = None
    return dispatch.call(key, (gate, up, approximate), validate.geglu)


def sample(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, min_p: float | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """One token id per row of (B, V) logits -> LongTensor (B,). temperature=0 is greedy;
    top_k / top_p / min_p filter as transformers' logits warpers (in that order)."""
    gen = None if generator is None else (type(generator), getattr(generator, "device", None))
    try:
        key = ("sample", logits.shape, logits.dtype, logits.device, temperature, top_k, top_p,
               min_p, gen, _local.prefs)
    except AttributeError:
        key = None
    return dispatch.call(key, (logits, temperature, top_k, top_p, min_p, generator), validate.sample)



def paged_attention(q: Tensor, k_pages: Tensor, v_pages: Tensor, page_table: Tensor,
                    seq_lens: Tensor, *, scale: float | None = None, is_causal: bool = True,
                    window: tuple[int, int] | None = None, softcap: float | None = None,
                    sinks: Tensor | None = None, layout: str = "bhsd") -> Tensor:
    """Attention over K/V kept in pages (a `lz.PagedKVCache`'s), for a batch of rows of
    different lengths.

    q: (B, Hq, Sq, D) for layout="bhsd" or (B, Sq, Hq, D) for "bshd"; the output has q's layout
    and dtype, with v's head_dim. k_pages / v_pages: (num_pages, page_size, Hkv, D[v]), "NHD" (the
    layout of FlashInfer's paged KV and of transformers' paged cache); Hq a multiple of Hkv (GQA).

    page_table (B, max_pages) int32/int64: row b's keys are, in order, the tokens of pages
    page_table[b, 0], ..., page_table[b, ceil(seq_lens[b] / page_size) - 1]; the last of them may
    be partly filled; later entries are ignored (-1 by convention). seq_lens (B,) int32/int64:
    the number of keys of row b, the new tokens of this call included. FlashInfer's CSR form is
    derived from the two (`layerzero.paged.meta.csr`): indptr = cumsum of the rows' page counts,
    indices = the used entries row by row, last_page_len = seq_lens - (pages - 1) * page_size.

    Query i of row b sits at key position seq_lens[b] - Sq + i (bottom-right, as flash-attn with
    a cache: the queries are the row's last Sq tokens). is_causal: it attends keys j <= its
    position. window=(left, right): keys position-left <= j <= position+right (inclusive, -1 =
    unbounded), as `lz.attention`'s. For Sq=2, seq_lens=(4, 3), causal ("x" = attended)::

        row 0:  x x x .      row 1:  x x . .
                x x x x              x x x .

    A causal query at a negative position (left padding: a row with fewer tokens than Sq)
    attends nothing and, as any query with no key to attend, returns zeros, never NaN.
    softcap: scores = softcap * tanh(scores / softcap). sinks (Hq,): per-head logits joining the
    softmax denominator only. scale defaults to 1/sqrt(D).

    Selection reads shapes, dtypes and devices only (`validate.paged_attention`); the values
    of page_table and seq_lens are the caller's to keep in range (a `lz.PagedKVCache` does).
    """
    try:
        window = window_tuple(window)
        grad = _grad_mode() and (q.requires_grad or k_pages.requires_grad or v_pages.requires_grad
                                 or (sinks is not None and sinks.requires_grad))
        key = ("paged_attention", q.shape, q.dtype, q.device, k_pages.shape, k_pages.dtype,
               k_pages.device, v_pages.shape, v_pages.dtype, v_pages.device, page_table.shape,
               page_table.dtype, page_table.device, seq_lens.shape, seq_lens.dtype,
               seq_lens.device, scale, is_causal, window, softcap, _sig(sinks), layout, grad,
               _local.prefs)
    except AttributeError:
        key = None
    return dispatch.call(key, (q, k_pages, v_pages, page_table, seq_lens, scale, is_causal, window,
                               softcap, sinks, layout), validate.paged_attention)


PUBLIC = {"attention": attention, "rms_norm": rms_norm, "layer_norm": layer_norm, "rope": rope,
          "swiglu": swiglu, "geglu": geglu, "sample": sample, "paged_attention": paged_attention}
DESCRIBE = {"attention": validate.attention, "rms_norm": validate.rms_norm,
            "layer_norm": validate.layer_norm, "rope": validate.rope, "swiglu": validate.swiglu,
            "geglu": validate.geglu, "sample": validate.sample,
            "paged_attention": validate.paged_attention}


def bind(op: str, args: tuple, kwargs: dict) -> tuple:
    """The op's arguments in signature order, defaults filled, as kernels receive them."""
    sig = inspect.signature(PUBLIC[op])
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:  # the signature as written, without its (string) annotations
        plain = sig.replace(parameters=[p.replace(annotation=p.empty) for p in sig.parameters.values()],
                            return_annotation=sig.empty)
        raise TypeError(f"lz.{op}{plain}: {e}") from None
    bound.apply_defaults()
    vals = tuple(bound.arguments.values())
    if op in ("attention", "paged_attention") and vals[7] is not None:  # window, in both
        vals = vals[:7] + (window_tuple(vals[7]),) + vals[8:]
    return vals


def describe(op: str, args: tuple, kwargs: dict, caller: str = "describe") -> tuple[CallSpec, tuple]:
    """(CallSpec, bound args) for `lz.<op>(*args, **kwargs)`, validating like the op does;
    `op` must name an op (`caller` names the public function in the error)."""
    if not isinstance(op, str):
        raise TypeError(f"{caller}(op, *args, **kwargs) takes an op name ({', '.join(registry.OPS)}); "
                        f"got {type(op).__name__}")
    registry.check_op(op)
    vals = bind(op, args, kwargs)
    return DESCRIBE[op](*vals), vals
