"""LayerZero's own paged-attention kernel (`triton.paged_attention`; imported on first use: it
imports triton). Semantics are `layerzero.reference.paged_attention`'s; see `lz.paged_attention`.

Split-KV ("flash-decoding"), two launches:

1. `_split_kernel`, grid (B * Hkv, S, m_blocks). A program takes one row b, one kv head h, one
   key split and one block of BLOCK_M query rows. Its rows are the G = Hq / Hkv query heads of h
   times the Sq queries, row r = i * G + g (query i, head h * G + g), so GQA reads each K/V tile
   once for all G heads, and a block spans consecutive query positions (its causal end is
   tight). BLOCK_M is G * Sq rounded up to a power of 2, at least 16 (tl.dot's minimum), at
   most _MAX_BLOCK_M (more rows: more m-blocks, each streaming the keys again).
   It streams keys in tiles of BLOCK_N tokens: token t's page is page_table[b, t // page_size]
   (one gathered load per token, so BLOCK_N does not depend on page_size and any page size
   works), its K/V rows are read at that page's slot t % page_size. Scores come from tl.dot in
   fp32, masked, then an online softmax in base 2; P (in V's dtype) @ V with tl.dot.
2. `_merge_kernel`, grid (B * Hkv, m_blocks): combines the S partial results (normalised
   outputs and log-sum-exps, fp32) in split order, so the result is deterministic, adds the
   sinks to the denominator and writes the output in q's layout and dtype. With S = 1 the split
   kernel writes the output itself and there is no merge.

The number of splits S is a pure function of shapes (`num_splits`: B, Hkv, m_blocks, the table's
capacity and the SM count), so nothing is read on the host and the call can be captured in a
CUDA graph. The split boundaries come from device data instead: each program reads its row's
length, derives the key range its rows can attend at all ([lo, hi): below the length; up to the
block's last position under causal / a right window; from the first position minus the left
window), and takes its S-th share of it, rounded up to whole tiles. A program whose share is
empty skips the loop and writes an empty partial (lse = -inf, zeros). Short rows therefore use
few splits and long rows all of them, with one compiled kernel and one grid.

Masks: a key j is attended by row r when lo <= j < hi of the program's share and, per row,
j <= pos (causal), pos - left <= j (left >= 0), j <= pos + right (right >= 0), pos = len - Sq + i.
Masked scores are -inf; the running max uses 0 in place of -inf (so exp2(-inf - -inf) never
makes NaN), and an output whose denominator is 0 (no key to attend: left padding, an empty row)
is 0. K and V are loaded with other=0 past the share, so stale or NaN slots never reach P @ V.

Tiles (the constants below; not measured on a GPU yet: benchmarks/paged_attention.py --sweep
times the alternatives). BLOCK_N: a K (and V) tile of _TILE_BYTES, 64 keys at d128 in bf16;
head dims padded to a power of 2 (any D, Dv <= 256). 4 warps (8 from BLOCK_M * D = _WIDE_TILE).
Decode at the goal shape (64 x 4096, 32/8 heads, d128 bf16, H100's 132 SMs): 3 splits, grid
(512, 3, 1), BLOCK_M 16 (G = 4 rows used), 91 registers and 72 KiB of shared memory per program
for sm90 (compiled without a GPU), so 3 programs per SM. Page offsets are 32-bit unless a pool
reaches 2**31 elements.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_launch import Launch

LOG2E = 1.4426950408889634
MAX_SQ = 64            # queries per row (decode, speculative verify, small chunks)
MAX_HEAD_DIM = 256
_MAX_BLOCK_M = 64      # query rows (G * Sq) per program; more rows: more m-blocks
_TILE_BYTES = 16384    # one K (and one V) tile: BLOCK_N = 64 keys at d128 in bf16, 32 in fp32
_WAVES = 8             # programs wanted per SM (splits go up to B * Hkv * m_blocks * S >= this)
_MIN_SPLIT_KEYS = 128  # no split gets less than this share of the table's capacity
_MAX_SPLITS = 128
_NUM_WARPS = 4
_WIDE_TILE = 8192     # BLOCK_M * head_dim from which a program has 8 warps
# Triton's pipeliner puts the page-id load, the K/V loads and the dots in successive stages;
# 5 stages is what gives K and V two buffers (tile i+1 loads while tile i is computed: sm90
# TTGIR, 72 KiB of shared memory at BLOCK_N 64, d128 bf16); 3 gives one buffer, no overlap.
# GPUs with ~100 KiB of shared memory per SM (sm86/89/120) keep 3.
_NUM_STAGES = 5
_NUM_STAGES_SMALL_SMEM = 3
_BIG_SMEM = (80, 90, 100, 103)
_CPU_SMS = 8           # the interpreter's stand-in for the SM count
_FAR = 1 << 30         # window sides clamped to this (wider than any row)
_OFF32_LIMIT = 1 << 31  # page pools reaching this many elements get 64-bit offsets


def _pow2(n):
    return 1 << (max(n, 1) - 1).bit_length()


@triton.jit(do_not_specialize=["HKV", "S", "left", "right"])
def _split_kernel(Q, K, V, PT, LENS, SINKS, OUT, PO, PL,
                  q_b, q_h, q_s, q_d, k_n, k_p, k_h, k_d, v_n, v_p, v_h, v_d, pt_b, pt_p,
                  o_b, o_h, o_s, o_d, lens_s, sinks_s, HKV, S, qk_scale, cap, left, right,
                  SQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                  PAGE: tl.constexpr, MP: tl.constexpr, CAUSAL: tl.constexpr,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                  HAS_SINKS: tl.constexpr, DIRECT: tl.constexpr, PREC: tl.constexpr,
                  DOT_F32: tl.constexpr, OFF64: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """(row b, kv head h) = program_id(0), key split = program_id(1), block of query rows =
    program_id(2). Writes an fp32 partial at [bh, split, row] (PO: the output normalised by its
    own sum, PL: its base-2 log-sum-exp), or with DIRECT (one split) the output itself to OUT.
    qk_scale: scale * log2(e), or scale / softcap with SOFTCAP (cap = softcap * log2(e))."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    mb = tl.program_id(2)
    b = (bh // HKV).to(tl.int64)                        # offsets past 2**31 elements
    h = bh % HKV
    length = tl.load(LENS + b * lens_s).to(tl.int32)
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)         # row r = query i * G + head g
    row_ok = rows < SQ * G
    qi = rows // G
    head = h * G + rows % G
    pos = length - SQ + qi                              # each row's query position
    # [lo, hi): the keys any row of this block may attend; this split takes its share
    first = length - SQ + (mb * BLOCK_M) // G
    last = length - SQ + (tl.minimum(mb * BLOCK_M + BLOCK_M, SQ * G) - 1) // G
    hi = length
    if CAUSAL:
        hi = tl.minimum(hi, last + 1)
    if HAS_RIGHT:
        hi = tl.minimum(hi, last + right + 1)
    lo = 0
    if HAS_LEFT:
        lo = tl.maximum(first - left, 0)
    share = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), S), BLOCK_N) * BLOCK_N
    start = lo + split * share
    end = tl.minimum(start + share, hi)

    dk = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * q_b + head[:, None].to(tl.int64) * q_h + qi[:, None] * q_s + dk[None, :] * q_d,
                mask=row_ok[:, None] & (dk[None, :] < D), other=0.0)
    if DOT_F32:             # Triton's CPU interpreter multiplies bf16 tiles wrongly (triton 3.9)
        q = q.to(tl.float32)
    k_base = K + h.to(tl.int64) * k_h
    v_base = V + h.to(tl.int64) * v_h
    pt_row = PT + b * pt_b
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)                  # key positions of this tile
        ok = t < end
        page = tl.load(pt_row + (t // PAGE) * pt_p, mask=ok, other=0)
        slot = t % PAGE
        if OFF64:                                       # page offsets past 2**31 elements
            page, slot = page.to(tl.int64), slot.to(tl.int64)
        else:                                           # fewer registers (156 -> 91 at d128)
            page = page.to(tl.int32)
        k = tl.load(k_base + page[:, None] * k_n + slot[:, None] * k_p + dk[None, :] * k_d,
                    mask=ok[:, None] & (dk[None, :] < D), other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale     # (BLOCK_M, BLOCK_N)
        if SOFTCAP:                                     # cap * tanh(x), tanh(x) = 1 - 2 / (e^2x + 1)
            s = cap * (1.0 - 2.0 / (tl.exp(2.0 * s) + 1.0))
        keep = ok[None, :]
        if CAUSAL:
            keep = keep & (t[None, :] <= pos[:, None])
        if HAS_LEFT:
            keep = keep & (t[None, :] >= pos[:, None] - left)
        if HAS_RIGHT:
            keep = keep & (t[None, :] <= pos[:, None] + right)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)        # no -inf - -inf
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + page[:, None] * v_n + slot[:, None] * v_p + dv[None, :] * v_d,
                    mask=ok[:, None] & (dv[None, :] < DV), other=0.0)
        p = p.to(v.dtype)                               # P @ V in V's dtype, as flash-attn
        if DOT_F32:
            p, v = p.to(tl.float32), v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PREC)
        m_i = m_new
    out_mask = row_ok[:, None] & (dv[None, :] < DV)
    if DIRECT:
        _finish(acc, m_i, l_i, SINKS, OUT, b, head, qi, row_ok, out_mask, dv, o_b, o_h, o_s, o_d,
                sinks_s, HAS_SINKS)
    else:
        idx = (bh.to(tl.int64) * S + split) * MP + rows
        tl.store(PO + idx[:, None] * DV + dv[None, :], acc / tl.where(l_i > 0, l_i, 1.0)[:, None],
                 mask=out_mask)
        lse = m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))
        tl.store(PL + idx, tl.where(l_i > 0, lse, float("-inf")), mask=row_ok)


