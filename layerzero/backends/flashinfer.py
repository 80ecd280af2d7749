"""FlashInfer as kernels: `flashinfer.prefill`, `flashinfer.decode` (attention),
`flashinfer.rms_norm`, `flashinfer.rope`, `flashinfer.sample`.

Attention. FlashInfer takes q as (tokens, H, D) and k/v per request as "NHD" (S, H, D) or
"HND" (H, S, D). A dense (B, Sk, H, D) k/v is a paged cache with one page of Sk tokens per
request, so batches use the paged wrappers without copying K/V: "bshd" k/v are NHD pages,
"bhsd" k/v are HND pages. One request (B = 1) uses the single-request kernels.

    prefill  B = 1: single_prefill_with_kv_cache;  B > 1: BatchPrefillWithPagedKVCacheWrapper
    decode   B = 1: single_decode_with_kv_cache;   B > 1: BatchDecodeWithPagedKVCacheWrapper

Wrappers are planned once per call geometry and reused (plan/run; an LRU of 64 plans sharing
one 128 MiB workspace per device); a call with a mask plans with that mask each time.
Semantics: causal masks and `window_left` are bottom-right aligned (query i at key i + Sk - Sq),
so top-left causal/window calls need Sq == Sk; a window's right bound can only be 0 (causal)
or unbounded. A bool attn_mask (shared across heads) becomes FlashInfer's custom mask, with the
causal/window terms folded in; rows it masks completely return zeros. Softcap is
`logits_soft_cap`. No ALiBi (FlashInfer's built-in slopes are fixed), no float masks, no sinks,
no dropout.

JIT: FlashInfer compiles each kernel variant (dtype, head_dim, window, softcap, custom mask,
backend) with nvcc on first use, 12-70 s each (minutes for several), cached on disk
($FLASHINFER_WORKSPACE_BASE/.cache/flashinfer, default ~). No call waits for that: `supports()`
asks `warmup.need`, which checks once per variant whether it is built (a dry run of the kernel on
small stand-in tensors in which FlashInfer's `JitSpec.build_and_load` raises instead of
compiling: AOT-shipped and JIT-cached modules load and count as built) and, if not, builds it on
a background thread by running the kernel on those stand-in tensors; meanwhile the variant's
reason makes calls run the next kernel. `lz.warmup(...)` builds ahead and waits.
"""
from __future__ import annotations

import collections
import sys
import threading
from typing import Optional

import torch

from .. import probe
from .. import reference
from .. import warmup
from ..registry import register
from . import priorities
from ._gpu import HALF, cuda_reasons, dtype_name

_MOD = "flashinfer"
WORKSPACE_BYTES = 128 * 1024 * 1024
MAX_PLANS = 64
HEAD_DIMS = (64, 128, 256)

_lock = threading.Lock()
_workspaces: dict = {}
_plans: collections.OrderedDict = collections.OrderedDict()


class _Local(threading.local):
    dry = False       # a dry run: FlashInfer's builds raise _NeedsBuild instead of compiling
    standin = False   # a stand-in run (dry run or build): own workspace, no cached plans


_local = _Local()


def workspace(device) -> torch.Tensor:
    if _local.standin:        # never share the calls' workspace with a run on another thread
        return torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    ws = _workspaces.get(device)
    if ws is None:
        with _lock:
            ws = _workspaces.setdefault(device, torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8,
                                                            device=device))
    return ws


def fi_mask(sq: int, sk: int, is_causal: bool, window, causal_align: str):
    """(causal, window_left) for FlashInfer's bottom-right masks, or a str saying why not."""
    left, right = window if window is not None else (-1, -1)
    if (is_causal or window is not None) and causal_align == "top_left" and sq != sk:
        return (f"FlashInfer aligns causal masks and windows bottom-right; a top-left one needs "
                f"Sq == Sk (got {sq}, {sk})")
    causal = is_causal or right == 0
    if not causal and right > 0 and right < sk:
        return f"FlashInfer's window has no right bound other than 0 (causal) or none; got {right}"
    if causal and sq > sk:
        return f"FlashInfer's causal mask needs Sq <= Sk (got {sq} > {sk})"
    return causal, left


