"""Plain-PyTorch reference implementations of every op.

They define the semantics (see API.md), serve as the test oracle (run in float64) and are the
last-resort kernels (`reference.<op>`), so they accept every valid call. Attention is computed in
float32 (float64 for float64 inputs) and returned in the input dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the references (and the masks and biases kernels build) compute in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_allowed(sq: int, sk: int, *, is_causal: bool, window, causal_align: str,
                      device) -> torch.Tensor | None:
    """Bool (Sq, Sk) matrix of the positions that causal/window leave attendable, or None.

    Query i sits at key position i + off, off = 0 (top_left) or Sk - Sq (bottom_right).
    """
    if not is_causal and window is None:
        return None
    off = 0 if causal_align == "top_left" else sk - sq
    i = torch.arange(sq, device=device).unsqueeze(1) + off  # (Sq, 1)
    j = torch.arange(sk, device=device).unsqueeze(0)        # (1, Sk)
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if is_causal:
        allowed &= j <= i
    if window is not None:
        left, right = window
        if left >= 0:
            allowed &= j >= i - left
        if right >= 0:
            allowed &= j <= i + right
    return allowed


def alibi_bias(slopes: torch.Tensor, sq: int, sk: int, causal_align: str, dtype) -> torch.Tensor:
    """ALiBi as an additive bias: (B or 1, Hq, Sq, Sk) = -slope * |i + off - j|."""
    off = 0 if causal_align == "top_left" else sk - sq
    i = torch.arange(sq, device=slopes.device).unsqueeze(1) + off
    j = torch.arange(sk, device=slopes.device).unsqueeze(0)
    dist = (i - j).abs().to(dtype)                          # (Sq, Sk)
    s = slopes.to(dtype)
    s = s.reshape(1, -1, 1, 1) if s.dim() == 1 else s.reshape(s.shape[0], s.shape[1], 1, 1)
    return -s * dist


def attention(q, k, v, attn_mask=None, is_causal=False, scale=None, dropout_p=0.0, window=None,
              softcap=None, alibi_slopes=None, sinks=None, layout="bhsd", causal_align="top_left",
              *, upcast=True, return_weights=False):
    """Reference attention: every feature of `lz.attention`, by materialising the scores.

    upcast=False computes in the input dtype: the "plain PyTorch in the same dtype" baseline of
    the flash-attention test rule. return_weights=True returns (out, weights), the attention
    probabilities (B, Hq, Sq, Sk) in q's dtype, after dropout (what transformers' eager returns).
    """
    if layout == "bshd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    dt = compute_dtype(q.dtype) if upcast else q.dtype
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
    if hkv != hq:  # GQA/MQA: query head h reads kv head h // (Hq / Hkv)
        kf = kf.repeat_interleave(hq // hkv, dim=1)
        vf = vf.repeat_interleave(hq // hkv, dim=1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale       # (B, Hq, Sq, Sk)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, sq, sk, causal_align, dt)
    allowed = attention_allowed(sq, sk, is_causal=is_causal, window=window,
                                causal_align=causal_align, device=q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = attn_mask if allowed is None else (allowed & attn_mask)
        else:
            scores = scores + attn_mask.to(dt)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    rowmax = scores.amax(dim=-1, keepdim=True)                     # (B, Hq, Sq, 1)
    if sinks is not None:
        rowmax = torch.maximum(rowmax, sinks.to(dt).reshape(1, -1, 1, 1))
    rowmax = torch.where(torch.isfinite(rowmax), rowmax, torch.zeros_like(rowmax))
    p = torch.exp(scores - rowmax)                                 # masked -> exp(-inf) = 0
    denom = p.sum(dim=-1, keepdim=True)
    if sinks is not None:
        denom = denom + torch.exp(sinks.to(dt).reshape(1, -1, 1, 1) - rowmax)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))  # empty rows stay 0
    if dropout_p > 0.0:
        p = F.dropout(p, p=dropout_p)
    out = torch.matmul(p, vf).to(q.dtype)                          # (B, Hq, Sq, Dv)
    out = out.transpose(1, 2) if layout == "bshd" else out
    return (out, p.to(q.dtype)) if return_weights else out



def paged_positions(seq_lens: torch.Tensor, sq: int, sk: int, *, is_causal: bool, window):
    """Bool (B, Sq, Sk): which of a row's first Sk keys each query of a paged call attends.

    Query i of row b sits at key position seq_lens[b] - Sq + i (bottom-right); key j is valid
    when j < seq_lens[b]; causal and the window apply relative to the query's position. A query
    at a negative position (left padding) sees no key under is_causal.
    """
    lens = seq_lens.to(torch.long)
    j = torch.arange(sk, device=seq_lens.device).view(1, 1, sk)
    pos = lens.view(-1, 1, 1) - sq + torch.arange(sq, device=seq_lens.device).view(1, sq, 1)
    allowed = j < lens.view(-1, 1, 1)
    if is_causal:
        allowed = allowed & (j <= pos)
    if window is not None:
        left, right = window
        if left >= 0:
            allowed = allowed & (j >= pos - left)
        if right >= 0:
            allowed = allowed & (j <= pos + right)
    return allowed


def gather_pages(pages: torch.Tensor, page_table: torch.Tensor, n_pages: int) -> torch.Tensor:
    """(B, Hkv, n_pages * page_size, D): each row's first `n_pages` pages, dense, in order.
    Entries of page_table that are out of range (unused: -1) read page 0; callers mask them."""
    b = page_table.shape[0]
    idx = page_table[:, :n_pages].to(torch.long).clamp(0, pages.shape[0] - 1)
    dense = pages[idx]                                    # (B, n_pages, P, Hkv, D)
    return dense.reshape(b, n_pages * pages.shape[1], pages.shape[2], pages.shape[3]).transpose(1, 2)


def paged_attention(q, k_pages, v_pages, page_table, seq_lens, scale=None, is_causal=True,
                    window=None, softcap=None, sinks=None, layout="bhsd"):
    """Reference paged attention: gather each row's pages into dense K/V, then `attention` with
    the mask the metadata implies (`paged_positions`). Reads seq_lens and the used part of
    page_table (one device sync) to size the gather and to check the values: a length beyond
    the table, or a page id out of range where a row has keys, raises ValueError. Reading values
    keeps it out of `torch.compile(fullgraph=True)` graphs (it graph-breaks otherwise)."""
    if layout == "bshd":
        q = q.transpose(1, 2)
    b, hq, sq, _ = q.shape
    num_pages, p = k_pages.shape[0], k_pages.shape[1]
    lens = seq_lens.to(torch.long)
    cap = page_table.shape[1] * p
    lo, hi = (int(lens.min()), int(lens.max())) if b else (0, 0)
    if lo < 0 or hi > cap:
        bad = int(((lens < 0) | (lens > cap)).nonzero()[0, 0])
        raise ValueError(f"seq_lens[{bad}] = {int(lens[bad])}; allowed: 0..{cap} "
                         f"(page_table's {page_table.shape[1]} pages x page_size {p})")
    n_pages = -(-hi // p)
    if n_pages == 0:      # no row holds a key: every query attends nothing
        out = q.new_zeros(b, hq, sq, v_pages.shape[3])
        return out.transpose(1, 2) if layout == "bshd" else out
    table = page_table[:, :n_pages].to(torch.long)
    used = torch.arange(n_pages, device=table.device).view(1, -1) * p < lens.view(-1, 1)
    bad = used & ((table < 0) | (table >= num_pages))
    if bool(bad.any()):
        r, i = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"page_table[{r}, {i}] = {int(table[r, i])} but row {r} holds {int(lens[r])} "
                         f"keys there; allowed page ids: 0..{num_pages - 1}")
    k = gather_pages(k_pages, page_table, n_pages)        # (B, Hkv, Sk, D)
    v = gather_pages(v_pages, page_table, n_pages)
    # slots past a row's length hold anything (a freed row's keys, NaN): masked scores drop K's,
    # but 0 * NaN in probabilities @ V would not drop V's
    held = torch.arange(n_pages * p, device=v.device).view(1, 1, -1, 1) < lens.view(-1, 1, 1, 1)
    v = torch.where(held, v, torch.zeros((), dtype=v.dtype, device=v.device))
    allowed = paged_positions(seq_lens, sq, n_pages * p, is_causal=is_causal, window=window)
    out = attention(q, k, v, allowed.unsqueeze(1), False, scale, 0.0, None, softcap, None, sinks,
                    "bhsd", "top_left")                    # (B, Hq, Sq, Dv)
    return out.transpose(1, 2) if layout == "bshd" else out

def rms_norm(x, weight, eps=1e-6, residual=None, offset=0.0):
    """y = x / rms(x) * (offset + weight) in float32 (float64 for float64), cast to x's dtype."""
    if residual is not None:
        x = x + residual
    dt = compute_dtype(x.dtype)
    xf = x.to(dt)
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * (offset + weight.to(dt))
    y = y.to(x.dtype)
    return (y, x) if residual is not None else y


