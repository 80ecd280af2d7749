"""Default kernel priorities per GPU generation, and the per-shape rules where the winner flips.

A priority only orders the kernels that can run a call (their `supports()` decides that); policy
boosts and measured timings come on top. Every rule here is a pure function of the CallSpec, so
selection stays a pure, cacheable function.

Starting point: the H100 table of FIELD-NOTES (bf16 forward, torch 2.11, cuDNN 9.19), then
benchmarks/attention.py's oracle on the GPU host (numbers in benchmarks/RESULTS.md):

- plain prefill: flash-attn-4 > cuDNN = SDPA's default (it picks cuDNN on sm90/sm100) > FlashInfer
  (fa3) > flex > SDPA flash > efficient. FA4's Python launch costs ~0.15 ms of host time
  (measured on the H100 host, against ~0.02 ms for SDPA), so
- small calls (little work per launch, short keys) go to SDPA's plain path, the cheapest launch;
- decode (Sq <= 16): cuDNN / SDPA's default ~ flex > FlashInfer > SDPA flash (FIELD-NOTES row 5);
- feature calls that SDPA can express only with a materialised mask (window, bottom-right causal
  with Sq != Sk, ALiBi, padding masks) or not at all (softcap, sinks): kernels taking the feature
  natively first (flash-attn, FlashInfer), then flex (block masks skip masked tiles; its static
  score is 30), then SDPA with an explicit mask. Two exceptions: one query token goes to
  FlashInfer's decode kernel first, and small calls whose mask SDPA takes go to SDPA first
  (see call_kind).
"""
from __future__ import annotations

from typing import Callable

from ..call import sdpa_native

# FlashInfer's custom-mask prefill (planned per call) measured 5-8x slower than flex and SDPA
# with the same padding mask on the H100 (2.13 vs 0.43 ms at 8x1k; 4.04 vs 0.51 ms at 4x2k causal).
MASKED_FLASHINFER = 10
DECODE_MAX_Q = 16          # Sq at or below this is a decode / speculative-verify step
# Below this a launch's host overhead rivals FA4's kernel-time gain. H100 run of
# benchmarks/attention.py (RESULTS.md): FA4 lost at 1x2k GQA causal (3.4e10 FLOP, 0.216 vs SDPA
# 0.083 ms) and 64x512 GQA causal (1.1e11), won at 4x2k MHA causal (1.4e11, 0.260 vs 0.307).
SMALL_FLOPS = 1.2e11
LONG_KEYS = 2048           # FA4 won plain prefill only from 2k keys up (8x1k MHA: a tie)

# generation -> call kind -> kernel id -> priority (kernels not listed keep their default)
_PREFILL_HOPPER = {"flash_attn.fa4": 70, "flash_attn.fa3": 66, "torch.sdpa": 52,
                   "torch.sdpa_cudnn": 50, "flashinfer.prefill": 46, "flash_attn.fa2": 44,
                   "torch.sdpa_flash": 42, "xformers.mea": 36, "torch.sdpa_efficient": 30,
                   "torch.sdpa_math": 20}
_SMALL = {"torch.sdpa": 60, "torch.sdpa_cudnn": 50, "torch.sdpa_flash": 48, "flash_attn.fa2": 47,
          "flash_attn.fa3": 46, "flash_attn.fa4": 45, "flashinfer.prefill": 40,
          "xformers.mea": 36, "torch.sdpa_efficient": 30, "torch.sdpa_math": 20}
_DECODE = {"torch.sdpa": 56, "torch.sdpa_cudnn": 55, "flashinfer.decode": 50, "flash_attn.fa2": 48,
           "flash_attn.fa3": 48, "torch.sdpa_flash": 42, "flash_attn.fa4": 40,
           "flashinfer.prefill": 35, "xformers.mea": 34, "torch.sdpa_efficient": 30,
           "torch.sdpa_math": 20}
_FEATURE = {"flash_attn.fa4": 75, "flash_attn.fa3": 73, "flash_attn.fa2": 70,
            "flashinfer.decode": 64, "flashinfer.prefill": 62, "xformers.mea": 29,
            "torch.sdpa_cudnn": 28, "torch.sdpa_efficient": 27, "torch.sdpa": 26,
            "torch.sdpa_flash": 25, "torch.sdpa_math": 20}