def _cached(key, make):
    if _local.standin:
        return make()
    w = _plans.get(key)
    if w is not None:
        _plans.move_to_end(key)
        return w
    w = make()
    with _lock:
        _plans[key] = w
        while len(_plans) > MAX_PLANS:
            _plans.popitem(last=False)
    return w


def _pages(b, sk, device):
    """Paged-KV metadata for one page of sk tokens per request: indptr, indices, last_page_len."""
    ar = torch.arange(b + 1, dtype=torch.int32, device=device)
    return ar, ar[:-1].contiguous(), torch.full((b,), sk, dtype=torch.int32, device=device)


def _dims(q, k, v, layout):
    if layout == "bhsd":
        (b, hq, sq, d), (hk, sk), dv = q.shape, k.shape[1:3], v.shape[-1]
    else:
        (b, sq, hq, d), (sk, hk), dv = q.shape, k.shape[1:3], v.shape[-1]
    return b, hq, hk, sq, sk, d, dv


def _custom_mask(q, b, sq, sk, attn_mask, is_causal, window, causal_align):
    """(B, Sq, Sk) bool: the caller's mask with causal/window folded in."""
    allowed = reference.attention_allowed(sq, sk, is_causal=is_causal, window=window,
                                          causal_align=causal_align, device=q.device)
    m = attn_mask if allowed is None else attn_mask & allowed
    if m.dim() == 4:
        if m.shape[1] != 1:
            raise ValueError("FlashInfer takes one mask for all heads; this attn_mask varies per "
                             "head (falling back to another kernel)")
        m = m[:, 0]
    return m.expand(b, sq, sk)


@torch.library.custom_op("layerzero::flashinfer_attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                 causal: bool, window_left: int, scale: Optional[float], softcap: Optional[float],
                 kv_layout: str, decode: bool) -> torch.Tensor:
    """FlashInfer on q (B, Sq, Hq, D) and K/V pages: (B, Sk, Hk, D) "NHD" or (B, Hk, Sk, D)
    "HND"; `mask` (B, Sq, Sk) bool or None; causal/window_left bottom-right. -> (B, Sq, Hq, Dv).
    A custom op, so torch.compile sees one opaque call (plans aren't traceable)."""
    import flashinfer

    b, sq, hq, d = q.shape
    hk, sk = (k.shape[2], k.shape[1]) if kv_layout == "NHD" else (k.shape[1], k.shape[2])
    dv = v.shape[-1]
    kc, vc = k.contiguous(), v.contiguous()
    opts = dict(sm_scale=scale, window_left=window_left, logits_soft_cap=softcap)
    tc = hq // hk >= 4                              # GQA groups >= 4: tensor-core decode
    if decode:
        qt = q[:, 0].contiguous()                                                 # (B, Hq, D)
        if b == 1:
            out = flashinfer.single_decode_with_kv_cache(qt[0], kc[0], vc[0], kv_layout=kv_layout,
                                                         use_tensor_cores=tc, **opts)[None]
        else:
            def make():
                w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace(q.device), kv_layout,
                                                                  use_tensor_cores=tc)
                indptr, indices, last = _pages(b, sk, q.device)
                w.plan(indptr, indices, last, hq, hk, d, sk, pos_encoding_mode="NONE",
                       q_data_type=q.dtype, kv_data_type=k.dtype, **opts)
                return w
            key = ("decode", q.device, b, sk, hq, hk, d, q.dtype, window_left, softcap, scale, kv_layout)
            out = _cached(key, make).run(qt, (kc, vc))
        return out.view(b, 1, hq, dv)
    qt = q.reshape(b * sq, hq, d).contiguous()                                    # (B*Sq, Hq, D)
    # flashinfer 0.7.2's fa3 prefill (its default on sm90) dies with SIGFPE on an "HND" K/V
    # (measured on the H100: single prefill, GQA and MHA; "NHD" and fa2 with "HND" are fine).
    backend = "fa2" if kv_layout == "HND" else "auto"
    if b == 1:
        out = flashinfer.single_prefill_with_kv_cache(
            qt, kc[0], vc[0], custom_mask=None if mask is None else mask[0].contiguous(),
            causal=causal, kv_layout=kv_layout, backend=backend, **opts)
    else:
        def make():
            w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace(q.device), kv_layout,
                                                               backend=backend)
            indptr, indices, last = _pages(b, sk, q.device)
            qo_indptr = torch.arange(b + 1, dtype=torch.int32, device=q.device) * sq
            w.plan(qo_indptr, indptr, indices, last, hq, hk, d, sk, head_dim_vo=dv,
                   custom_mask=None if mask is None else mask.reshape(-1), causal=causal,
                   q_data_type=q.dtype, kv_data_type=k.dtype, **opts)
            return w
        key = ("prefill", q.device, b, sq, sk, hq, hk, d, dv, q.dtype, causal, window_left, softcap,
               scale, kv_layout)
        w = make() if mask is not None else _cached(key, make)     # a mask is planned each call
        out = w.run(qt, (kc, vc))
    return out.view(b, sq, hq, dv)


