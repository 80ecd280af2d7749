"""torch.nn.functional.scaled_dot_product_attention as LayerZero kernels.

- torch.sdpa        : SDPA with torch's own backend choice.
- torch.sdpa_flash  : the flash kernel (CPU: aten's flash-for-CPU op, which also returns the
                      log-sum-exp, so it can add attention sinks, gradients included (see
                      _FlashSinks); CUDA: SDPBackend.FLASH_ATTENTION).
- torch.sdpa_efficient, torch.sdpa_cudnn : CUDA memory-efficient / cuDNN kernels.
- torch.sdpa_math   : the math kernel forced.

Features SDPA has no argument for are translated: bottom-right causal, sliding windows and ALiBi
become an explicit mask (bool, or additive in q's dtype when a float term is present). Softcap
can't be expressed, so these kernels reject it.

On CUDA each forced kernel's reasons are its real constraints: static ones (dtype, head_dim, SM,
no masks for flash, non-square causal for flash, K/V length 1 for cuDNN), then torch's own gate
functions on stand-in tensors (see `_torch_gate`). `torch.sdpa` is rejected when no fused kernel
takes the call, since SDPA would silently run its math kernel (GQA with a mask did on older
torch); `torch.sdpa_math` runs such calls explicitly, and `torch.sdpa_efficient` repeats K/V
heads itself where its kernel lacks GQA.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import reference
from ..registry import register
from . import priorities
from ._gpu import eager
from ._torch_version import TORCH

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_HALF = (torch.float16, torch.bfloat16)


def needs_explicit_mask(spec) -> bool:
    return (spec.mask != "none" or spec.window is not None or spec.alibi
            or (spec.causal and spec.causal_align == "bottom_right" and spec.seq_len_q != spec.seq_len_k))


def explicit_mask(q, sq, sk, attn_mask, is_causal, window, alibi_slopes, causal_align, float_mask=False):
    """One SDPA mask carrying causal/window/ALiBi and the caller's mask: bool when every term is
    bool (unless float_mask), else additive in q's dtype with -inf where not allowed (the terms
    summed in float32, float64 for a float64 call)."""
    allowed = reference.attention_allowed(sq, sk, is_causal=is_causal, window=window,
                                          causal_align=causal_align, device=q.device)
    bias, dt = None, reference.compute_dtype(q.dtype)   # float64 calls keep float64 terms
    if alibi_slopes is not None:
        bias = reference.alibi_bias(alibi_slopes, sq, sk, causal_align, dt)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = attn_mask if allowed is None else allowed & attn_mask
        else:
            bias = attn_mask.to(dt) if bias is None else bias + attn_mask.to(dt)
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
    """(q, k, v) as (B, H, S, D), SDPA's mask, its is_causal, and whether the mask may leave a
    query with no key (then the output rows are zeroed)."""
    q, k, v = _to_bhsd(q, k, v, layout)
    sq, sk = q.shape[2], k.shape[2]
    if (attn_mask is None and window is None and alibi_slopes is None
            and not (is_causal and causal_align == "bottom_right" and sq != sk)):
        return q, k, v, None, is_causal, False
    if attn_mask is None and not float_mask:
        mask, empty = shape_mask(q, sq, sk, is_causal, window, alibi_slopes, causal_align)
        return q, k, v, mask, False, empty
    return q, k, v, explicit_mask(q, sq, sk, attn_mask, is_causal, window, alibi_slopes,
                                  causal_align, float_mask), False, True


# Masks built from shapes alone (causal/window alignment) or from ALiBi slopes are cached, as a
# caller of SDPA builds them once: rebuilding costs more than a small attention call (ALiBi
# 2x1k d64 on the H100: 0.277 ms with the bias built per call, 0.050 ms with it built once).
_MASKS: dict = {}
MASK_CACHE_MAX_BYTES = 64 << 20      # per mask; larger ones are built per call
MASK_CACHE_TOTAL_BYTES = 256 << 20   # all cached masks together; the oldest go first


def has_empty_rows(sq: int, sk: int, is_causal: bool, window, causal_align: str) -> bool:
    """Does the causal/window mask leave some query with no key? Query i sees keys
    max(0, i + c1) .. min(sk - 1, i + c2); both bounds grow with i, so the first and last
    rows decide."""
    off = 0 if causal_align == "top_left" else sk - sq
    left, right = window if window is not None else (-1, -1)
    bounds = [r for r in (0 if is_causal else -1, right) if r >= 0]

    def empty(i):
        lo = max(0, i + off - left) if left >= 0 else 0
        hi = min(sk - 1, i + off + min(bounds)) if bounds else sk - 1
        return lo > hi
    return empty(0) or empty(sq - 1)


def shape_mask(q, sq, sk, is_causal, window, alibi_slopes, causal_align):
    """(explicit_mask without a caller's mask, whether it has empty rows), cached per shapes
    and per ALiBi slopes tensor (identity and version: an in-place edit rebuilds it)."""
    empty = has_empty_rows(sq, sk, is_causal, window, causal_align)
    traced = not eager(q) or (q.is_cuda and torch.cuda.is_current_stream_capturing())
    # slopes needing grad, or made under inference_mode (no version counter to see an in-place
    # edit by), get a fresh mask every call
    if traced or (alibi_slopes is not None and (alibi_slopes.requires_grad or alibi_slopes.is_inference())):
        return explicit_mask(q, sq, sk, None, is_causal, window, alibi_slopes, causal_align), empty
    slopes = None if alibi_slopes is None else (id(alibi_slopes), alibi_slopes._version)
    key = (sq, sk, is_causal, window, causal_align, q.device, q.dtype, slopes)
    hit = _MASKS.get(key)
    if hit is not None and hit[1] is alibi_slopes:
        return hit[0], empty
    mask = explicit_mask(q, sq, sk, None, is_causal, window, alibi_slopes, causal_align)
    size = mask.numel() * mask.element_size()
    if size <= MASK_CACHE_MAX_BYTES:
        while _MASKS and size + sum(m.numel() * m.element_size() for m, _ in _MASKS.values()) > MASK_CACHE_TOTAL_BYTES:
            _MASKS.pop(next(iter(_MASKS)), None)
        _MASKS[key] = (mask, alibi_slopes)        # holding the slopes keeps their id unique
    return mask, empty


_F_sdpa = F.scaled_dot_product_attention


def _sdpa_gqa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    """F.scaled_dot_product_attention(..., enable_gqa=True), passing defaults only where they are
    not defaults (each argument SDPA's binding parses costs host time; a functools.partial merges
    its keywords into a new dict on every call)."""
    if attn_mask is None and not dropout_p and scale is None:
        return _F_sdpa(q, k, v, is_causal=is_causal, enable_gqa=True)
    return _F_sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=True)


_CUDNN_OP = getattr(torch, "_scaled_dot_product_cudnn_attention", None)
_grad_enabled = torch._C.is_grad_enabled


def plain_cudnn(spec):
    """torch.sdpa_cudnn's plain path (see registry.plain): when that kernel is chosen (locked,
    `lz.use`, or ranked first), the call goes straight to aten's cuDNN op instead of through the
    sdpa_kernel context manager. Not cheaper than SDPA's own path: the op returns 9 outputs to
    Python (23 vs 19 us a 1x512 GQA causal call on the H100 host under no_grad), which is why
    torch.sdpa ranks first for small calls (priorities.TABLES). The op takes GQA K/V as they
    are on torch >= 2.11 (checked there against SDPA); older torch keeps the sdpa_kernel path."""
    if (_CUDNN_OP is None or spec.device != "cuda" or spec.dropout
            or (spec.num_heads != spec.num_kv_heads and TORCH < (2, 11))):
        return None

    def cudnn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
        # backward needs the log-sum-exp (grad mode first: one call under inference_mode/no_grad)
        lse = _grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        return _CUDNN_OP(q, k, v, None, lse, 0.0, is_causal, False, scale=scale)[0]
    return cudnn


def plain_sdpa(spec):
    """SDPA-expressible calls go straight to F.scaled_dot_product_attention (see registry.plain)."""
    return F.scaled_dot_product_attention if spec.num_heads == spec.num_kv_heads else _sdpa_gqa


def sdpa(q, k, v, attn_mask, is_causal, scale, dropout_p, window, softcap, alibi_slopes, sinks,
         layout, causal_align):
    if layout == "bhsd" and attn_mask is None and window is None and alibi_slopes is None and (
            not is_causal or causal_align == "top_left" or q.shape[2] == k.shape[2]):
        return F.scaled_dot_product_attention(q, k, v, None, dropout_p, is_causal, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    qh, kh, vh, mask, causal, empty = _prepare(q, k, v, attn_mask, is_causal, window, alibi_slopes,
                                               layout, causal_align)
    out = F.scaled_dot_product_attention(qh, kh, vh, mask, dropout_p, causal, scale=scale,
                                         enable_gqa=qh.shape[1] != kh.shape[1])
    if empty:
        out = zero_empty_rows(out, mask)
    return out.transpose(1, 2) if layout == "bshd" else out


def zero_empty_rows(out, mask):
    """Queries whose mask allows no key return zeros. SDPA's cuDNN kernel returns garbage for
    them (measured on the H100, torch 2.11: error 0.64 on a (B, H, Sq, D) bf16 call). SDPA's
    output is fresh, so it is zeroed in place (one pass over it)."""
    empty = ~mask.any(-1, keepdim=True) if mask.dtype == torch.bool else \
        torch.isneginf(mask).all(-1, keepdim=True)                     # (.., Sq, 1)
    if not eager(out) or out.requires_grad:
        return out.masked_fill(empty, 0.0)
    return out.masked_fill_(empty, 0.0)


def _forced(backend):
    """SDPA limited to one of its kernels. The fused ones take only q/k/v whose last dim is
    contiguous (SDPA's gate, not the call's shape): such views (a fused projection's slices seen
    through a transpose, say) are copied rather than sent to a kernel that refuses them."""
    def run(q, k, v, attn_mask, is_causal, scale, dropout_p, window, softcap, alibi_slopes, sinks,
            layout, causal_align):
        if backend != SDPBackend.MATH:
            q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
        with sdpa_kernel([backend]):
            return sdpa(q, k, v, attn_mask, is_causal, scale, dropout_p, window, softcap,
                        alibi_slopes, sinks, layout, causal_align)
    run.__name__ = f"sdpa_{backend.name.lower()}"
    return run


_FLASH_CPU_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _unit_stride(t):
    """t, copied if its last dim is not contiguous. The CPU flash op reads each row of q/k/v as
    if it were (torch 2.13: errors up to 1e31 for a transposed buffer's view), and SDPA's gate
    refuses such inputs to its fused CUDA kernels ("No available kernel")."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _flash_sinks(q, k, v, sinks, mask, causal, scale):
    """(out, lse) of attention whose softmax also holds one sink logit per head (a key with no
    value): out = softmax(scores) @ v * exp(lse_scores - lse), lse = logaddexp(lse_scores, sink),
    both in the op's lse dtype (float32; float64 for float64)."""
    out, lse = _FLASH_CPU(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)  # lse: (B, H, Sq)
    lse_all = torch.logaddexp(lse, sinks.to(lse.dtype).view(1, -1, 1))
    out = (out.to(lse.dtype) * torch.exp(lse - lse_all).unsqueeze(-1)).to(q.dtype)
    return out, lse_all


class _FlashSinks(torch.autograd.Function):
    """_flash_sinks with its gradient. The op's own backward ignores a gradient of the lse, which
    the sink rescaling needs (q/k gradients were 40-70% off). Attention with a sink is attention
    over one more key whose value is zero, so the op's backward given the sink-inclusive output
    and lse returns dq, dk, dv exactly; d sink_h = -sum_(b, i) (dout_i . out_i) p_sink_i."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, mask, causal, scale):
        out, lse = _flash_sinks(q, k, v, sinks, mask, causal, scale)
        ctx.save_for_backward(q, k, v, sinks, mask, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, sinks, mask, out, lse = ctx.saved_tensors
        dq, dk, dv = _FLASH_CPU_BACKWARD(grad, q, k, v, out, lse, 0.0, ctx.causal,
                                         attn_mask=mask, scale=ctx.scale)
        p_sink = torch.exp(sinks.to(lse.dtype).view(1, -1, 1) - lse)           # (B, H, Sq)
        dsinks = -((grad.to(lse.dtype) * out.to(lse.dtype)).sum(-1) * p_sink).sum((0, 2))
        return dq, dk, dv, dsinks.to(sinks.dtype), None, None, None


def flash_cpu(q, k, v, attn_mask, is_causal, scale, dropout_p, window, softcap, alibi_slopes, sinks,
              layout, causal_align):
    qh, kh, vh, mask, causal, _ = _prepare(q, k, v, attn_mask, is_causal, window, alibi_slopes,
                                           layout, causal_align, float_mask=True)
    qh, kh, vh = _unit_stride(qh), _unit_stride(kh), _unit_stride(vh)
    if TORCH < (2, 6) and qh.shape[1] != kh.shape[1]:
        rep = qh.shape[1] // kh.shape[1]
        kh, vh = kh.repeat_interleave(rep, dim=1), vh.repeat_interleave(rep, dim=1)
    if mask is not None and mask.dim() not in (2, 4):  # the CPU op takes 2-D or 4-D masks
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if sinks is None:
        out = _FLASH_CPU(qh, kh, vh, 0.0, causal, attn_mask=mask, scale=scale)[0]
    elif _grad_enabled() and (qh.requires_grad or kh.requires_grad or vh.requires_grad
                              or sinks.requires_grad):
        if mask is not None and mask.requires_grad:  # as the op itself says, not dropped silently
            raise RuntimeError("torch.sdpa_flash (CPU) is not differentiable with respect to the "
                               "mask (an attn_mask or ALiBi slopes requiring grad)")
        out = _FlashSinks.apply(qh, kh, vh, sinks, mask, causal, scale)
    else:
        out = _flash_sinks(qh, kh, vh, sinks, mask, causal, scale)[0]
    return out.transpose(1, 2) if layout == "bshd" else out


# ---- supports(): reasons a kernel can't run a call ------------------------------------------

def _common(spec) -> list[str]:
    return ["softcap has no SDPA equivalent"] if spec.softcap else []


def _plain_reasons(spec) -> list[str]:
    r = _common(spec)
    if spec.sinks:
        r.append("attention sinks need the log-sum-exp, which plain SDPA does not return")
    return r


def supports_math(spec) -> list[str]:
    return _plain_reasons(spec)


def supports_flash(spec) -> list[str]:
    r = _common(spec)
    if spec.device == "cpu":
        if spec.dropout:
            r.append("dropout is not supported by the forced flash kernel here")
        if _FLASH_CPU is None:
            r.append(f"torch {torch.__version__} has no flash-attention CPU op")
        elif spec.sinks and spec.grad and _FLASH_CPU_BACKWARD is None:
            r.append(f"torch {torch.__version__} has no backward op for flash attention on the "
                     f"CPU, needed for sinks' gradients")
        if spec.head_dim_v != spec.head_dim:
            r.append("head_dim of v differs from q/k")
        return r
    if spec.device != "cuda":
        return r + [f"device {spec.device!r} is not supported (cpu, cuda)"]
    if spec.sinks:
        r.append("attention sinks need the log-sum-exp, which SDPA does not return on CUDA")
    return r + cuda_reasons(spec, "flash")


# ---- CUDA: each fused kernel's real constraints ----------------------------------------------
# Static checks first (they hold for every torch >= 2.5 and need no GPU); then, on a machine with
# CUDA, torch's own gate functions (torch.backends.cuda.can_use_*_attention) on stand-in tensors
# of the call's shape (stride-0 views of one row: no memory), whose warnings are the reasons.
# That makes version-specific rules (cuDNN head_dim limits, GQA support per kernel) exact.

_NAMES = {"flash": "SDPA flash", "efficient": "SDPA efficient", "cudnn": "SDPA cuDNN"}


def _static_cuda(spec, backend) -> list[str]:
    name, r = _NAMES[backend], []
    min_sm = 50 if backend == "efficient" else 80
    if spec.sm < min_sm:
        r.append(f"{name} needs sm{min_sm}+, this GPU is sm{spec.sm}")
    dtypes = (torch.float16, torch.bfloat16, torch.float32) if backend == "efficient" else _HALF
    if spec.dtype not in dtypes:
        r.append(f"{name} takes {', '.join(str(d)[6:] for d in dtypes)}, got {str(spec.dtype)[6:]}")
    if backend == "efficient":
        align = 8 if spec.dtype in _HALF else 4
        if spec.head_dim % align or spec.head_dim_v % align:
            r.append(f"{name} needs head_dims that are multiples of {align}, got "
                     f"{spec.head_dim}/{spec.head_dim_v}")
        return r
    if spec.head_dim > 256 or spec.head_dim_v > 256:
        r.append(f"{name} needs head_dim <= 256, got {spec.head_dim}/{spec.head_dim_v}")
    if backend == "flash":
        if spec.head_dim_v != spec.head_dim:
            r.append(f"{name} needs v's head_dim equal to q's")
        if needs_explicit_mask(spec):
            r.append(f"{name} takes no explicit mask (mask, window, ALiBi or bottom-right causal)")
        elif spec.causal and spec.seq_len_q != spec.seq_len_k:
            r.append(f"{name} refuses is_causal with Sq != Sk ({spec.seq_len_q}, {spec.seq_len_k})")
    else:
        if spec.head_dim % 8 or spec.head_dim_v % 8:
            r.append(f"{name} needs head_dims that are multiples of 8, got {spec.head_dim}/{spec.head_dim_v}")
        if spec.seq_len_k == 1:
            r.append(f"{name} does not take a key/value sequence of length 1")
        if spec.dropout:
            r.append(f"{name} takes dropout only in multiples of 1/16, a value the call "
                     f"description doesn't carry")
    return r


def _mask_kind(spec) -> str | None:
    """The explicit mask SDPA gets for this call: None, "bool" or "float" (see explicit_mask)."""
    if not needs_explicit_mask(spec):
        return None
    return "float" if spec.alibi or spec.mask == "float" else "bool"


@functools.lru_cache(maxsize=4096)
def _torch_gate(backend: str, b, hq, hk, sq, sk, d, dv, dtype, causal, mask, dropout, grad) -> tuple:
    """torch's own verdict on whether SDPA's `backend` takes this call: () or its reasons."""
    import warnings

    try:
        dev = torch.device("cuda", torch.cuda.current_device())

        def stand_in(h, s, dd):  # (B, H, S, D) with stride 0 outside the last dim
            return torch.empty(1, 1, 1, dd, device=dev, dtype=dtype).requires_grad_(grad).expand(b, h, s, dd)
        q, k, v = stand_in(hq, sq, d), stand_in(hk, sk, d), stand_in(hk, sk, dv)
        m = None
        if mask is not None:
            m = torch.empty(1, 1, 1, sk, device=dev, dtype=torch.bool if mask == "bool" else dtype)
            m = m.expand(b, hq, sq, sk)
        p = 0.125 if dropout else 0.0
        try:
            params = torch.backends.cuda.SDPAParams(q, k, v, m, p, causal, hq != hk)
        except TypeError:  # torch without enable_gqa in SDPAParams
            params = torch.backends.cuda.SDPAParams(q, k, v, m, p, causal)
        fn = getattr(torch.backends.cuda, f"can_use_{backend}_attention")
        if fn(params, False):  # the verdict alone: with debug=True torch also prints its reasons
            return ()
        # Refused: ask again for the reasons. torch's C++ warnings reach Python's warnings on some
        # builds and stderr on others (torch 2.11: "[W... sdp_utils_cpp.h:418] Warning: ...", once
        # per new shape, so every decode step of a GQA model printed one); both are kept here.
        with warnings.catch_warnings(record=True) as caught, _stderr_captured() as printed:
            warnings.simplefilter("always")
            fn(params, True)
    except Exception:  # no verdict: the static reasons stand, runtime fallback covers the rest
        return ()
    msgs = [str(w.message) for w in caught] + _cpp_warnings(printed[0])
    msgs = [" ".join(m.split())[:240] for m in msgs] or [f"can_use_{backend}_attention is False"]
    return tuple(f"torch: {m}" for m in dict.fromkeys(msgs))


_CPP_WARNING = re.compile(r"^\[W[^\]]*\] Warning: (.*?)(?: \(function \w+\))?$")


def _cpp_warnings(text: str) -> list[str]:
    """The messages of c10's warnings ("[W<time> <file>:<line>] Warning: <message> (function
    <name>)") printed in `text`."""
    return [m.group(1) for m in map(_CPP_WARNING.match, text.splitlines()) if m]