# One query token with a window or softcap: FlashInfer's decode kernel (split-KV) beat FA4 (no
# split-KV on sm90) 0.184 vs 0.362 ms (window, 32x8k) and 0.340 vs 0.424 ms (softcap, 16x4k d256).
_FEATURE_DECODE = {**_FEATURE, "flashinfer.decode": 80}
# Little work, a mask SDPA takes (causal bottom-right, window, ALiBi, a padding mask without
# causal): SDPA with the mask (cached when it comes from shapes or ALiBi slopes, see torch_sdpa)
# beat the kernels that skip masked tiles but pay more per launch (ALiBi 2x1k d64: 0.048 vs flex
# 0.174 ms); flash-attn, which takes causal/window natively, stays ahead (chunked prefill 512
# over 8k: FA4 0.126 vs SDPA with the cached mask 0.227 ms).
_FEATURE_SMALL = {**_FEATURE, "torch.sdpa": 68, "torch.sdpa_cudnn": 67}
_KINDS = {"prefill": _PREFILL_HOPPER, "small": _SMALL, "decode": _DECODE, "feature": _FEATURE,
          "feature_decode": _FEATURE_DECODE, "feature_small": _FEATURE_SMALL}
# Small and decode calls on Hopper/Blackwell: SDPA's own choice (cuDNN there) through
# F.scaled_dot_product_attention itself. The direct path to aten's cuDNN op (torch.sdpa_cudnn's
# plain path) skips SDPA's re-selection but returns 9 outputs to Python: 23 vs 19 us a call for
# 1x512 GQA causal on the H100 host under no_grad (benchmarks/results/attention_h100.txt).
TABLES = {
    "hopper": _KINDS,
    "blackwell": {**_KINDS, "prefill": {**_PREFILL_HOPPER, "flash_attn.fa4": 75}},
    # Ampere/Ada: SDPA's default is its flash kernel (FA2 code); cuDNN isn't preferred there.
    "ampere": {**_KINDS, "prefill": {**_PREFILL_HOPPER, "flash_attn.fa2": 60, "torch.sdpa_cudnn": 40}},
    "other": {**_KINDS, "prefill": {}},
}


def generation(sm: int) -> str:
    if 80 <= sm < 90:
        return "ampere"
    if 90 <= sm < 100:
        return "hopper"
    if 100 <= sm < 130:
        return "blackwell"
    return "other"


def attention_flops(spec) -> float:
    f = 4.0 * spec.batch * spec.num_heads * spec.seq_len_q * spec.seq_len_k * spec.head_dim
    return f / 2 if spec.causal else f


def call_kind(spec) -> str:
    """The row of the priority table a CUDA attention call uses:

    - "feature_decode": one query token with something SDPA lacks an argument for;
    - "feature_small": little work (< SMALL_FLOPS), Sq > DECODE_MAX_Q, a mask SDPA takes
      (no softcap or sinks) and not a caller's mask combined with causal (flex skips the
      masked tiles there: 0.514 vs 0.827 ms at 4x2k);
    - "feature": other calls SDPA can't take as they are;
    - "decode": Sq <= DECODE_MAX_Q;
    - "small": little work, short keys (< LONG_KEYS) or head_dim > 128 without causal, where
      a launch's host cost outweighs FA4's kernel gain (FA4 lost 64x512 GQA causal 0.517 vs
      0.376 ms and 4x2k d256 0.245 vs 0.211 at the same 1.4e11 FLOP where it won 1x4k d256
      causal 0.215 vs 0.267);
    - "prefill": the rest.

    One query token in a call traced by torch.compile (a compiled decode step) with nothing SDPA
    can't take (no softcap or sinks) is "decode": SDPA with the mask, which inductor lowers to
    aten's kernels, over flex's generated decode kernel (little to skip in one row; and flex's
    template failed to compile for fp32 head_dim 16 on the H200: no runtime fallback in a graph).
    """
    flops = attention_flops(spec)
    if not sdpa_native(spec):
        if spec.seq_len_q == 1:
            if "traced" in spec.flags and not (spec.softcap or spec.sinks):
                return "decode"
            return "feature_decode"
        if (spec.seq_len_q > DECODE_MAX_Q and flops < SMALL_FLOPS and not spec.softcap
                and not spec.sinks and not (spec.mask != "none" and spec.causal)):
            return "feature_small"
        return "feature"
    if spec.seq_len_q <= DECODE_MAX_Q:
        return "decode"
    if flops < SMALL_FLOPS or spec.seq_len_k < LONG_KEYS or (spec.head_dim > 128 and not spec.causal):
        return "small"
    return "prefill"


