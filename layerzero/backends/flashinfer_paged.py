"""FlashInfer's paged-KV kernels as kernels of `lz.paged_attention`: `flashinfer.paged_decode`
(one query per row) and `flashinfer.paged_prefill` (Sq > 1: chunked prefill, speculative verify).

No K/V is copied: lz.paged_attention's pages (num_pages, page_size, Hkv, D) are FlashInfer's
"NHD" paged cache, passed as paged_kv_cache=(k_pages, v_pages), and the page table and lengths
become FlashInfer's CSR form (`layerzero.paged.meta.csr`): indptr (B+1,) = cumsum of the rows'
page counts, indices = the table's used entries row by row, last_page_len = keys in each row's
last page (0 for a row holding none).

    decode   BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=Hq/Hkv >= 4)
               .plan(indptr, indices, last_page_len, Hq, Hkv, D, page_size, window_left=,
                     logits_soft_cap=, sm_scale=, q_data_type=, kv_data_type=)
               .run(q (B, Hq, D), (k_pages, v_pages))
    prefill  BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend=PREFILL_BACKEND)
               .plan(qo_indptr=arange(B+1)*Sq, indptr, indices, last_page_len, Hq, Hkv, D,
                     page_size, head_dim_vo=Dv, causal=, window_left=, logits_soft_cap=, ...)
               .run(q (B*Sq, Hq, D), (k_pages, v_pages))

Semantics. FlashInfer aligns causal masks and windows bottom-right per request: query i of row b
sits at key kv_len - qo_len + i = seq_lens[b] - Sq + i, lz.paged_attention's own position, and
`window_left` keeps keys j >= position - left. Its only right bounds are the causal one and none,
so window (left, right) runs with right -1, with right 0 (causal), or with any right under
is_causal (the causal bound is the tighter); a non-causal window with right > 0 is refused. Decode
has no causal flag: a row's one query sits at its last key and sees every key up to it either
way. Queries attending no key (a row holding none; under causal, a query at a negative position,
i.e. a left-padded row with fewer keys than Sq) are zeros in lz.paged_attention, while what
FlashInfer writes for kv_len = 0 or qo_len > kv_len is not specified: those rows are overwritten
with torch.where on a device-side test made with the plan (no host sync; NaN there can't leak).
(FlashInfer writes its causal and window masks additively, `kv_idx + qo_len > kv_len + q_idx`,
so qo_len > kv_len doesn't wrap its unsigned indices there; the tile counts around them are
unchecked.) Prefill uses the fa2 backend, not "auto" (fa3 on sm90): the conservative choice
until fa3 is measured on paged, left-padded batches (flashinfer.py met a SIGFPE in fa3 with HND).
No sinks: FlashInfer's fa2/fa3 paged kernels take none (its wrappers hand `sinks` to the
trtllm-gen and cute-dsl backends only). Forward only. Head dims 64/128/256, q and v equal.

Plans: once per step, reused across layers. A plan depends on the values of page_table and
seq_lens, which a lz.PagedKVCache updates in place before each step (fixed-capacity tensors); the
layers of a step all pass the same two tensors. One wrapper is kept per geometry (kind, device,
dtypes, heads, head dims, page size, causal, window, softcap, scale, the table's storage), in an
LRU sharing flashinfer.py's workspace, and re-planned whenever the metadata differs from what it
was planned for: the two tensors' identity (the same objects, held by weak references),
data_ptr, shape, strides, dtype and `_version`, autograd's counter that every in-place torch
write through the tensor or any view of its storage bumps, plus B and Sq. Writes that counter
misses (through `.data`, raw pointers in a custom kernel, CUDA-graph replays) would leave a
stale plan: write the metadata with ordinary in-place torch ops. Inference tensors
(torch.inference_mode) have no counter and are re-planned on every call.

plan() reads the metadata on the host (csr's used-entry count, a range check that keeps
FlashInfer from reading out of bounds, FlashInfer's own indptr copy): a few syncs per step, and
not CUDA-graph capturable as written: calls traced by torch.compile (the steps lz.generate
captures) are refused, and an eager call under capture raises (the next kernel runs it).
Graphing it would take FlashInfer's `use_cuda_graph=True` wrappers, built on fixed-capacity
indptr / indices / last_page_len buffers: plan() outside the graph before each replay writes
into them and the captured run() reads them (not done here).

JIT: each variant (dtype, head_dim, window, softcap, tensor-core decode, causal) is checked and
built in the background through `warmup.need`, as in flashinfer.py (see there).
"""
from __future__ import annotations