@contextlib.contextmanager
def _stderr_captured():
    """What is written to file descriptor 2 inside the block (C++ code writes there directly)
    goes into `printed[0]` instead. Used only around one gate call per new call shape."""
    printed = [""]
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield printed
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            printed[0] = tmp.read().decode(errors="replace")


def _gate(spec, backend, *, repeat_kv=False) -> tuple:
    if not torch.cuda.is_available():
        return ()
    hk = spec.num_heads if repeat_kv else spec.num_kv_heads
    return _torch_gate(backend, spec.batch, spec.num_heads, hk, spec.seq_len_q, spec.seq_len_k,
                       spec.head_dim, spec.head_dim_v, spec.dtype,
                       spec.causal and not needs_explicit_mask(spec), _mask_kind(spec),
                       spec.dropout, spec.grad)


def cuda_reasons(spec, backend) -> list[str]:
    """Why SDPA's fused `backend` ("flash", "efficient", "cudnn") can't take a CUDA call."""
    r = _static_cuda(spec, backend)
    if r:
        return r
    if backend == "efficient" and spec.num_heads != spec.num_kv_heads and torch.cuda.is_available():
        try:
            _efficient_native_gqa(torch.cuda.current_device())   # kept for traced calls (see there)
        except (RuntimeError, AssertionError):   # no usable device after all: asked again at the call
            pass
    gate = _gate(spec, backend)
    if gate and backend == "efficient" and spec.num_heads != spec.num_kv_heads \
            and not _gate(spec, backend, repeat_kv=True):
        return []  # the adapter repeats K/V heads for it (see sdpa_efficient)
    return list(gate)


