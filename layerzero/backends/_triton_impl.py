"""LayerZero's own Triton kernels (imported only when first used: it imports triton).

- rms_norm: optional residual add fused with RMSNorm; one program per row; reads x (and the
  residual) once, writes y (and x + residual) once. Inputs of any strides (up to 3 leading dims
  are indexed directly; more are flattened with reshape).
- rope: q and k rotated in one launch; one program per (batch*seq, head); any strides for
  q, k, cos and sin (cos/sin broadcast over batch or sequence by stride 0); partial rotary (the
  tail is copied) and both pair layouts (rotate_half / interleaved).

Both compute in fp32 and round once, as `layerzero.reference` does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


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


def _lead3(t: torch.Tensor):
    """(t, (d0, d1, d2), (s0, s1, s2, s_col)) with t's leading dims padded/collapsed to three."""
    if t.dim() > 4:
        t = t.reshape(-1, t.shape[-1])
    shape, stride = list(t.shape[:-1]), list(t.stride()[:-1])
    while len(shape) < 3:
        shape.insert(0, 1)
        stride.insert(0, 0)
    return t, shape, stride + [t.stride(-1)]


def rms_norm(x, weight, eps, residual, offset):
    """y = (x [+ residual]) / rms * (offset + weight); returns y or (y, x + residual)."""
    n = x.shape[-1]
    block = triton.next_power_of_2(n)
    xv, (_, d1, d2), xs = _lead3(x)
    rows = x.numel() // n
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = torch.empty_like(y) if residual is not None else y
    rv, _, rs = _lead3(residual) if residual is not None else (xv, None, xs)
    w = weight if weight is not None else xv
    _rms_norm_kernel[(rows,)](xv, rv, w, y, s, d1, d2, *xs, *rs,
                              weight.stride(0) if weight is not None else 0, n, float(eps),
                              float(offset), HAS_R=residual is not None, HAS_W=weight is not None,
                              BLOCK=block, num_warps=_warps(block))
    return (y, s) if residual is not None else y


@triton.jit
def _rope_rows(IN, OUT, i_base, o_base, isd, osd, c1, c2, s1, s2, i1, i2, m, D, HALF,
               HAS_TAIL: tl.constexpr, BLOCK_T: tl.constexpr):
    x1 = tl.load(IN + i_base + i1 * isd, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(IN + i_base + i2 * isd, mask=m, other=0.0).to(tl.float32)
    tl.store(OUT + o_base + i1 * osd, (x1 * c1 - x2 * s1).to(OUT.dtype.element_ty), mask=m)
    tl.store(OUT + o_base + i2 * osd, (x2 * c2 + x1 * s2).to(OUT.dtype.element_ty), mask=m)
    if HAS_TAIL:
        t = 2 * HALF + tl.arange(0, BLOCK_T)
        mt = t < D
        tl.store(OUT + o_base + t * osd, tl.load(IN + i_base + t * isd, mask=mt), mask=mt)


@triton.jit
def _rope_kernel(Q, K, QO, KO, COS, SIN, HQ, S, D, HALF,
                 qs0, qs1, qs2, qs3, ks0, ks1, ks2, ks3, qo0, qo1, qo2, qo3, ko0, ko1, ko2, ko3,
                 cs0, cs1, cs2, ss0, ss1, ss2,
                 INTERLEAVED: tl.constexpr, HAS_TAIL: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_T: tl.constexpr):
    bs = tl.program_id(0).to(tl.int64)                   # offsets past 2**31 elements
    h = tl.program_id(1).to(tl.int64)
    b = bs // S
    s = bs % S
    j = tl.arange(0, BLOCK_H)
    m = j < HALF
    if INTERLEAVED:
        i1 = 2 * j
        i2 = 2 * j + 1
    else:
        i1 = j
        i2 = j + HALF
    c_base = b * cs0 + s * cs1
    s_base = b * ss0 + s * ss1
    c1 = tl.load(COS + c_base + i1 * cs2, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(COS + c_base + i2 * cs2, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + s_base + i1 * ss2, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + s_base + i2 * ss2, mask=m, other=0.0).to(tl.float32)
    if h < HQ:
        _rope_rows(Q, QO, b * qs0 + h * qs1 + s * qs2, b * qo0 + h * qo1 + s * qo2, qs3, qo3,
                   c1, c2, s1, s2, i1, i2, m, D, HALF, HAS_TAIL, BLOCK_T)
    else:
        hk = h - HQ
        _rope_rows(K, KO, b * ks0 + hk * ks1 + s * ks2, b * ko0 + hk * ko1 + s * ko2, ks3, ko3,
                   c1, c2, s1, s2, i1, i2, m, D, HALF, HAS_TAIL, BLOCK_T)


def _bhsd_strides(t, layout):
    s = t.stride()
    return s if layout == "bhsd" else (s[0], s[2], s[1], s[3])


def _cs_strides(c, s_len):
    """(batch, seq, feature) strides of cos/sin of shape (S|1, R) or (B|1, S|1, R)."""
    if c.dim() == 2:
        return (0, c.stride(0) if c.shape[0] == s_len else 0, c.stride(1))
    return (c.stride(0) if c.shape[0] > 1 else 0, c.stride(1) if c.shape[1] == s_len else 0, c.stride(2))


def rope(q, k, cos, sin, layout, interleaved):
    """Rotary embedding of q and k -> (q_rot, k_rot), in q's/k's layout and dtype."""
    b, d = q.shape[0], q.shape[-1]
    hq, s = (q.shape[1], q.shape[2]) if layout == "bhsd" else (q.shape[2], q.shape[1])
    hk = k.shape[1] if layout == "bhsd" else k.shape[2]
    half = cos.shape[-1] // 2
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    block_t = triton.next_power_of_2(max(d - 2 * half, 1))
    _rope_kernel[(b * s, hq + hk)](
        q, k, qo, ko, cos, sin, hq, s, d, half,
        *_bhsd_strides(q, layout), *_bhsd_strides(k, layout),
        *_bhsd_strides(qo, layout), *_bhsd_strides(ko, layout),
        *_cs_strides(cos, s), *_cs_strides(sin, s),
        INTERLEAVED=interleaved, HAS_TAIL=d > 2 * half,
        BLOCK_H=triton.next_power_of_2(max(half, 1)), BLOCK_T=block_t, num_warps=1 if d <= 128 else 2)
    return qo, ko