@triton.jit
def _finish(acc, m_i, l_i, SINKS, OUT, b, head, qi, row_ok, out_mask, dv, o_b, o_h, o_s, o_d,
            sinks_s, HAS_SINKS: tl.constexpr):
    """OUT = acc / (l_i + exp2(sink - m_i)) (base 2, acc and l_i relative to the running max
    m_i); 0 where the denominator is 0 (no key, no sink)."""
    if HAS_SINKS:
        sink = tl.load(SINKS + head * sinks_s, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        m_f = tl.maximum(m_i, sink)
        m_f = tl.where(m_f == float("-inf"), 0.0, m_f)
        alpha = tl.exp2(m_i - m_f)
        acc = acc * alpha[:, None]
        l_i = l_i * alpha + tl.exp2(sink - m_f)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(OUT + b * o_b + head[:, None].to(tl.int64) * o_h + qi[:, None] * o_s + dv[None, :] * o_d,
             o.to(OUT.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["HKV", "S"])
def _merge_kernel(PO, PL, SINKS, OUT, o_b, o_h, o_s, o_d, sinks_s, HKV, S,
                  SQ: tl.constexpr, G: tl.constexpr, DV: tl.constexpr, MP: tl.constexpr,
                  HAS_SINKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """(row b, kv head h) = program_id(0), block of query rows = program_id(1): the S partials
    combined in split order (deterministic), the sinks added, the output written."""
    bh = tl.program_id(0)
    mb = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    h = bh % HKV
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < SQ * G
    qi = rows // G
    head = h * G + rows % G
    dv = tl.arange(0, BLOCK_DV)
    out_mask = row_ok[:, None] & (dv[None, :] < DV)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    base = bh.to(tl.int64) * S * MP + rows
    for s in range(0, S):
        idx = base + s * MP
        lse = tl.load(PL + idx, mask=row_ok, other=float("-inf"))
        o = tl.load(PO + idx[:, None] * DV + dv[None, :], mask=out_mask, other=0.0)
        m_new = tl.maximum(m_i, lse)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        w = tl.exp2(lse - m_use)
        acc = acc * alpha[:, None] + w[:, None] * o
        l_i = l_i * alpha + w
        m_i = m_new
    _finish(acc, m_i, l_i, SINKS, OUT, b, head, qi, row_ok, out_mask, dv, o_b, o_h, o_s, o_d,
            sinks_s, HAS_SINKS)


_split_launch, _merge_launch = Launch(_split_kernel, tensors=9), Launch(_merge_kernel, tensors=4)


def num_splits(programs: int, capacity: int, sms: int) -> int:
    """Key splits per (row, kv head, query block), from shapes only (never from the lengths,
    which are device data): enough for `_WAVES` programs per SM over the `programs` =
    B * Hkv * m_blocks work items, at most one per `_MIN_SPLIT_KEYS` keys of the table's
    `capacity` (max_pages * page_size) and at most `_MAX_SPLITS`."""
    want = -(-sms * _WAVES // programs)
    return max(1, min(want, capacity // _MIN_SPLIT_KEYS, _MAX_SPLITS))


_devices: dict = {}


def _device(device: torch.device) -> tuple[int, int]:
    """(SM count, compute capability x10) of a CUDA device; the interpreter's stand-ins on CPU."""
    if device.type != "cuda":
        return _CPU_SMS, 90
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _devices:
        p = torch.cuda.get_device_properties(i)
        _devices[i] = (p.multi_processor_count, p.major * 10 + p.minor)
    return _devices[i]


def _extent(t) -> int:
    """1 + the largest element offset of a tensor view (its strides' reach)."""
    return 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))


def _bhsd(t, bshd):
    """(batch, head, seq, feature) strides of q or the output in either layout."""
    s = t.stride()
    return (s[0], s[2], s[1], s[3]) if bshd else s


_PLANS_MAX = 256
_plans: dict = {}


def _plan(q, k_pages, v_pages, page_table, seq_lens, sinks, scale, is_causal, left, right, softcap, layout):
    """The launch plan of a call (from shapes, strides and the non-tensor arguments only):
    (output shape, partial shapes or None, split grid, split ints, split meta, merge grid,
    merge ints, merge meta)."""
    bshd = layout == "bshd"
    b, sq, hq, d = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]) if bshd else \
        (q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    _, page, hkv, _ = k_pages.shape
    dv = v_pages.shape[3]
    g = hq // hkv
    rows = g * sq
    block_m = min(max(16, _pow2(rows)), _MAX_BLOCK_M)
    m_blocks = -(-rows // block_m)
    mp = m_blocks * block_m
    block_d, block_dv = max(16, _pow2(d)), max(16, _pow2(dv))
    block_n = max(16, min(128, _TILE_BYTES // (max(block_d, block_dv) * q.element_size())))
    sms, sm = _device(q.device)
    dot_f32 = q.dtype == torch.bfloat16 and q.device.type != "cuda"     # the interpreter
    splits = num_splits(b * hkv * m_blocks, page_table.shape[1] * page, sms)
    out_shape = (b, sq, hq, dv) if bshd else (b, hq, sq, dv)
    out_strides = torch.empty(out_shape, device="meta").stride()
    o_st = (out_strides[0], out_strides[2], out_strides[1], out_strides[3]) if bshd else out_strides
    if softcap:
        qk_scale, cap = scale / softcap, softcap * LOG2E
    else:
        qk_scale, cap = scale * LOG2E, 0.0
    has_sinks = sinks is not None
    sinks_s = sinks.stride(0) if has_sinks else 0
    ints = (*_bhsd(q, bshd), *k_pages.stride(), *v_pages.stride(), *page_table.stride(), *o_st,
            seq_lens.stride(0), sinks_s, hkv, splits, qk_scale, cap, left, right)
    warps = 8 if block_m * max(block_d, block_dv) >= _WIDE_TILE else _NUM_WARPS
    meta = dict(SQ=sq, G=g, D=d, DV=dv, PAGE=page, MP=mp, CAUSAL=bool(is_causal), HAS_LEFT=left >= 0,
                HAS_RIGHT=right >= 0, SOFTCAP=bool(softcap), HAS_SINKS=has_sinks, DIRECT=splits == 1,
                PREC="ieee" if q.dtype == torch.float32 or dot_f32 else "tf32", DOT_F32=dot_f32,
                OFF64=max(_extent(k_pages), _extent(v_pages)) >= _OFF32_LIMIT,
                BLOCK_M=block_m,
                BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, num_warps=warps,
                num_stages=_NUM_STAGES if sm in _BIG_SMEM else _NUM_STAGES_SMALL_SMEM)
    if splits == 1:
        return out_shape, None, (b * hkv, 1, m_blocks), ints, meta, None, None, None
    part = ((b * hkv, splits, mp, dv), (b * hkv, splits, mp))
    mmeta = dict(SQ=sq, G=g, DV=dv, MP=mp, HAS_SINKS=has_sinks, BLOCK_M=block_m,
                 BLOCK_DV=block_dv, num_warps=4)
    return out_shape, part, (b * hkv, splits, m_blocks), ints, meta, (b * hkv, m_blocks), \
        (*o_st, sinks_s, hkv, splits), mmeta


def paged_attention(q, k_pages, v_pages, page_table, seq_lens, scale, is_causal, left, right,
                    softcap, sinks, layout):
    """lz.paged_attention with scale resolved (a float), window as (left, right) (-1 =
    unbounded) and softcap 0.0 for none. No host read of page_table or seq_lens: safe to
    capture in a CUDA graph."""
    left, right = min(left, _FAR), min(right, _FAR)       # no int32 overflow at position + right
    static = (q.shape, q.stride(), k_pages.shape, k_pages.stride(), v_pages.shape, v_pages.stride(),
              page_table.shape, page_table.stride(), seq_lens.stride(), q.device, q.dtype, scale,
              is_causal, left, right, softcap, None if sinks is None else sinks.stride(), layout)
    plan = _plans.get(static)
    if plan is None:
        if len(_plans) >= _PLANS_MAX:
            _plans.clear()
        plan = _plans[static] = _plan(q, k_pages, v_pages, page_table, seq_lens, sinks, scale,
                                      is_causal, left, right, softcap, layout)
    out_shape, part, grid, ints, meta, mgrid, mints, mmeta = plan
    out = torch.empty(out_shape, dtype=q.dtype, device=q.device)
    sk = q if sinks is None else sinks
    if part is None:
        _split_launch(grid, (q, k_pages, v_pages, page_table, seq_lens, sk, out, out, out, *ints),
                      meta, static)
        return out
    po = torch.empty(part[0], dtype=torch.float32, device=q.device)
    pl = torch.empty(part[1], dtype=torch.float32, device=q.device)
    _split_launch(grid, (q, k_pages, v_pages, page_table, seq_lens, sk, out, po, pl, *ints), meta, static)
    _merge_launch(mgrid, (po, pl, sk, out, *mints), mmeta, static)
    return out