@attention_op.register_fake
def _(q, k, v, mask, causal, window_left, scale, softcap, kv_layout, decode):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


def _bshd_q(q, layout):
    return q.transpose(1, 2) if layout == "bhsd" else q                           # (B, Sq, Hq, D)


def prefill(q, k, v, attn_mask, is_causal, scale, dropout_p, window, softcap, alibi_slopes, sinks,
            layout, causal_align):
    b, hq, hk, sq, sk, d, dv = _dims(q, k, v, layout)
    mask = None
    if attn_mask is not None:
        mask = _custom_mask(q, b, sq, sk, attn_mask, is_causal, window, causal_align)
        causal, left = False, -1
    else:
        causal, left = fi_mask(sq, sk, is_causal, window, causal_align)
    out = attention_op(_bshd_q(q, layout), k, v, mask, causal, left, scale, softcap,
                       "NHD" if layout == "bshd" else "HND", False)              # (B, Sq, Hq, Dv)
    if mask is not None:
        out = out.masked_fill(~mask.any(-1)[:, :, None, None], 0.0)  # rows with no key: zeros
    return out.transpose(1, 2) if layout == "bhsd" else out


def decode(q, k, v, attn_mask, is_causal, scale, dropout_p, window, softcap, alibi_slopes, sinks,
           layout, causal_align):
    left = window[0] if window is not None else -1
    out = attention_op(_bshd_q(q, layout), k, v, None, False, left, scale, softcap,
                       "NHD" if layout == "bshd" else "HND", True)               # (B, 1, Hq, Dv)
    return out.transpose(1, 2) if layout == "bhsd" else out


def _attn_common(spec, name) -> list[str]:
    r = cuda_reasons(spec, name, min_sm=80, dtypes=HALF)
    if spec.head_dim not in HEAD_DIMS or spec.head_dim_v != spec.head_dim:
        r.append(f"{name} is used with head_dim {', '.join(map(str, HEAD_DIMS))} (q and v equal), "
                 f"got {spec.head_dim}/{spec.head_dim_v}")
    for flag, what in ((spec.alibi, "ALiBi with caller slopes"), (spec.sinks, "attention sinks"),
                       (spec.dropout, "dropout"), (spec.grad, "backward (inputs require grad)")):
        if flag:
            r.append(f"{name} has no {what} here")
    return r


def supports_prefill(spec) -> list[str]:
    r = _attn_common(spec, "flashinfer.prefill")
    if spec.mask == "float":
        r.append("FlashInfer's custom mask is boolean; a float (additive) attn_mask can't be passed")
    elif spec.mask == "none":
        m = fi_mask(spec.seq_len_q, spec.seq_len_k, spec.causal, spec.window, spec.causal_align)
        if isinstance(m, str):
            r.append(m)
    return r or _build_reason("flashinfer.prefill", spec)


def supports_decode(spec) -> list[str]:
    r = _attn_common(spec, "flashinfer.decode")
    if spec.seq_len_q != 1:
        r.append(f"flashinfer.decode takes one query token per request, got Sq={spec.seq_len_q}")
    if spec.mask != "none":
        r.append("flashinfer.decode takes no attn_mask (flashinfer.prefill does)")
    if (spec.causal or spec.window is not None) and spec.causal_align == "top_left" and spec.seq_len_k > 1:
        r.append("FlashInfer aligns causal masks and windows bottom-right; top-left with Sq=1 < Sk "
                 "would see only the first keys")
    return r or _build_reason("flashinfer.decode", spec)