def layer_norm(x, weight, bias, eps=1e-5, residual=None):
    """As F.layer_norm over the last dim, computed in float32 (float64 for float64)."""
    if residual is not None:
        x = x + residual
    dt = compute_dtype(x.dtype)
    xf = x.to(dt)
    mean = xf.mean(dim=-1, keepdim=True)
    var = (xf - mean).pow(2).mean(dim=-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(dt)
    if bias is not None:
        y = y + bias.to(dt)
    y = y.to(x.dtype)
    return (y, x) if residual is not None else y


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_interleaved(x):
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rope(q, k, cos, sin, layout="bhsd", interleaved=False):
    """Rotary embedding as transformers' apply_rotary_pos_emb; partial when D_rot < head_dim.

    x_rot = x * cos + rotate(x) * sin over the first D_rot features. rotate is rotate_half
    (llama: cos/sin hold each angle twice, in halves) or, with interleaved=True, GPT-J's
    rotate_every_two (cos/sin hold each angle twice, in adjacent pairs).
    """
    rot = cos.shape[-1]
    if cos.dim() == 2:                                  # (S, D_rot) -> (1, S, D_rot)
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    head_axis = 1 if layout == "bhsd" else 2            # broadcast over heads
    c, s = cos.unsqueeze(head_axis), sin.unsqueeze(head_axis)
    rotate = _rotate_interleaved if interleaved else _rotate_half

    def apply(x):
        dt = compute_dtype(x.dtype)
        xr, xp = x[..., :rot], x[..., rot:]
        y = (xr.to(dt) * c.to(dt) + rotate(xr.to(dt)) * s.to(dt)).to(x.dtype)
        return torch.cat((y, xp), dim=-1) if xp.shape[-1] else y

    return apply(q), apply(k)


def swiglu(gate, up):
    """silu(gate) * up."""
    return F.silu(gate) * up


def geglu(gate, up, approximate="none"):
    """gelu(gate) * up."""
    return F.gelu(gate, approximate=approximate) * up


def filter_logits(logits, temperature=1.0, top_k=None, top_p=None, min_p=None):
    """transformers' warpers in their order: temperature, top-k, top-p, min-p (float32 logits)."""
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    neg = float("-inf")
    if top_k is not None and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, neg)
    if top_p is not None and top_p < 1.0:
        sorted_x, idx = torch.sort(x, descending=False)
        cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - top_p)
        remove[..., -1:] = False                                    # keep at least one token
        x = x.masked_fill(remove.scatter(-1, idx, remove), neg)
    if min_p is not None:
        probs = x.softmax(dim=-1)
        remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
        remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
        x = x.masked_fill(remove, neg)
    return x


