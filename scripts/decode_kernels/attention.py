"""Decode attention (one query token per row) over a dense K/V cache: a candidate Triton
kernel measured by explore.py (it lost to SDPA except at batch 1 over short caches).

A decode step's attention reads the cache once and does little arithmetic. The kernel gives each
program one (row, kv head, key split): it holds the G = Hq / Hkv query heads that share the kv
head in registers, streams its keys and values in BLOCK_S chunks with an online softmax, and
writes a partial (max, sum, output). A second kernel merges the splits of each (row, query head)
in a fixed order, so the result does not depend on scheduling. GQA needs no repeat of K/V.

The mask is optional and given per key: bool (True = attend) or additive float, indexed by
strides over (B, Hq, L) (a (B, 1, 1, L) mask has head stride 0); a query with no key to attend
gives zeros. Everything is computed in fp32; the output is rounded once to q's dtype.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _split_kernel(Q, K, V, MASK, PO, PM, PL, L, scale,
                  sqb, sqh, sqd, skb, skh, sks, skd, svb, svh, svs, svd, smb, smh, sml,
                  H_KV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, SPLITS: tl.constexpr,
                  MASK_KIND: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H_KV
    hk = bh % H_KV
    rg = tl.arange(0, BLOCK_G)
    rd = tl.arange(0, BLOCK_D)
    g_ok = rg < G
    d_ok = rd < D
    hq = hk * G + rg
    q = tl.load(Q + b * sqb + hq[:, None] * sqh + rd[None, :] * sqd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * scale
    chunk = tl.cdiv(tl.cdiv(L, SPLITS), BLOCK_S) * BLOCK_S
    start = split * chunk
    end = tl.minimum(start + chunk, L)
    m_i = tl.full([BLOCK_G], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    rs0 = tl.arange(0, BLOCK_S)
    for s0 in range(start, end, BLOCK_S):
        rs = s0 + rs0
        s_ok = rs < end
        kv_ok = s_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * skb + hk * skh + rs[:, None] * sks + rd[None, :] * skd,
                    mask=kv_ok, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)                # (G, S)
        ok = g_ok[:, None] & s_ok[None, :]
        if MASK_KIND == 1:
            mk = tl.load(MASK + b * smb + hq[:, None] * smh + rs[None, :] * sml, mask=ok, other=0)
            ok = ok & (mk != 0)
        elif MASK_KIND == 2:
            s += tl.load(MASK + b * smb + hq[:, None] * smh + rs[None, :] * sml, mask=ok,
                         other=0.0).to(tl.float32)
        s = tl.where(ok, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(s - m_use[:, None])
        v = tl.load(V + b * svb + hk * svh + rs[:, None] * svs + rd[None, :] * svd,
                    mask=kv_ok, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    base = (b * (H_KV * G) + hq) * SPLITS + split                      # (B, Hq, SPLITS)
    tl.store(PM + base, m_i, mask=g_ok)
    tl.store(PL + base, l_i, mask=g_ok)
    tl.store(PO + base[:, None] * D + rd[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_kernel(PO, PM, PL, O, sob, soh, sod, H: tl.constexpr, D: tl.constexpr,
                  BLOCK_D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    rp = tl.arange(0, BLOCK_SPLITS)
    rd = tl.arange(0, BLOCK_D)
    p_ok = rp < SPLITS
    d_ok = rd < D
    m = tl.load(PM + bh * SPLITS + rp, mask=p_ok, other=-float("inf"))
    l = tl.load(PL + bh * SPLITS + rp, mask=p_ok, other=0.0)
    o = tl.load(PO + (bh * SPLITS + rp)[:, None] * D + rd[None, :], mask=p_ok[:, None] & d_ok[None, :],
                other=0.0)
    mx = tl.max(m, axis=0)
    mx = tl.where(mx == -float("inf"), 0.0, mx)
    w = tl.exp(m - mx)
    den = tl.sum(l * w, axis=0)
    out = tl.sum(o * w[:, None], axis=0) / tl.where(den == 0.0, 1.0, den)
    tl.store(O + b * sob + h * soh + rd * sod, out.to(O.dtype.element_ty), mask=d_ok)


def _pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def splits_for(batch: int, kv_heads: int, length: int, sm_count: int = 132) -> int:
    """Key splits per (row, kv head): enough programs to cover the SMs, each with >= 64 keys."""
    programs = batch * kv_heads
    want = max(1, -(-sm_count // programs))
    return max(1, min(want, length // 64, 64))


def decode_attention(q, k, v, mask=None, scale=None, splits=None, block_s=None):
    """q (B, Hq, 1, D), k/v (B, Hkv, L, D) (any strides), mask None or (B, 1|Hq, 1, L)
    broadcastable, bool or additive -> (B, Hq, 1, D) in q's dtype."""
    b, hq, _, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    g = hq // hkv
    if splits is None:
        splits = splits_for(b, hkv, length)
    bs = block_s or (32 if g <= 4 else 16)
    dev = q.device
    po = torch.empty(b, hq, splits, d, dtype=torch.float32, device=dev)
    pm = torch.empty(b, hq, splits, dtype=torch.float32, device=dev)
    pl = torch.empty(b, hq, splits, dtype=torch.float32, device=dev)
    if mask is None:
        kind, mk, smb, smh, sml = 0, q, 0, 0, 0
    else:
        mk = mask.expand(b, mask.shape[1], 1, length)
        kind = 1 if mk.dtype == torch.bool else 2
        smb, smh, sml = mk.stride(0), (mk.stride(1) if mk.shape[1] > 1 else 0), mk.stride(3)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    bd = _pow2(d)
    _split_kernel[(b * hkv, splits)](
        q, k, v, mk, po, pm, pl, length, scale,
        q.stride(0), q.stride(1), q.stride(3), k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3), smb, smh, sml,
        H_KV=hkv, G=g, BLOCK_G=_pow2(g), D=d, BLOCK_D=bd, BLOCK_S=bs, SPLITS=splits,
        MASK_KIND=kind, num_warps=4)
    out = torch.empty(b, hq, 1, d, dtype=q.dtype, device=dev)
    _merge_kernel[(b * hq,)](po, pm, pl, out, out.stride(0), out.stride(1), out.stride(3),
                             H=hq, D=d, BLOCK_D=bd, SPLITS=splits, BLOCK_SPLITS=_pow2(splits),
                             num_warps=1)
    return out