# ---- norms, rope, sampling ----------------------------------------------------------------------

def rms_norm(x, weight, eps, residual, offset):
    import flashinfer

    if residual is not None:
        x = x + residual
    h = x.shape[-1]
    if weight is None:            # no weight: no scale (the offset applies to a weight only)
        w = torch.ones(h, dtype=x.dtype, device=x.device)
    else:                         # offset folded into the weight (Gemma's 1 + w), in fp32 first
        w = (weight.float() + offset).to(x.dtype) if offset else weight.to(x.dtype)
    y = flashinfer.norm.rmsnorm(x.reshape(-1, h).contiguous(), w, eps).view(x.shape)
    return (y, x) if residual is not None else y


def rope(q, k, cos, sin, layout, interleaved):
    import flashinfer

    b, d = q.shape[0], q.shape[-1]
    s = q.shape[2] if layout == "bhsd" else q.shape[1]
    half = cos.shape[-1] // 2

    def first(c):        # one copy of each angle: halves (llama) or even positions (GPT-J)
        c = c if c.dim() == 3 else c.unsqueeze(0)
        c = c.expand(c.shape[0], s, c.shape[-1])
        return (c[..., 0::2] if interleaved else c[..., :half]).reshape(-1, half)
    cache = torch.cat((first(cos), first(sin)), dim=-1).float().contiguous()       # (rows, D_rot)
    per_batch = cos.dim() == 3 and cos.shape[0] > 1
    pos = torch.arange(b * s if per_batch else s, device=q.device)
    pos = pos if per_batch else pos.repeat(b)                                      # (B*S,)

    def tokens(t):       # (B*S, H*D), token-major
        return (t.transpose(1, 2) if layout == "bhsd" else t).reshape(b * s, -1)
    qo, ko = flashinfer.rope.apply_rope_with_cos_sin_cache(pos, tokens(q), tokens(k), d, cache,
                                                          is_neox=not interleaved)
    qo, ko = qo.view(b, s, -1, d), ko.view(b, s, -1, d)                            # (B, S, H, D)
    return (qo.transpose(1, 2), ko.transpose(1, 2)) if layout == "bhsd" else (qo, ko)


def sample(logits, temperature, top_k, top_p, min_p, generator):
    from flashinfer import sampling

    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    probs = torch.softmax(x, dim=-1)
    if top_k is not None and top_k < probs.shape[-1]:
        probs = sampling.top_k_renorm_probs(probs, top_k)
    if top_p is not None and top_p < 1.0:
        probs = sampling.top_p_renorm_probs(probs, top_p)
    if min_p is not None:
        out = sampling.min_p_sampling_from_probs(probs, min_p, generator=generator)
    else:
        out = sampling.sampling_from_probs(probs, generator=generator)
    return out.long()


def supports_rms(spec) -> list[str]:
    r = cuda_reasons(spec, "flashinfer.rms_norm", min_sm=75, dtypes=HALF)
    if spec.grad:
        r.append("flashinfer.rms_norm is forward-only (inputs require grad)")
    return r or _build_reason("flashinfer.rms_norm", spec)


def supports_rope(spec) -> list[str]:
    r = cuda_reasons(spec, "flashinfer.rope", min_sm=75, dtypes=HALF)
    if spec.grad:
        r.append("flashinfer.rope is forward-only (inputs require grad)")
    return r or _build_reason("flashinfer.rope", spec)


def supports_sample(spec) -> list[str]:
    r = cuda_reasons(spec, "flashinfer.sample", min_sm=75,
                     dtypes=(torch.float16, torch.bfloat16, torch.float32))
    if "greedy" in spec.flags:
        r.append("temperature=0 is an argmax; torch's is as fast")
    if not spec.flags & {"top_k", "top_p", "min_p"}:
        r.append("no top-k/top-p/min-p filter: torch.multinomial is as fast")
    return r or _build_reason("flashinfer.sample", spec)