# Inductor reduces an argmax over one long row in a single program (it splits sums and maxima
# over many, not argmax): 35 us of a 1.13 ms batch-1 decode step for the 128,256 logits of a 1B
# llama on the H200 (benchmarks/RESULTS.md, issue 13). Traced, greedy sampling takes each row's
# maximum per block of ARGMAX_BLOCK logits first (many programs), then the best block; the first
# maximal index wins in both stages, as in argmax.
ARGMAX_BLOCK = 1024


def argmax_rows(x):
    """x.argmax(dim=-1) of float logits; in two stages while traced by torch.compile."""
    v = x.shape[-1]
    if v <= 4 * ARGMAX_BLOCK or not torch.compiler.is_compiling():
        return x.argmax(dim=-1)
    pad = -v % ARGMAX_BLOCK
    if pad:
        x = F.pad(x, (0, pad), value=-float("inf"))
    vals, idx = x.view(*x.shape[:-1], -1, ARGMAX_BLOCK).max(dim=-1)
    best = vals.argmax(dim=-1, keepdim=True)
    return (best * ARGMAX_BLOCK + idx.gather(-1, best)).squeeze(-1)


def sample(logits, temperature=1.0, top_k=None, top_p=None, min_p=None, generator=None):
    """One token per row of (B, V) logits; temperature 0 is greedy."""
    if temperature == 0.0:
        return argmax_rows(logits)
    x = filter_logits(logits, temperature, top_k, top_p, min_p)
    probs = x.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
