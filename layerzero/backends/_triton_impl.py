"""LayerZero's own Triton kernels (imported only when first used: it imports triton).

- rms_norm: optional residual add fused with RMSNorm; one program per row; reads x (and the
  residual) once, writes y (and x + residual) once. Inputs of any strides (up to 3 leading dims
  are indexed directly; more are flattened with reshape).
- rope: q and k rotated in one launch; one program per token (batch*seq) rotates all its q and k
  heads as 2-D tiles (a second grid dim splits heads only past _MAX_TILE); any strides for
  q, k, cos and sin (cos/sin broadcast over batch or sequence by stride 0); partial rotary (the
  tail is copied) and both pair layouts (rotate_half / interleaved).

- gated: silu(gate) * up (swiglu) or gelu(gate) * up (geglu, erf or tanh form) in one pass;
  rows of any stride, the last dim contiguous (other inputs are reshaped, a copy).

All compute in fp32 and round once (`layerzero.reference` rounds the same way for norms and
RoPE; its two-kernel gated form rounds the activation first). Launches go through
`_triton_launch.Launch`, which skips Triton's per-call JIT work once a specialisation is compiled;
rms_norm and rope also cache their launch plan (grid, integer arguments, constexprs) per input
shapes and strides, so a repeated call does no stride arithmetic in Python.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_launch import Launch


def _pow2(n):
    """next power of 2 >= max(n, 1) (triton.next_power_of_2 costs ~2 us a call on the host)"""
    return 1 << (max(n, 1) - 1).bit_length()


def _warps(block: int) -> int:
    return 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4


@triton.jit
def _rms_norm_kernel(X, R, W, Y, S, d1, d2, xs0, xs1, xs2, xsc, rs0, rs1, rs2, rsc, ws, N,
                     eps, offset, HAS_R: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)             # offsets past 2**31 elements
    i2 = row % d2
    i1 = (row // d2) % d1
    i0 = row // (d2 * d1)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    x = tl.load(X + i0 * xs0 + i1 * xs1 + i2 * xs2 + cols * xsc, mask=m, other=0.0).to(tl.float32)
    if HAS_R:
        r = tl.load(R + i0 * rs0 + i1 * rs1 + i2 * rs2 + cols * rsc, mask=m, other=0.0).to(tl.float32)
        s = (x + r).to(S.dtype.element_ty)           # rounded once, as torch rounds x + r
        tl.store(S + row * N + cols, s, mask=m)
        x = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    y = x * rstd
    if HAS_W:
        w = tl.load(W + cols * ws, mask=m, other=0.0).to(tl.float32)
        y = y * (offset + w)
    tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=m)


_rms_norm_launch = Launch(_rms_norm_kernel, tensors=5)


def _lead3(t: torch.Tensor):
    """(t, (d0, d1, d2), (s0, s1, s2, s_col)) with t's leading dims padded/collapsed to three."""
    if t.dim() > 4:
        t = t.reshape(-1, t.shape[-1])
    shape, stride = list(t.shape[:-1]), list(t.stride()[:-1])
    while len(shape) < 3:
        shape.insert(0, 1)
        stride.insert(0, 0)
    return t, shape, stride + [t.stride(-1)]


_PLANS_MAX = 256    # per-shape launch plans kept per op (cleared past it)
_rms_plans: dict = {}