import collections
import contextlib
import threading
import weakref
from typing import Optional

import torch

from ..paged.meta import csr
from ..registry import register
from . import flashinfer as fib
from . import priorities
from ._gpu import HALF, cuda_reasons, dtype_name, eager

# On CUDA: above triton.paged_attention (~60) and the reference (0). Decode first: its split-KV
# kernel is FlashInfer's fastest path for one query per row.
PRIORITY_DECODE = 70
PRIORITY_PREFILL = 65
PREFILL_BACKEND = "fa2"
MAX_WRAPPERS = 16      # each holds FlashInfer's 8 MiB int workspace (+ as much pinned host memory)

_lock = threading.RLock()     # plan + run of a shared wrapper, one thread at a time
_plans: collections.OrderedDict = collections.OrderedDict()   # geometry -> _Planned


class _Planned:
    """A FlashInfer wrapper and the step it is planned for: `step` (see _step), weak references
    to the metadata tensors, `valid` (B, Sq) bool (queries that attend a key), `empty` (no key
    in the whole batch: nothing planned, the output is zeros)."""
    __slots__ = ("wrapper", "step", "refs", "valid", "empty")

    def __init__(self, wrapper):
        self.wrapper, self.step, self.refs, self.valid, self.empty = wrapper, None, (), None, False

    def planned_for(self, step, tensors) -> bool:
        return step is not None and step == self.step and all(
            r() is t for r, t in zip(self.refs, tensors))


def _stamp(t: torch.Tensor):
    """What identifies a metadata tensor's values without reading them; None for an inference
    tensor, which has no version counter."""
    if t.is_inference():
        return None
    return (id(t), t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.dtype)


def _step(page_table, seq_lens, b: int, sq: int):
    a, c = _stamp(page_table), _stamp(seq_lens)
    return None if a is None or c is None else (a, c, b, sq)


def _wrapper(geometry, make) -> _Planned:
    if fib._local.standin:          # a JIT dry run or build: its own wrapper, nothing cached
        return _Planned(make())
    p = _plans.get(geometry)
    if p is None:
        p = _plans[geometry] = _Planned(make())
        while len(_plans) > MAX_WRAPPERS:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(geometry)
    return p


def _check_values(indices, seq_lens, num_pages: int, width: int, page_size: int) -> None:
    """Metadata FlashInfer would read out of bounds with raises here (one sync, per plan): the
    caller keeps the values in range (a lz.PagedKVCache does), but a GPU fault can't be undone."""
    vals = [seq_lens.amin(), seq_lens.amax()]
    if indices.numel():
        vals += [indices.amin(), indices.amax()]
    lo, hi, *ids = torch.stack([v.long() for v in vals]).tolist()
    cap = width * page_size
    if lo < 0 or hi > cap:
        raise ValueError(f"seq_lens holds {lo}..{hi}; allowed: 0..{cap} (page_table's {width} pages "
                         f"x page_size {page_size})")
    if ids and (ids[0] < 0 or ids[1] >= num_pages):
        raise ValueError(f"page_table names pages {ids[0]}..{ids[1]} where rows hold keys; allowed "
                         f"page ids: 0..{num_pages - 1}")


def _plan(p: _Planned, q, k_pages, dv, page_table, seq_lens, sq, decode, causal, left, scale, softcap):
    """Plan `p` for this step's metadata; q (B*Sq, Hq, D)."""
    b, hq, d = q.shape[0] // sq, q.shape[1], q.shape[2]
    ps, hk = k_pages.shape[1], k_pages.shape[2]
    indptr, indices, last = csr(page_table, seq_lens, ps)
    _check_values(indices, seq_lens, k_pages.shape[0], page_table.shape[1], ps)
    lens = seq_lens.view(-1, 1).long()
    pos = lens - sq + torch.arange(sq, device=q.device).view(1, -1)       # (B, Sq) key positions
    p.valid = pos >= 0 if causal or decode else (lens > 0).expand(b, sq)
    p.empty = indices.numel() == 0
    if p.empty:
        return
    opts = dict(window_left=left, logits_soft_cap=softcap, sm_scale=scale, q_data_type=q.dtype,
                kv_data_type=k_pages.dtype)
    if decode:
        p.wrapper.plan(indptr, indices, last, hq, hk, d, ps, pos_encoding_mode="NONE", **opts)
    else:
        qo_indptr = torch.arange(b + 1, dtype=torch.int32, device=q.device) * sq
        p.wrapper.plan(qo_indptr, indptr, indices, last, hq, hk, d, ps, head_dim_vo=dv,
                       causal=causal, **opts)


