"""Skinny products of a decode step on the tensor cores: (M, K) activations x (N, K) weights with
M = 1-16 rows (padded to 16 for tl.dot), each program owning BLOCK_N output columns over all of K
(no split, no second kernel), against cuBLAS's own choice (F.linear). gemv.py's kernels multiplied
on the CUDA cores in fp32 and fell under 1 TB/s at batch 8; here the tensor cores do the products
and the programs are only bound by reading their weight rows. Each variant is cycled inside one CUDA
graph over enough weight copies that none stays in L2 (as explore.py and splitk.py).

    PYTHONPATH=$PWD python3 scripts/decode_kernels/skinny.py --json $OUT/skinny.json
"""
import argparse
import itertools
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import copy_bandwidth, graph_us  # noqa: E402


@triton.jit
def _skinny_kernel(X, W, Y, M, N, K, sxm, swn, sym,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    x_ptr = X + rm[:, None] * sxm + rk[None, :]
    w_ptr = W + tl.where(n_ok, rn, 0).to(tl.int64)[None, :] * swn + rk[:, None]   # (BLOCK_K, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr, mask=m_ok[:, None] & (k0 + rk[None, :] < K), other=0.0)
        w = tl.load(w_ptr, mask=(k0 + rk[:, None] < K), other=0.0)
        acc = tl.dot(x, w, acc)
        x_ptr += BLOCK_K
        w_ptr += BLOCK_K
    tl.store(Y + rm[:, None] * sym + rn[None, :], acc.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def skinny(x, w, bn, bk, warps, stages):
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    _skinny_kernel[(triton.cdiv(n, bn),)](x, w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
                                          BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk,
                                          num_warps=warps, num_stages=stages)
    return y


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="")
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 1])
    ap.add_argument("--shapes", nargs="+", default=["o", "qkv", "gate+up", "down"])
    ap.add_argument("--quick", action="store_true", help="a small sweep")
    args = ap.parse_args()
    dev, bf = "cuda", torch.bfloat16
    rotate = 320 << 20
    shapes = {"o": (2048, 2048), "qkv": (3072, 2048), "gate+up": (16384, 2048), "down": (2048, 8192),
              "lm_head": (128256, 2048)}
    sweep = (list(itertools.product([16, 32], [128, 256], [4], [4]))
             if args.quick else
             list(itertools.product([16, 32, 64], [128, 256, 512], [2, 4], [3, 5])))
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "copy_GBps": round(copy_bandwidth(dev) / 1e9, 1), "rows": []}
    print(out, flush=True)
    for m in args.batch:
        for name in args.shapes:
            n, k = shapes[name]
            copies = max(2, math.ceil(rotate / (n * k * 2)))
            ws = [torch.randn(n, k, device=dev, dtype=bf) / k ** 0.5 for _ in range(copies)]
            x = torch.randn(m, k, device=dev, dtype=bf)
            ref = x.double() @ ws[0].double().t()
            row = {"M": m, "what": name, "N": n, "K": k, "MB": round(n * k * 2 / 1e6, 1)}
            row["linear_err"] = (F.linear(x, ws[0]).double() - ref).abs().max().item()
            row["linear_us"] = graph_us([lambda w=w: F.linear(x, w) for w in ws])
            results = []
            for bn, bk, warps, stages in sweep:
                if bk > k or bn * bk * 2 * stages > 160_000:
                    continue
                try:
                    err = (skinny(x, ws[0], bn, bk, warps, stages).double() - ref).abs().max().item()
                    us = graph_us([lambda w=w: skinny(x, w, bn, bk, warps, stages) for w in ws], replays=5)
                    results.append((us, (bn, bk, warps, stages), err))
                except Exception as e:  # noqa: BLE001 - a config that does not compile or fit
                    results.append((float("inf"), (bn, bk, warps, stages), repr(e)[:100]))
            results.sort(key=lambda r: r[0])
            best = results[0]
            row.update(skinny_us=best[0], skinny_cfg=best[1], skinny_err=best[2],
                       top=[(round(r[0], 2), r[1]) for r in results[:5]],
                       linear_TBps=round(n * k * 2 / row["linear_us"] / 1e6, 2),
                       skinny_TBps=round(n * k * 2 / best[0] / 1e6, 2),
                       speedup=round(row["linear_us"] / best[0], 3))
            print(json.dumps({kk: (round(v, 2) if isinstance(v, float) and kk.endswith("_us") else v)
                              for kk, v in row.items()}), flush=True)
            out["rows"].append(row)
            del ws
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
