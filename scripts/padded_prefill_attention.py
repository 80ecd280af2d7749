"""One attention call of a left-padded prefill into a static cache, as lz.generate makes it for
paged_generate.py's prompts (32 rows of 100..4000 tokens padded to 4,032, 4,096 cache columns,
32 q / 8 kv heads, d64, bf16, a (32, 1, 4032, 4096) bool mask: causal and padding): the kernel
LayerZero picks, then each candidate's time (CUDA events, 3 calls after one) and its largest
difference from the first on rows that attend to something. --columns runs the calls over each
cache width in turn in one process (e.g. 4352 4096: inside lz.generate the flex kernel took 5.4 ms
a layer over 4,352 columns and 16.4 over 4,096 after it, where this script alone measured 4.7 over
4,096; the question is whether flex's recompile for a second shape, dynamic, is the slow one).

    PYTHONPATH=$PWD python3 scripts/padded_prefill_attention.py [--columns 4352 4096] [--kernels torch.flex]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import paged_generate as P  # noqa: E402

import layerzero as lz  # noqa: E402

KERNELS = ("torch.flex", "torch.sdpa_efficient", "torch.sdpa_cudnn", "torch.sdpa")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--columns", nargs="+", type=int, default=[4096], help="static-cache widths, in turn")
    ap.add_argument("--kernels", nargs="+", default=list(KERNELS))
    args = ap.parse_args()
    _, prompt_mask, _ = P.prompts(P.setup(False))          # (32, 4000), left-padded
    for sk in args.columns:
        print(f"(32, 32 / 8, 4032, {sk}), d64, bf16", flush=True)
        one(prompt_mask, 4032, sk, args.kernels)


def one(prompt_mask, n: int, sk: int, kernels):
    keys = torch.zeros(32, sk, dtype=torch.bool, device="cuda")
    keys[:, :n] = torch.nn.functional.pad(prompt_mask, (n - prompt_mask.shape[1], 0)).bool()
    mask = torch.ones(n, sk, dtype=torch.bool, device="cuda").tril()[None, None] & keys[:, None, None, :]
    q = torch.randn(32, 32, n, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(32, 8, sk, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    rows = mask.any(-1)[..., None]
    print("chosen:", lz.which("attention", q, k, v, attn_mask=mask), flush=True)
    first = None
    for kid in kernels:
        try:
            with lz.use(kid):
                out = lz.attention(q, k, v, attn_mask=mask)
                torch.cuda.synchronize()
                ms = []
                for _ in range(3):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    lz.attention(q, k, v, attn_mask=mask)
                    b.record()
                    torch.cuda.synchronize()
                    ms.append(round(a.elapsed_time(b), 2))
        except Exception as exc:  # noqa: BLE001 - a kernel that can't run this call is reported
            print(kid, "failed", type(exc).__name__, str(exc)[:200], flush=True)
            continue
        first = out if first is None else first
        diff = float(((out.float() - first.float()).abs() * rows).max())
        print(kid, ms, "ms; max diff vs first", diff, flush=True)


if __name__ == "__main__":
    main()
