"""The `make run` demo: what LayerZero sees on this machine, each op run once with the kernel that
ran and why, then the dispatch-overhead benchmark. Runs on the CPU in about a minute."""
from __future__ import annotations

import os
import sys

import torch

import layerzero as lz

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))


def show(title: str, op: str, *args, **kwargs) -> None:
    out = getattr(lz, op)(*args, **kwargs)
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else [tuple(o.shape) for o in out]
    print(f"\n== {title}: lz.{op} -> {shape}")
    print(lz.explain(op, *args, **kwargs))


def main() -> None:
    torch.manual_seed(0)
    print(lz.doctor())
    q = torch.randn(2, 8, 64, 64)
    k = torch.randn(2, 2, 64, 64)
    v = torch.randn(2, 2, 64, 64)
    show("causal GQA attention (8 q heads, 2 kv heads)", "attention", q, k, v, is_causal=True)
    pad = torch.ones(2, 1, 1, 64, dtype=torch.bool)
    pad[1, ..., :16] = False                                   # left padding on the second row
    show("padding mask + sliding window", "attention", q, k, v, attn_mask=pad, is_causal=True,
         window=(16, 0))
    show("softcap (gemma2)", "attention", q, k, v, softcap=50.0, is_causal=True)
    show("attention sinks (gpt-oss)", "attention", q, k, v, sinks=torch.randn(8), is_causal=True)
    x, w = torch.randn(4, 128, 512), torch.randn(512)
    show("RMSNorm with residual", "rms_norm", x, w, residual=torch.randn_like(x))
    show("LayerNorm", "layer_norm", x, w, torch.randn(512))
    cos, sin = torch.randn(64, 32).cos(), torch.randn(64, 32).sin()
    show("partial RoPE (32 of 64 dims)", "rope", q, k, cos, sin)
    show("SwiGLU", "swiglu", torch.randn(4, 1024), torch.randn(4, 1024))
    show("GEGLU", "geglu", torch.randn(4, 1024), torch.randn(4, 1024), approximate="tanh")
    show("sampling (top-p 0.9)", "sample", torch.randn(4, 32000), top_p=0.9, temperature=0.7,
         generator=torch.Generator().manual_seed(0))
    print("\n== lz.metrics()")
    print(lz.metrics())
    print("\n== dispatch overhead (benchmarks/overhead.py)")
    import overhead

    overhead.main(["--calls", "5000", "--rounds", "5", "--json", ""])


if __name__ == "__main__":
    main()