def attention(kernel_id: str, default: int) -> Callable:
    """priority(spec) for an attention kernel: `default` off CUDA (CPU behaviour is unchanged),
    the generation's table for CUDA calls."""
    def priority(spec) -> int:
        if spec.device != "cuda":
            return default
        if kernel_id == "flashinfer.prefill" and spec.mask != "none":
            return MASKED_FLASHINFER
        table = TABLES[generation(spec.sm)][call_kind(spec)]
        return table.get(kernel_id, default)
    priority.__qualname__ = f"attention_priority[{kernel_id}]"
    return priority


def by_size(big: int, small: int, min_elems: int = 1 << 20, *, residual: int | None = None) -> Callable:
    """priority(spec) for row/elementwise ops of a GPU kernel: on big tensors it wins (`residual`
    instead of `big` when the call fuses a residual add); on small ones launch overhead decides
    (torch's own kernels launch cheapest). Off CUDA (Triton's CPU interpreter) it is 1: only an
    explicit lz.use picks it there."""
    def priority(spec) -> int:
        if spec.device != "cuda":
            return 1
        if spec.batch * max(spec.head_dim, 1) < min_elems:
            return small
        return residual if residual is not None and "residual" in spec.flags else big
    return priority


# Ops whose plain-PyTorch form inductor fuses with its neighbours (residual adds, casts, RoPE's
# slices, the gate's multiply): in a call traced by torch.compile (flag "traced", set by
# compiled._choose) their reference kernel, that form, goes first. An opaque custom op (Triton,
# Liger, FlashInfer) would cut those fusions and stay a launch of its own in the graph.
TRACED_FUSABLE = frozenset({"rms_norm", "layer_norm", "rope", "swiglu", "geglu"})
TRACED_REFERENCE = 90
# ... except in a graph whose matrix products inductor turns into reductions (flag "matvec", set
# by lz.generate while it traces its batch-1 decode step under coordinate-descent tuning, where
# inductor decomposes (1, K) x (K, N) products into a multiply and a sum). Inductor then fuses a
# norm or gated activation into the reduction that reads its output, and every program of that
# reduction recomputes it for its few output rows: the fused down projection ran at 17-23 us a
# layer against 9.5 us alone. There LayerZero's own Triton kernels (custom ops: opaque, so their
# output is written once and read by a plain reduction) go first. H200, 1B llama, batch 1:
# 753 -> 896 tok/s with norms, RoPE and SwiGLU opaque (results/generate_gpu_explore_h200_opaque_b1.json).
MATVEC_OPAQUE = 95


def reference(spec) -> int:
    """priority(spec) of the reference kernels: 0 (the last resort), TRACED_REFERENCE for a
    traced call of a TRACED_FUSABLE op, except a CUDA call in a "matvec" graph."""
    fused = "traced" in spec.flags and not ("matvec" in spec.flags and spec.device == "cuda")
    return TRACED_REFERENCE if fused and spec.op in TRACED_FUSABLE else 0


def opaque_in_matvec(priority: Callable) -> Callable:
    """`priority` of an opaque (custom-op) kernel of a TRACED_FUSABLE op, raised to MATVEC_OPAQUE
    for CUDA calls traced into a "matvec" graph."""
    def wrapped(spec) -> int:
        if "matvec" in spec.flags and "traced" in spec.flags and spec.device == "cuda":
            return MATVEC_OPAQUE
        return priority(spec) if callable(priority) else priority
    wrapped.__qualname__ = f"opaque_in_matvec[{getattr(priority, '__qualname__', priority)}]"
    return wrapped


def gpu_only(value: int) -> Callable:
    """priority(spec): `value` on CUDA, 1 elsewhere (Triton's CPU interpreter is for tests)."""
    def priority(spec) -> int:
        return value if spec.device == "cuda" else 1
    return priority