def _rms_plan(x, weight, eps, residual, offset):
    """(grid, int/float arguments, meta) of an rms_norm call with up to 4 dims, from its shapes
    and strides (the per-call Python of a launch, cached per shape: `rms_norm`)."""
    n = x.shape[-1]
    block = _pow2(n)
    _, (_, d1, d2), xs = _lead3(x)
    _, _, rs = _lead3(residual) if residual is not None else (None, None, xs)
    ints = (d1, d2, *xs, *rs, weight.stride(0) if weight is not None else 0, n, float(eps), float(offset))
    meta = dict(HAS_R=residual is not None, HAS_W=weight is not None, BLOCK=block, num_warps=_warps(block))
    return (x.numel() // n,), ints, meta


def rms_norm(x, weight, eps, residual, offset):
    """y = (x [+ residual]) / rms * (offset + weight); returns y or (y, x + residual)."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = torch.empty_like(y) if residual is not None else y
    if x.dim() > 4:        # collapsed to 2-D (a reshape, per call); not planned
        xv, rv = _lead3(x)[0], None if residual is None else _lead3(residual)[0]
        grid, ints, meta = _rms_plan(xv, weight, eps, rv, offset)
        static = None
    else:
        xv, rv = x, residual
        static = (x.shape, x.stride(), None if residual is None else (residual.shape, residual.stride()),
                  None if weight is None else weight.stride(), eps, offset)
        plan = _rms_plans.get(static)
        if plan is None:
            if len(_rms_plans) >= _PLANS_MAX:
                _rms_plans.clear()
            plan = _rms_plans[static] = _rms_plan(x, weight, eps, residual, offset)
        grid, ints, meta = plan
    # without a residual or weight the kernel's unused pointers get x (HAS_R / HAS_W are off)
    _rms_norm_launch(grid, (xv, xv if rv is None else rv, xv if weight is None else weight, y, s, *ints),
                     meta, static)
    return (y, s) if residual is not None else y


_MAX_TILE = 16384   # elements of a [heads, BLOCK_HALF] tile one program keeps in registers


@triton.jit
def _rope_rows(X, Y, x_row, y_row, xd, yd, hm, c1, c2, s1, s2, D: tl.constexpr,
               HALF: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr,
               BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr):
    """Rotates a [BLOCK_H, head_dim] tile of heads: x_row/y_row are the int64 offsets of each
    head's first feature ([BLOCK_H, 1]), xd/yd the feature strides, hm the head mask."""
    if INTERLEAVED:                                     # adjacent pairs: one contiguous load
        r = tl.arange(0, 2 * BLOCK_HALF)[None, :]
        m = hm & (r < 2 * HALF)
        x = tl.load(X + x_row + r * xd, mask=m, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, (BLOCK_H, BLOCK_HALF, 2)))
        y = tl.reshape(tl.join(x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), (BLOCK_H, 2 * BLOCK_HALF))
        tl.store(Y + y_row + r * yd, y.to(Y.dtype.element_ty), mask=m)
    else:                                               # rotate_half: first and second halves
        j = tl.arange(0, BLOCK_HALF)[None, :]
        m = hm & (j < HALF)
        x1 = tl.load(X + x_row + j * xd, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(X + x_row + (j + HALF) * xd, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + y_row + j * yd, (x1 * c1 - x2 * s1).to(Y.dtype.element_ty), mask=m)
        tl.store(Y + y_row + (j + HALF) * yd, (x2 * c2 + x1 * s2).to(Y.dtype.element_ty), mask=m)
    if 2 * HALF < D:                                    # partial rotary: the tail is copied
        t = 2 * HALF + tl.arange(0, BLOCK_T)[None, :]
        mt = hm & (t < D)
        tl.store(Y + y_row + t * yd, tl.load(X + x_row + t * xd, mask=mt), mask=mt)


@triton.jit
def _rope_cs(C, off, cd, HALF: tl.constexpr, INTERLEAVED: tl.constexpr,
             BLOCK_HALF: tl.constexpr):
    """The token's cos (or sin) as the two [1, BLOCK_HALF] fp32 rows multiplying x1 and x2."""
    if INTERLEAVED:
        r = tl.arange(0, 2 * BLOCK_HALF)
        c = tl.load(C + off + r * cd, mask=r < 2 * HALF, other=0.0).to(tl.float32)
        c1, c2 = tl.split(tl.reshape(c, (BLOCK_HALF, 2)))
    else:
        j = tl.arange(0, BLOCK_HALF)
        c1 = tl.load(C + off + j * cd, mask=j < HALF, other=0.0).to(tl.float32)
        c2 = tl.load(C + off + (j + HALF) * cd, mask=j < HALF, other=0.0).to(tl.float32)
    return c1[None, :], c2[None, :]


@triton.jit
def _rope_token(Q, K, QO, KO, COS, SIN, S, q_b, q_s, q_h, q_d, k_b, k_s, k_h, k_d,
                qo_b, qo_s, qo_h, qo_d, ko_b, ko_s, ko_h, ko_d, c_b, c_s, c_d, s_b, s_s, s_d,
                HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                INTERLEAVED: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr):
    """One token (b, s) = program_id(0) and one block of heads = program_id(1) (a single block
    unless a head tile is too large): cos/sin are read once and rotate every q and k head of
    the token. Strides are (batch, seq, head, feature) for q, k and the outputs, (batch, seq,
    feature) for cos and sin (0 where they broadcast)."""
    tok = tl.program_id(0).to(tl.int64)                 # offsets past 2**31 elements
    hb = tl.program_id(1)
    b = tok // S
    s = tok - b * S
    c1, c2 = _rope_cs(COS, b * c_b + s * c_s, c_d, HALF, INTERLEAVED, BLOCK_HALF)
    s1, s2 = _rope_cs(SIN, b * s_b + s * s_s, s_d, HALF, INTERLEAVED, BLOCK_HALF)
    hq = hb * BLOCK_HQ + tl.arange(0, BLOCK_HQ)
    h = hq.to(tl.int64)[:, None]
    _rope_rows(Q, QO, b * q_b + s * q_s + h * q_h, b * qo_b + s * qo_s + h * qo_h, q_d, qo_d,
               (hq < HQ)[:, None], c1, c2, s1, s2, D, HALF, INTERLEAVED, BLOCK_HQ, BLOCK_HALF, BLOCK_T)
    hk = hb * BLOCK_HK + tl.arange(0, BLOCK_HK)
    h = hk.to(tl.int64)[:, None]
    _rope_rows(K, KO, b * k_b + s * k_s + h * k_h, b * ko_b + s * ko_s + h * ko_h, k_d, ko_d,
               (hk < HK)[:, None], c1, c2, s1, s2, D, HALF, INTERLEAVED, BLOCK_HK, BLOCK_HALF, BLOCK_T)


@triton.jit(do_not_specialize=["S"])
def _rope_kernel(Q, K, QO, KO, COS, SIN, S, q_b, q_s, q_h, q_d, k_b, k_s, k_h, k_d, c_b, c_s, c_d,
                 HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                 INTERLEAVED: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                 BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr):
    """The usual call: each output has its input's strides (a dense input: empty_like keeps its
    layout) and sin has cos's strides, so only q's, k's and cos's strides are passed."""
    _rope_token(Q, K, QO, KO, COS, SIN, S, q_b, q_s, q_h, q_d, k_b, k_s, k_h, k_d,
                q_b, q_s, q_h, q_d, k_b, k_s, k_h, k_d, c_b, c_s, c_d, c_b, c_s, c_d,
                HQ, HK, D, HALF, INTERLEAVED, BLOCK_HQ, BLOCK_HK, BLOCK_HALF, BLOCK_T)


@triton.jit(do_not_specialize=["S"])
def _rope_kernel_strided(Q, K, QO, KO, COS, SIN, S, q_b, q_s, q_h, q_d, k_b, k_s, k_h, k_d,
                         qo_b, qo_s, qo_h, qo_d, ko_b, ko_s, ko_h, ko_d, c_b, c_s, c_d, s_b, s_s, s_d,
                         HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                         INTERLEAVED: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                         BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr):
    """Any other call (a non-dense input, so a contiguous output; sin strided unlike cos)."""
    _rope_token(Q, K, QO, KO, COS, SIN, S, q_b, q_s, q_h, q_d, k_b, k_s, k_h, k_d,
                qo_b, qo_s, qo_h, qo_d, ko_b, ko_s, ko_h, ko_d, c_b, c_s, c_d, s_b, s_s, s_d,
                HQ, HK, D, HALF, INTERLEAVED, BLOCK_HQ, BLOCK_HK, BLOCK_HALF, BLOCK_T)


_rope_launch, _rope_strided_launch = Launch(_rope_kernel, tensors=6), Launch(_rope_kernel_strided, tensors=6)


def _bshd_strides(t, bshd):
    """(batch, seq, head, feature) strides of q or k in either layout."""
    s = t.stride()
    return s if bshd else (s[0], s[2], s[1], s[3])


def _cs_strides(c, s_len):
    """(batch, seq, feature) strides of cos/sin of shape (S|1, R) or (B|1, S|1, R)."""
    if c.dim() == 2:
        return (0, c.stride(0) if c.shape[0] == s_len else 0, c.stride(1))
    return (c.stride(0) if c.shape[0] > 1 else 0, c.stride(1) if c.shape[1] == s_len else 0, c.stride(2))


def _heads_block(h, block_half):
    return min(_pow2(h), max(1, _MAX_TILE // block_half))


_rope_plans: dict = {}


def _rope_plan(q, k, cos, sin, qo, ko, layout, interleaved):
    """(launch, grid, int arguments, meta) of a rope call, from its shapes and strides (the
    per-call Python of a launch, cached per shape: `rope`); None for an empty call."""
    bshd = layout == "bshd"
    b, d = q.shape[0], q.shape[-1]
    s, hq = (q.shape[1], q.shape[2]) if bshd else (q.shape[2], q.shape[1])
    hk = k.shape[2] if bshd else k.shape[1]
    if b * s == 0:
        return None
    half = cos.shape[-1] // 2
    bh = _pow2(half)
    bq, bk = _heads_block(hq, bh), _heads_block(hk, bh)
    qst, kst, cst, sst = _bshd_strides(q, bshd), _bshd_strides(k, bshd), _cs_strides(cos, s), _cs_strides(sin, s)
    qost, kost = _bshd_strides(qo, bshd), _bshd_strides(ko, bshd)
    grid = (b * s, max(-(-hq // bq), -(-hk // bk)))
    tile = max(bq, bk) * bh
    meta = dict(HQ=hq, HK=hk, D=d, HALF=half, INTERLEAVED=interleaved, BLOCK_HQ=bq, BLOCK_HK=bk,
                BLOCK_HALF=bh, BLOCK_T=_pow2(d - 2 * half),
                num_warps=4 if tile <= 4096 else 8 if tile <= 8192 else 16)
    if qost == qst and kost == kst and sst == cst:
        return _rope_launch, grid, (s, *qst, *kst, *cst), meta
    return _rope_strided_launch, grid, (s, *qst, *kst, *qost, *kost, *cst, *sst), meta


def rope(q, k, cos, sin, layout, interleaved):
    """Rotary embedding of q and k -> (q_rot, k_rot), in q's/k's layout and dtype."""
    # q keeps its memory layout (attention reads it next); k comes out contiguous in its logical
    # shape: a KV cache concatenates it next, and torch.cat of a transposed (B, S, H, D)-memory
    # view is a strided copy (~69 us for 8x8192x128 bf16 on the H100, per layer).
    qo, ko = torch.empty_like(q), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    # the outputs' strides follow from q's and k's (empty_like keeps a dense layout), so shapes
    # and strides of the inputs decide the plan
    static = (q.shape, q.stride(), k.shape, k.stride(), cos.shape, cos.stride(), sin.shape,
              sin.stride(), layout, interleaved)
    plan = _rope_plans.get(static, False)
    if plan is False:
        if len(_rope_plans) >= _PLANS_MAX:
            _rope_plans.clear()
        plan = _rope_plans[static] = _rope_plan(q, k, cos, sin, qo, ko, layout, interleaved)
    if plan is not None:
        launch, grid, ints, meta = plan
        launch(grid, (q, k, qo, ko, cos, sin, *ints), meta, static)
    return qo, ko


_SILU, _GELU_ERF, _GELU_TANH = 0, 1, 2
_GATED_BLOCK = 2048


@triton.jit
def _gated_kernel(G, U, Y, gs, us, N, NB, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """One BLOCK of one row per program; consecutive programs walk along a row (NB blocks)."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // NB
    cols = (pid % NB) * BLOCK + tl.arange(0, BLOCK)
    m = cols < N
    g = tl.load(G + row * gs + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + row * us + cols, mask=m, other=0.0).to(tl.float32)
    if ACT == 0:
        a = g / (1.0 + tl.exp(-g))
    elif ACT == 1:
        a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = 0.5 * g * (2.0 - 2.0 / (tl.exp(2.0 * z) + 1.0))     # 1 + tanh(z)
    tl.store(Y + row * N + cols, (a * u).to(Y.dtype.element_ty), mask=m)


_gated_launch = Launch(_gated_kernel, tensors=3)


def _rows(t: torch.Tensor, n: int):
    """(t as (rows, n) with unit column stride, row stride); reshape copies only when it must."""
    t2 = t.reshape(-1, n) if t.dim() != 2 else t
    if n > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2, t2.stride(0)


def gated(gate, up, act: int):
    """act(gate) * up elementwise (act: _SILU, _GELU_ERF or _GELU_TANH), contiguous output."""
    n = gate.shape[-1]
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    rows = y.numel() // n if n else 0
    if rows == 0:
        return y
    g, gs = _rows(gate, n)
    u, us = _rows(up, n)
    block = min(_GATED_BLOCK, _pow2(n))
    nb = -(-n // block)
    _gated_launch((rows * nb,), (g, u, y, gs, us, n, nb),
                  dict(ACT=act, BLOCK=block, num_warps=4 if block <= 1024 else 8))
    return y