# ---- JIT builds: checked once per variant, built in the background (see layerzero/warmup.py) ----

class _NeedsBuild(BaseException):
    """Raised in a dry run where FlashInfer would compile a module. A BaseException, so that no
    `except Exception` on the way (FlashInfer's own fallbacks) takes it for a kernel error."""


def _on_disk(jit_spec) -> bool:
    """An AOT-shipped module (flashinfer-jit-cache, flashinfer-cubin) or one in the JIT cache."""
    try:
        return bool(getattr(jit_spec, "is_aot", False)) or bool(jit_spec.is_compiled)
    except Exception:
        return False


def _guard_builds() -> bool:
    """Wrap FlashInfer's `JitSpec.build_and_load` (every module it JIT-compiles goes through it;
    once per process) so that in a dry run, on this thread only, a module that is not on disk
    raises _NeedsBuild instead of compiling. False when this FlashInfer has no such method."""
    try:
        from flashinfer.jit import core
        orig = core.JitSpec.build_and_load
    except (ImportError, AttributeError):
        return False
    with _lock:
        orig = core.JitSpec.build_and_load
        if getattr(orig, "_layerzero", False):
            return True

        def build_and_load(self, *args, **kwargs):
            if _local.dry and not _on_disk(self):
                raise _NeedsBuild(getattr(self, "name", "a FlashInfer module"))
            return orig(self, *args, **kwargs)

        build_and_load._layerzero = True
        core.JitSpec.build_and_load = build_and_load
    return True


def _standin_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def _variant(kernel_id: str, spec) -> tuple[tuple, str]:
    """(key, description) of what FlashInfer compiles for the call `spec`: the dtype, head_dim,
    sliding window, softcap, custom mask and backend (k/v layout, one request or a batch,
    tensor-core decode) select its modules; the causal flag is included to be safe."""
    dt = dtype_name(spec.dtype)
    if spec.op != "attention":
        return (kernel_id, spec.sm, spec.dtype), f"FlashInfer's {kernel_id[11:]} module ({dt}) on sm{spec.sm}"
    is_decode = kernel_id == "flashinfer.decode"
    masked = not is_decode and spec.mask == "bool"
    if is_decode or masked:          # decode ignores causal; a mask has causal/window folded in
        causal, left = False, (spec.window[0] if is_decode and spec.window else -1)
    else:
        causal, left = fi_mask(spec.seq_len_q, spec.seq_len_k, spec.causal, spec.window,
                               spec.causal_align)
    tc = is_decode and spec.num_heads // spec.num_kv_heads >= 4
    key = (kernel_id, spec.sm, spec.dtype, spec.head_dim, spec.layout, spec.batch == 1, tc, masked,
           causal, left >= 0, spec.softcap)
    feats = [f for f, on in (("causal", causal), ("sliding window", left >= 0), ("softcap", spec.softcap),
                             ("custom mask", masked), ("tensor-core decode", tc)) if on]
    what = (f"FlashInfer variant {kernel_id[11:]} ({dt}, head_dim {spec.head_dim}"
            + "".join(f", {f}" for f in feats)
            + f", {'one request' if spec.batch == 1 else 'batched'}, "
            f"{'HND' if spec.layout == 'bhsd' else 'NHD'} k/v) on sm{spec.sm}")
    return key, what


