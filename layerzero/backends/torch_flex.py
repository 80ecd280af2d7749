"""FlexAttention (torch.nn.attention.flex_attention) as kernel `torch.flex`.

Every feature becomes a `score_mod` or a block mask: causal (both alignments) and sliding windows
are block masks (cached per shape and pattern, so fully masked blocks are skipped), and so is a
caller's bool mask, with them (its empty tiles are skipped, its full ones run without reading it);
an additive mask, ALiBi and softcap are score mods; sinks use the returned log-sum-exp (CUDA only: compiled
flex on CPU returns none). Each configuration gets its own compiled function (see `_compiled`),
so it compiles once and is reused by later calls.
"""
from __future__ import annotations

import functools
import importlib.util
import types

import torch

from .. import reference
from ..registry import register
from ._torch_version import TORCH


def _run_flex(q, k, v, score_mod, block_mask, scale, enable_gqa, return_lse, kernel_options=None):
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                          enable_gqa=enable_gqa, return_lse=return_lse,
                          kernel_options=kernel_options)


# Inductor's flex-decoding kernel (CUDA, Sq < 128) puts a kv head's group of query rows in one
# tile of next_pow2(Sq * group) rows, which must divide the block mask's 128-row query blocks:
# past 128 it has no config ("NoValidChoicesError: No choices exist for backend", H200, torch
# 2.11, Sq 64 x group 4). Such calls take the main kernel.
_FORCE_MAIN = {"FORCE_USE_FLEX_ATTENTION": True}


