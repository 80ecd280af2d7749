"""`triton.paged_attention`: LayerZero's own Triton kernel for `lz.paged_attention`, split-KV
("flash-decoding") for decode and short query chunks (Sq <= 64: speculative verify, small
chunked prefill); the kernels and their design are in `_triton_paged_impl` (imported on first
use: it imports triton).

Unlike `reference.paged_attention` it never reads page_table or seq_lens on the host (the
number of key splits comes from shapes, each program reads its row's length on the device), so
a decode step that calls it can be captured in a CUDA graph. It is a `torch.library` custom op
(`layerzero::triton_paged_attention`) with a fake implementation, so torch.compile traces it
as one call; eager calls run the implementation directly (the op's dispatch costs tens of us).
Runs on CUDA (sm80+), and on the CPU under TRITON_INTERPRET=1 for tests (fp32 and fp16 there:
the interpreter truncates to bf16 where GPUs round).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import probe
from ..registry import register
from ._gpu import eager, lazy_module, triton_reasons

_IMPL = "layerzero.backends._triton_paged_impl"
_NAME = "triton.paged_attention"
MAX_SQ = 64                # as _triton_paged_impl.MAX_SQ (not imported here: it imports triton)
MAX_HEAD_DIM = 256
_kernels = lazy_module(_IMPL)


@torch.library.custom_op("layerzero::triton_paged_attention", mutates_args=())
def paged_op(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, page_table: torch.Tensor,
             seq_lens: torch.Tensor, scale: float, is_causal: bool, left: int, right: int,
             softcap: float, sinks: Optional[torch.Tensor], layout: str) -> torch.Tensor:
    """The kernel as one opaque call for torch.compile (window as left/right, -1 = unbounded;
    softcap 0.0 = none)."""
    return _kernels().paged_attention(q, k_pages, v_pages, page_table, seq_lens, scale, is_causal,
                                      left, right, softcap, sinks, layout)


@paged_op.register_fake
def _(q, k_pages, v_pages, page_table, seq_lens, scale, is_causal, left, right, softcap, sinks, layout):
    shape = list(q.shape)
    shape[3] = v_pages.shape[3]
    return q.new_empty(shape)          # contiguous in q's layout, as the kernel's output


def paged_attention(q, k_pages, v_pages, page_table, seq_lens, scale=None, is_causal=True,
                    window=None, softcap=None, sinks=None, layout="bhsd"):
    """lz.paged_attention's kernel (arguments as the op binds them)."""
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    left, right = window if window is not None else (-1, -1)
    cap = 0.0 if softcap is None else float(softcap)
    args = (q, k_pages, v_pages, page_table, seq_lens, scale, bool(is_causal), int(left), int(right),
            cap, sinks, layout)
    return _kernels().paged_attention(*args) if eager(q) else paged_op(*args)


def supports(spec) -> list[str]:
    r = triton_reasons(spec, _NAME)
    if spec.device == "cuda" and spec.sm < 80:
        r.append(f"{_NAME} needs sm80+ (bf16 tl.dot), this GPU is sm{spec.sm}")
    if max(spec.head_dim, spec.head_dim_v) > MAX_HEAD_DIM:
        r.append(f"{_NAME} keeps a query block and its output in registers: head_dim <= {MAX_HEAD_DIM}, "
                 f"got q/k {spec.head_dim}, v {spec.head_dim_v}")
    if spec.seq_len_q > MAX_SQ:
        r.append(f"{_NAME} is a decode / verify kernel: Sq <= {MAX_SQ} queries per row, got "
                 f"{spec.seq_len_q} (longer chunks go to a prefill kernel or the reference)")
    return r


probe.define(_IMPL, """
from layerzero.backends import _triton_paged_impl as T
if dev:
    q = torch.randn(1, 2, 1, 64, device=dev, dtype=torch.float16)
    kv = torch.randn(2, 16, 1, 64, device=dev, dtype=torch.float16)
    t = torch.tensor([[1, 0]], device=dev, dtype=torch.int32)
    T.paged_attention(q, kv, kv, t, torch.tensor([20], device=dev, dtype=torch.int32), 0.125, True,
                      -1, -1, 0.0, None, "bhsd")
    torch.cuda.synchronize()
""", ("triton",), needs="cuda_or_interpreter")


def priority(spec) -> int:
    """60 on CUDA: ahead of the reference (0), which gathers every page into dense K/V and reads
    the lengths on the host (FlashInfer's paged kernels, tuned per GPU, stay ahead at 70/65).
    Elsewhere -1, below the reference: under Triton's CPU interpreter (tests) only lz.use /
    lz.lock picks it (priorities.gpu_only's 1 would put it ahead of the reference there)."""
    return 60 if spec.device == "cuda" else -1


register("paged_attention", _NAME, paged_attention, priority=priority, supports=supports,
         requires=(_IMPL,))