def supports_sdpa(spec) -> list[str]:
    r = _plain_reasons(spec)
    if spec.device == "cuda" and not r and torch.cuda.is_available():
        fused = {b: _static_cuda(spec, b) or list(_gate(spec, b)) for b in ("cudnn", "flash", "efficient")}
        if all(fused.values()):  # SDPA would silently run its O(S^2)-memory math kernel
            gqa = " (enable_gqa with a mask)" if spec.num_heads != spec.num_kv_heads and needs_explicit_mask(spec) else ""
            r.append(f"no fused SDPA kernel takes this call{gqa}, so torch would run its math kernel; "
                     f"torch.sdpa_math runs it explicitly. " +
                     "; ".join(f"{_NAMES[b]}: {v[0]}" for b, v in fused.items()))
    return r


def supports_efficient(spec) -> list[str]:
    r = _plain_reasons(spec)
    if spec.device != "cuda":
        return r + ["SDPA memory-efficient kernel needs a CUDA device"]
    return r + cuda_reasons(spec, "efficient")


def supports_cudnn(spec) -> list[str]:
    r = _plain_reasons(spec)
    if spec.device != "cuda":
        return r + ["SDPA cuDNN kernel needs a CUDA device"]
    return r + cuda_reasons(spec, "cudnn")