def paged_impl(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, page_table: torch.Tensor,
               seq_lens: torch.Tensor, decode: bool, causal: bool, window_left: int,
               scale: Optional[float], softcap: Optional[float]) -> torch.Tensor:
    """q (B, Sq, Hq, D), pages (num_pages, page_size, Hkv, D[v]) NHD -> (B, Sq, Hq, Dv); causal and
    window_left bottom-right (FlashInfer's); queries that attend no key give zeros."""
    import flashinfer

    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("flashinfer.paged_*: plan() reads the page metadata on the host, which "
                           "CUDA-graph capture forbids (FlashInfer's use_cuda_graph wrappers would "
                           "be needed); another kernel runs this call")
    b, sq, hq, d = q.shape
    dv = v_pages.shape[3]
    if not (k_pages.is_contiguous() and v_pages.is_contiguous()):
        k_pages, v_pages = k_pages.contiguous(), v_pages.contiguous()
    tc = decode and hq // k_pages.shape[2] >= 4          # GQA groups >= 4: tensor-core decode
    geometry = ("decode" if decode else "prefill", q.device, q.dtype, k_pages.dtype, hq,
                k_pages.shape[2], d, dv, k_pages.shape[1], causal, window_left, softcap, scale, tc,
                page_table.data_ptr())

    def make():
        ws = fib.workspace(q.device)
        if decode:
            return flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tc)
        return flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend=PREFILL_BACKEND)
    qt = q.reshape(b * sq, hq, d).contiguous()                                    # (B*Sq, Hq, D)
    # A shared wrapper is planned and run under the lock; a stand-in run's wrapper is its own, and
    # a background build compiles in its plan() for minutes: it must not hold up other calls.
    with contextlib.nullcontext() if fib._local.standin else _lock:
        p = _wrapper(geometry, make)
        step = _step(page_table, seq_lens, b, sq)
        if not p.planned_for(step, (page_table, seq_lens)):
            p.step, p.refs = None, ()
            _plan(p, qt, k_pages, dv, page_table, seq_lens, sq, decode, causal, window_left, scale, softcap)
            p.step, p.refs = step, (weakref.ref(page_table), weakref.ref(seq_lens))
        valid = p.valid
        if p.empty:
            return q.new_zeros(b, sq, hq, dv)
        out = p.wrapper.run(qt, (k_pages, v_pages)).view(b, sq, hq, dv)
    return torch.where(valid.view(b, sq, 1, 1), out, out.new_zeros(()))


# What torch.compile traces: one opaque call (plans aren't traceable); eager calls skip the
# custom op's dispatcher round trip.
paged_op = torch.library.custom_op("layerzero::flashinfer_paged_attention", paged_impl, mutates_args=())


@paged_op.register_fake
def _(q, k_pages, v_pages, page_table, seq_lens, decode, causal, window_left, scale, softcap):
    return q.new_empty(q.shape[:-1] + (v_pages.shape[-1],))


def _call(q, k_pages, v_pages, page_table, seq_lens, layout, decode, causal, window, scale, softcap):
    qb = q.transpose(1, 2) if layout == "bhsd" else q                             # (B, Sq, Hq, D)
    left = -1 if window is None else window[0]
    run = paged_impl if eager(qb) else paged_op
    out = run(qb, k_pages, v_pages, page_table, seq_lens, decode, causal, left, scale, softcap)
    return out.transpose(1, 2) if layout == "bhsd" else out


def paged_decode(q, k_pages, v_pages, page_table, seq_lens, scale, is_causal, window, softcap, sinks,
                 layout):
    return _call(q, k_pages, v_pages, page_table, seq_lens, layout, True, False, window, scale, softcap)


def paged_prefill(q, k_pages, v_pages, page_table, seq_lens, scale, is_causal, window, softcap, sinks,
                  layout):
    causal = is_causal or (window is not None and window[1] == 0)
    return _call(q, k_pages, v_pages, page_table, seq_lens, layout, False, causal, window, scale, softcap)


# ---- what runs: reasons, JIT variants -----------------------------------------------------------