def _standin_call(kernel_id: str, spec, device) -> None:
    """Run `kernel_id` once on small tensors that need the same FlashInfer modules as `spec`."""
    g = torch.Generator().manual_seed(0)

    def t(*shape, dtype=spec.dtype):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    if kernel_id == "flashinfer.rms_norm":
        rms_norm(t(2, spec.head_dim), None, 1e-6, None, 0.0)
    elif kernel_id == "flashinfer.rope":
        cos = t(2, spec.head_dim, dtype=torch.float32)          # (S, D): 2 heads, 2 positions
        rope(t(1, 2, 2, spec.head_dim), t(1, 2, 2, spec.head_dim), cos, cos.flip(-1), spec.layout,
             "interleaved" in spec.flags)
    elif kernel_id == "flashinfer.sample":
        sample(t(2, 16), 1.0, 4, 0.9, None, None)
    else:
        is_decode = kernel_id == "flashinfer.decode"
        b, hk = (1 if spec.batch == 1 else 2), 1
        hq = min(spec.num_heads // spec.num_kv_heads, 4)
        sq, sk = (1 if is_decode else 8), 8

        def x(h, s):
            return t(b, h, s, spec.head_dim) if spec.layout == "bhsd" else t(b, s, h, spec.head_dim)
        window = None if spec.window is None else (spec.window[0], 0 if spec.window[1] == 0 else -1)
        mask = torch.ones(sq, sk, dtype=torch.bool, device=device) if spec.mask == "bool" else None
        (decode if is_decode else prefill)(x(hq, sq), x(hk, sk), x(hk, sk), mask, spec.causal,
                                           None, 0.0, window, 30.0 if spec.softcap else None,
                                           None, None, spec.layout, spec.causal_align)


def _dry_run(kernel_id: str, spec, call=None) -> bool:
    """Is the variant built? Its stand-in call (`call`, default `_standin_call`), with builds
    refused (see _guard_builds): loads what is on disk, compiles nothing. Without the guard it
    can't tell: False (build it)."""
    if not _guard_builds():
        return False
    _local.dry = _local.standin = True
    try:
        (call or _standin_call)(kernel_id, spec, _standin_device())
    except _NeedsBuild:
        return False
    finally:
        _local.dry = _local.standin = False
    return True


def _build(kernel_id: str, spec, call=None) -> None:
    """Build the variant (on the background thread): its stand-in call, compiling as it goes."""
    call = call or _standin_call
    device = _standin_device()
    _local.standin = True
    try:
        if device.type == "cuda":
            with torch.cuda.device(device):
                call(kernel_id, spec, device)
                torch.cuda.synchronize(device)
        else:
            call(kernel_id, spec, device)
    finally:
        _local.standin = False


def _build_reason(kernel_id: str, spec, variant=None, call=None) -> list[str]:
    """[] when the call's variant is built, else why not (it may be building; warmup.need).
    Asked only once FlashInfer is imported (the registry imports it when it is available).
    `variant` / `call`: the kernel's (key, description) and stand-in call, default this
    module's (flashinfer_paged passes its own)."""
    if _MOD not in sys.modules:
        return []
    key, what = (variant or _variant)(kernel_id, spec)
    why = warmup.need(kernel_id, spec, key, what, lambda: _dry_run(kernel_id, spec, call),
                      lambda: _build(kernel_id, spec, call))
    return [why] if why else []


# The probe imports the package only: any kernel call could start an nvcc build (minutes on a fresh
# JIT cache) and stall the user's first call on it. Kernels run first in `_dry_run`, on stand-ins.
probe.define(_MOD, """
import flashinfer, flashinfer.norm
""", ("flashinfer-python", "flashinfer-cubin", "flashinfer-jit-cache"))

register("attention", "flashinfer.prefill", prefill,
         priority=priorities.attention("flashinfer.prefill", 46), supports=supports_prefill,
         requires=(_MOD,))
register("attention", "flashinfer.decode", decode,
         priority=priorities.attention("flashinfer.decode", 50), supports=supports_decode,
         requires=(_MOD,))
# H100, bf16 (benchmarks/kernels_micro.py, RESULTS.md): from ~8M elements FlashInfer's norm is the
# fastest kernel with a cheap launch (8192x4096: 46.6 us against torch's fused 66.0; 110592x128,
# Flux's q/k norm: 21.0 against 72.5); below, torch's launch cost wins (2048x2048: 15.3 vs 32.7).
# With a residual our Triton kernel fuses the add (FlashInfer's fused form works in place).
register("rms_norm", "flashinfer.rms_norm", rms_norm,
         priority=priorities.by_size(62, 40, min_elems=1 << 23, residual=55),
         supports=supports_rms, requires=(_MOD,))
register("rope", "flashinfer.rope", rope, priority=priorities.gpu_only(50), supports=supports_rope,
         requires=(_MOD,))
register("sample", "flashinfer.sample", sample, priority=priorities.gpu_only(60),
         supports=supports_sample, requires=(_MOD,))