def _kernel_options(q, k, block_mask):
    if (q.device.type == "cuda" and block_mask is not None and q.shape[2] < 128
            and q.shape[2] * (q.shape[1] // k.shape[1]) > 128):
        return _FORCE_MAIN
    return None


@functools.lru_cache(maxsize=64)
def _compiled(config: tuple):
    """flex_attention compiled for one configuration, with a code object of its own.

    torch.compile keeps its cache, and its recompile limit (8), per code object: sharing one
    compiled flex between configurations would, past 8 of them, silently fall back to the
    unfused eager path. A fresh code object per configuration keeps each compiled once. CPU
    compiles static shapes (inductor's CPU code for dynamic shapes fails to build window masks
    in torch 2.13); CUDA lets sequence lengths vary. Compiles run one at a time, process-wide
    (`warmup.compile_serialised`): concurrent first calls of flex broke torch.compile for good."""
    from ..warmup import compile_serialised

    code = _run_flex.__code__.replace(co_name=f"flex_{abs(hash(config)):x}")
    fn = types.FunctionType(code, _run_flex.__globals__, code.co_name)
    return compile_serialised(fn, dynamic=False if config[0] == "cpu" else None)


def _conds(pattern, device) -> list:
    """The causal / window bounds of `pattern` as functions of (qi, ki); query i sits at key
    position i + off. One small function per bound (a `keep = ki >= 0` seed trips an inductor CPU
    codegen bug)."""
    is_causal, window, off = pattern
    left, right = window if window is not None else (-1, -1)
    # a tensor, not an int: no recompile per offset; made by a fill, not a copy from the host,
    # so that a block mask can be built inside a CUDA graph's capture
    off = torch.full((), off, dtype=torch.long, device=device)
    conds = []
    if is_causal:
        conds.append(lambda qi, ki: ki <= qi + off)
    if left >= 0:
        conds.append(lambda qi, ki: ki >= qi + off - left)
    if right >= 0:
        conds.append(lambda qi, ki: ki <= qi + off + right)
    return conds


@functools.lru_cache(maxsize=256)
def _block_mask(pattern, sq, sk, device):
    """Block mask for causal/window patterns, cached per (pattern, shape, device); None when
    the pattern masks nothing."""
    from torch.nn.attention.flex_attention import create_block_mask

    conds = _conds(pattern, device)
    if not conds:
        return None

    def mask_mod(b, h, qi, ki):
        keep = conds[0](qi, ki)
        for cond in conds[1:]:
            keep = keep & cond(qi, ki)
        return keep

    return create_block_mask(mask_mod, None, None, sq, sk, device=device)


def _bool_block_mask(pattern, full, sq, sk, device):
    """Block mask of a caller's bool mask (`full`, expanded to (B, H, Sq, Sk)) and the pattern:
    tiles the mask empties (padding, the causal half) are skipped and full tiles run without
    reading it; only partial tiles read it, in mask_mod. (Read in a score_mod instead, every tile
    ran and read it: a left-padded 32 x 4032 prefill over 4,096 static-cache columns took
    179 ms a layer on the H200.) Batch and head dimensions the mask broadcasts stay broadcast."""
    from torch.nn.attention.flex_attention import create_block_mask

    conds = _conds(pattern, device)

    def mask_mod(b, h, qi, ki):
        keep = full[b, h, qi, ki]
        for cond in conds:
            keep = keep & cond(qi, ki)
        return keep

    rows = full.shape[0] if full.stride(0) else None
    heads = full.shape[1] if full.stride(1) else None
    return create_block_mask(mask_mod, rows, heads, sq, sk, device=device)


# The last bool mask's block mask: a model's layers pass the same mask object, so its block mask
# is built once per forward (checked by identity and version; not while tracing). The entry (its
# mask_mod reads the mask) keeps that one mask alive until a call with another mask. A CUDA graph
# capture takes no entry built outside it (the graph must record the build, so that a replay
# builds from the mask it is replayed with), and an eager call none built inside one.
_LAST_BOOL: list = []


def _bool_block_mask_cached(pattern, attn_mask, full, sq, sk, device):
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    key = (pattern, tuple(full.shape), sq, sk, device, capturing)
    if _LAST_BOOL:
        last, version, last_key, mask = _LAST_BOOL[0]
        if last is attn_mask and version == attn_mask._version and last_key == key:
            return mask
    mask = _bool_block_mask(pattern, full, sq, sk, device)
    _LAST_BOOL[:] = [(attn_mask, attn_mask._version, key, mask)]
    return mask


def _score_mod(softcap, alibi, float_mask, off):
    """A score_mod applying, in order, softcap, ALiBi and the caller's additive mask (tensors
    already expanded to (B, H, Sq, Sk) or (B, H)). A bool mask is a block mask instead."""
    def mod(score, b, h, qi, ki):
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if alibi is not None:
            score = score - alibi[b, h] * (qi + off - ki).abs()
        if float_mask is not None:
            score = score + float_mask[b, h, qi, ki]
        return score
    return mod


def flex(q, k, v, attn_mask, is_causal, scale, dropout_p, window, softcap, alibi_slopes, sinks,
         layout, causal_align):
    if layout == "bshd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    off = 0 if causal_align == "top_left" else sk - sq
    # Inside an outer torch.compile (a compiled model) flex_attention and its block mask trace
    # into that graph: a nested compiled function (code.replace, a compile lock) or an
    # lru_cache'd mask would be a graph break in every layer.
    traced = torch.compiler.is_compiling()
    block_mask = float_mask = None
    pattern = (is_causal, window, off)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        full = attn_mask.expand(b, hq, sq, sk)
        block_mask = (_bool_block_mask(pattern, full, sq, sk, q.device) if traced
                      else _bool_block_mask_cached(pattern, attn_mask, full, sq, sk, q.device))
    elif is_causal or window is not None:
        make_mask = _block_mask.__wrapped__ if traced else _block_mask
        block_mask = make_mask(pattern, sq, sk, q.device)
    score_mod = None
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        float_mask = attn_mask.expand(b, hq, sq, sk)
        float_mask = float_mask.to(q.dtype if q.dtype == torch.float64 else torch.float32)
    if softcap is not None or alibi_slopes is not None or float_mask is not None:
        alibi = None
        if alibi_slopes is not None:
            alibi = alibi_slopes.to(reference.compute_dtype(q.dtype)).reshape(-1, hq).expand(b, hq)
        score_mod = _score_mod(softcap, alibi, float_mask,
                               torch.tensor(off, device=q.device) if alibi is not None else 0)
    options = _kernel_options(q, k, block_mask)
    if traced:
        run = _run_flex
    else:
        # One configuration: what changes the traced program. On CPU (static shapes) the shapes too.
        config = (q.device.type, q.dtype, q.shape if q.device.type == "cpu" else q.shape[-1],
                  k.shape if q.device.type == "cpu" else k.shape[1], is_causal, window,
                  softcap is not None, None if alibi_slopes is None else alibi_slopes.dim(),
                  None if attn_mask is None else (attn_mask.dtype, attn_mask.dim()), sinks is not None,
                  options is not None)     # the main kernel forced: its own compile
        run = _compiled(config)
    if sinks is not None:
        out, lse = run(q, k, v, score_mod, block_mask, scale, hq != k.shape[1], True, options)
        dt = reference.compute_dtype(q.dtype)
        keep = torch.sigmoid(lse.to(dt) - sinks.to(dt).view(1, -1, 1)).unsqueeze(-1)
        out = (out.to(dt) * keep).to(q.dtype)
    else:
        out = run(q, k, v, score_mod, block_mask, scale, hq != k.shape[1], False, options)
    return out.transpose(1, 2) if layout == "bshd" else out


def supports(spec) -> list[str]:
    r = []
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return [f"torch {torch.__version__} has no FlexAttention"]
    if spec.device == "cpu":
        if TORCH < (2, 6):
            r.append(f"FlexAttention on CPU needs torch >= 2.6, have {torch.__version__}")
        if spec.grad:
            r.append("compiled FlexAttention on CPU is inference-only (inputs require grad)")
        if spec.sinks:
            r.append("compiled FlexAttention on CPU returns no log-sum-exp, needed for sinks")
    elif spec.device != "cuda":
        r.append(f"device {spec.device!r} is not supported (cpu, cuda)")
    if spec.dropout:
        r.append("FlexAttention has no dropout")
    if spec.head_dim_v != spec.head_dim:
        r.append("FlexAttention needs v's head_dim equal to q's")
    if spec.device == "cuda":
        # H200, torch 2.11: head_dim 80, 96, 192 and 256 run (forward and backward), padded to a
        # power of two inside the kernel; older torch takes powers of two only. Above 128 the
        # tiles need Hopper's shared memory.
        d, top = spec.head_dim, 256 if spec.sm >= 90 else 128
        if d < 16 or d > top or (TORCH < (2, 6) and d & (d - 1)):
            kind = "a power-of-two head_dim" if TORCH < (2, 6) else "head_dim"
            r.append(f"FlexAttention on CUDA (sm{spec.sm}, torch {torch.__version__}) needs {kind} "
                     f"in 16..{top}, got {d}")
        if spec.mask == "float":
            # the mask read in score_mod overflowed shared memory on the H100 (245760 > 232448 B)
            r.append("an additive float mask in FlexAttention's score_mod overflows the GPU's "
                     "shared memory; SDPA takes float masks natively")
    return r


CPU_MIN_SCORES = 512 * 512   # on the CPU, below this many scores per head a compile never pays off


# float32 on CUDA: flex's Triton products run in IEEE fp32 (no tensor cores). H200, torch 2.11,
# lz.speculative_generate's verify (8 rows x 2 queries over 392 masked keys, GQA 32/8, d64):
# 2.0 ms a call, where SDPA's efficient kernel took its mask at tens of microseconds
# (benchmarks/results/speculative_step_profile_h200.txt). Below SDPA's efficient and cuDNN
# kernels (27, 28 for such calls), above its math kernel (20), which materialises the scores.
CUDA_FP32 = 24


def priority(spec) -> int:
    """30 (ahead of SDPA with a materialised mask and of the reference); on the CPU, calls too
    small to repay a compile (seconds per configuration) go below the reference; float32 CUDA
    calls go below SDPA's efficient kernel (CUDA_FP32)."""
    if spec.device == "cpu" and spec.seq_len_q * spec.seq_len_k < CPU_MIN_SCORES:
        return -10
    if spec.device == "cuda" and spec.dtype == torch.float32:
        return CUDA_FP32
    return 30


register("attention", "torch.flex", flex, priority=priority, supports=supports)