_NATIVE_GQA: dict[int, bool] = {}   # device index -> _efficient_native_gqa's answer


def _efficient_native_gqa(device_index: int) -> bool:
    """Does this torch's memory-efficient kernel take enable_gqa itself (newer torch does)?

    Asked when selection makes the kernel eligible (`cuda_reasons`), before any tracing: torch's
    gate builds an `SDPAParams`, which dynamo can't trace (a graph break in every layer, and no
    CUDA graph for lz.generate's step). Traced code reads the answer from a plain dict; with none
    kept it repeats K/V heads, which is right on every torch."""
    known = _NATIVE_GQA.get(device_index)
    if known is None:
        if torch.compiler.is_compiling():
            return False
        known = _NATIVE_GQA[device_index] = not _torch_gate(
            "efficient", 1, 4, 2, 16, 16, 64, 64, torch.float16, False, "bool", False, False)
    return known


def sdpa_efficient(q, k, v, attn_mask, is_causal, scale, dropout_p, window, softcap, alibi_slopes,
                   sinks, layout, causal_align):
    """SDPA's memory-efficient kernel; on a torch whose kernel lacks GQA, K/V heads are repeated
    here (a copy of K/V) rather than letting SDPA drop to its math kernel."""
    head = 1 if layout == "bhsd" else 2
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)    # as _forced, for its gate
    if q.shape[head] != k.shape[head] and not _efficient_native_gqa(q.device.index or 0):
        rep = q.shape[head] // k.shape[head]
        k, v = k.repeat_interleave(rep, dim=head), v.repeat_interleave(rep, dim=head)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        return sdpa(q, k, v, attn_mask, is_causal, scale, dropout_p, window, softcap, alibi_slopes,
                    sinks, layout, causal_align)


_flash_cuda = _forced(SDPBackend.FLASH_ATTENTION)


def sdpa_flash(*args):
    return flash_cpu(*args) if args[0].device.type == "cpu" else _flash_cuda(*args)


# Priorities: these constants off CUDA; on CUDA, priorities.py's table per GPU generation.
register("attention", "torch.sdpa", sdpa, priority=priorities.attention("torch.sdpa", 50),
         supports=supports_sdpa, plain=plain_sdpa)
register("attention", "torch.sdpa_flash", sdpa_flash,
         priority=priorities.attention("torch.sdpa_flash", 45), supports=supports_flash)
register("attention", "torch.sdpa_cudnn", _forced(SDPBackend.CUDNN_ATTENTION),
         priority=priorities.attention("torch.sdpa_cudnn", 48), supports=supports_cudnn,
         plain=plain_cudnn)
register("attention", "torch.sdpa_efficient", sdpa_efficient,
         priority=priorities.attention("torch.sdpa_efficient", 30), supports=supports_efficient)
register("attention", "torch.sdpa_math", _forced(SDPBackend.MATH),
         priority=priorities.attention("torch.sdpa_math", 20), supports=supports_math)
