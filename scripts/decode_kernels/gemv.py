"""Matrix-vector products for decode steps (a few rows of activations against a weight matrix):
candidate Triton kernels measured by explore.py. They lost: on the H200 inductor's
coordinate-descent-tuned reductions read the weights at 3.3-4.5 TB/s alone (batch 1) and cuBLAS
at 2.4-4.1 (batch 8), these at 2.3-4.4 and under 1 TB/s (benchmarks/RESULTS.md, issue 13).

A decode step at batch 1-16 multiplies (M, K) activations by (N, K) weights with M tiny: the
product is bound by reading the weights once. These kernels give each program BLOCK_N weight rows and
stream them along K in BLOCK_K chunks, multiplying every chunk by all M activation rows held in
registers, so each weight byte is read once and nothing else is read from memory.

- gemv:        y = x @ w.T                      (M, K) x (N, K) -> (M, N)
- gated_gemv:  y = act(x @ wg.T) * (x @ wu.T)   the gate and up projections of a gated MLP and
               its activation (SiLU or GELU) in one pass: two weight streams, one output.

All accumulate in fp32 and round once. `config` is the first guess explore.py sweeps around.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ACTS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == 0:
        return g / (1.0 + tl.exp(-g))
    elif ACT == 1:
        return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        t = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0          # tanh
        return 0.5 * g * (1.0 + t)


@triton.jit
def _gemv_kernel(X, W, W2, Y, M, N, K, sxm, swn, sw2n, sym,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rn64 = tl.where(n_ok, rn, 0).to(tl.int64)      # rows past N read row 0 (never stored)
    rm = tl.arange(0, BLOCK_M)
    m_ok = rm < M
    rk0 = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_rows = W + rn64[:, None] * swn
    w2_rows = W2 + rn64[:, None] * sw2n
    x_rows = X + rm[:, None] * sxm
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + rk0
        if EVEN_K:
            w = tl.load(w_rows + rk[None, :]).to(tl.float32)
            x = tl.load(x_rows + rk[None, :], mask=m_ok[:, None], other=0.0).to(tl.float32)
        else:
            k_ok = rk < K
            w = tl.load(w_rows + rk[None, :], mask=k_ok[None, :], other=0.0).to(tl.float32)
            x = tl.load(x_rows + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
        if GATED:
            if EVEN_K:
                w2 = tl.load(w2_rows + rk[None, :]).to(tl.float32)
            else:
                w2 = tl.load(w2_rows + rk[None, :], mask=k_ok[None, :], other=0.0).to(tl.float32)
            acc2 += tl.sum(x[:, None, :] * w2[None, :, :], axis=2)
    if GATED:
        acc = _act(acc, ACT) * acc2
    tl.store(Y + rm[:, None] * sym + rn[None, :], acc.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def config(m: int, n: int, k: int, gated: bool) -> dict:
    """Launch configuration for an (m, k) x (n, k) product: BLOCK_N rows a program, BLOCK_K
    columns a step, warps and pipeline stages. A pure function of the shape."""
    bm = _pow2(m)
    bk = min(512 if bm == 1 else 256, _pow2(k))
    bn = 8 if bm <= 2 else 4
    if gated:
        bn = max(bn // 2, 2)
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=3)


def _launch(x2, w, w2, act, cfg, out_dtype):
    m, k = x2.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=out_dtype, device=x2.device)
    cfg = dict(cfg or config(m, n, k, w2 is not None))
    bn = cfg["BLOCK_N"]
    _gemv_kernel[(triton.cdiv(n, bn),)](
        x2, w, w if w2 is None else w2, y, m, n, k, x2.stride(0), w.stride(0),
        (w if w2 is None else w2).stride(0), y.stride(0),
        EVEN_K=(k % cfg["BLOCK_K"] == 0), GATED=w2 is not None, ACT=ACTS[act], **cfg)
    return y


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def gemv(x: torch.Tensor, w: torch.Tensor, cfg: dict | None = None) -> torch.Tensor:
    """x (..., K) @ w (N, K).T -> (..., N) in x's dtype; w's last dim contiguous."""
    y = _launch(_rows(x), w, None, "silu", cfg, x.dtype)
    return y.view(*x.shape[:-1], w.shape[0])


def gated_gemv(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, act: str = "silu",
               cfg: dict | None = None) -> torch.Tensor:
    """act(x @ w_gate.T) * (x @ w_up.T) -> (..., N) in x's dtype."""
    y = _launch(_rows(x), w_gate, w_up, act, cfg, x.dtype)
    return y.view(*x.shape[:-1], w_gate.shape[0])