def _common(spec, name: str) -> list[str]:
    r = cuda_reasons(spec, name, min_sm=80, dtypes=HALF)
    if spec.head_dim not in fib.HEAD_DIMS or spec.head_dim_v != spec.head_dim:
        r.append(f"{name} is used with head_dim {', '.join(map(str, fib.HEAD_DIMS))} (q and v "
                 f"equal), got {spec.head_dim}/{spec.head_dim_v}")
    if spec.sinks:
        r.append(f"{name}: FlashInfer's fa2/fa3 paged kernels take no attention sinks (its wrappers "
                 f"pass `sinks` to the trtllm-gen and cute-dsl backends only)")
    if spec.grad:
        r.append(f"{name} is forward-only (inputs require grad)")
    if "traced" in spec.flags:      # compiled steps are what lz.generate captures in CUDA graphs
        r.append(f"{name} plans on the host each step (syncs), which a traced step captured in a "
                 f"CUDA graph can't hold: eager calls only")
    return r


def supports_decode(spec) -> list[str]:
    r = _common(spec, "flashinfer.paged_decode")
    if spec.seq_len_q != 1:
        r.append(f"flashinfer.paged_decode takes one query per row, got Sq={spec.seq_len_q} "
                 f"(flashinfer.paged_prefill takes more)")
    return r or _build_reason("flashinfer.paged_decode", spec)


def supports_prefill(spec) -> list[str]:
    r = _common(spec, "flashinfer.paged_prefill")
    if spec.window is not None and not spec.causal and spec.window[1] > 0:
        r.append(f"FlashInfer's window has no right bound other than 0 (causal) or none; got "
                 f"window={spec.window} without is_causal")
    return r or _build_reason("flashinfer.paged_prefill", spec)


def _variant(kernel_id: str, spec) -> tuple[tuple, str]:
    """(key, description) of what FlashInfer compiles for `spec`: dtype, head_dim, sliding window,
    softcap, tensor-core decode select its modules (page size is a runtime value); causal is
    included to be safe."""
    decode = kernel_id == "flashinfer.paged_decode"
    causal = not decode and (spec.causal or (spec.window is not None and spec.window[1] == 0))
    window = spec.window is not None and spec.window[0] >= 0
    tc = decode and spec.num_heads // spec.num_kv_heads >= 4
    key = (kernel_id, spec.sm, spec.dtype, spec.head_dim, tc, causal, window, spec.softcap)
    feats = [f for f, on in (("causal", causal), ("sliding window", window), ("softcap", spec.softcap),
                             ("tensor-core decode", tc)) if on]
    what = (f"FlashInfer variant {kernel_id[11:]} ({dtype_name(spec.dtype)}, head_dim "
            f"{spec.head_dim}{''.join(', ' + f for f in feats)}, NHD pages) on sm{spec.sm}")
    return key, what


def _standin_call(kernel_id: str, spec, device) -> None:
    """Run `kernel_id` once on small tensors that need the same FlashInfer modules as `spec`:
    two rows over six pages, every query attending a key."""
    g = torch.Generator().manual_seed(0)
    decode = kernel_id == "flashinfer.paged_decode"
    hq, ps, d = min(spec.num_heads // spec.num_kv_heads, 4), min(spec.page_size, 16), spec.head_dim
    sq = 1 if decode else 3

    def t(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=spec.dtype)
    table = torch.arange(6, dtype=torch.int32, device=device).view(2, 3)
    lens = torch.tensor([2 * ps + 1, ps + 2], dtype=torch.int32, device=device)
    (paged_decode if decode else paged_prefill)(
        t(2, sq, hq, d), t(6, ps, 1, d), t(6, ps, 1, d), table, lens, None, spec.causal, spec.window,
        30.0 if spec.softcap else None, None, "bshd")


def _build_reason(kernel_id: str, spec) -> list[str]:
    """[] when the call's variant is built, else why not: flashinfer.py's check (warmup.need,
    a dry run of the stand-in call, a background build) with this module's variant and call."""
    return fib._build_reason(kernel_id, spec, _variant, _standin_call)


register("paged_attention", "flashinfer.paged_decode", paged_decode,
         priority=priorities.gpu_only(PRIORITY_DECODE), supports=supports_decode, requires=(fib._MOD,))
register("paged_attention", "flashinfer.paged_prefill", paged_prefill,
         priority=priorities.gpu_only(PRIORITY_PREFILL), supports=supports_prefill, requires=(fib._MOD,))
