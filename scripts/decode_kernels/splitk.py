"""Skinny products of a batch-8 decode step (bf16, H200): cuBLAS's own choice (F.linear) against
an explicit split over K (a strided-batched GEMM over S slices of K, then a sum over the slices),
which gives cuBLAS S times as many output tiles to spread over the SMs. Each variant is cycled
inside one CUDA graph over enough weight copies that none stays in L2 (as explore.py).

    PYTHONPATH=$PWD python3 scripts/decode_kernels/splitk.py --json $OUT/splitk.json
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import copy_bandwidth, graph_us  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--json", default="")
ap.add_argument("--batch", type=int, nargs="+", default=[8, 1])
args = ap.parse_args()
dev, bf = "cuda", torch.bfloat16
ROTATE = 320 << 20
SHAPES = {"o": (2048, 2048), "qkv": (3072, 2048), "gate+up": (16384, 2048), "down": (2048, 8192),
          "lm_head": (128256, 2048)}
out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_GBps": round(copy_bandwidth(dev) / 1e9, 1),
       "rows": []}
print(out, flush=True)


def split_k(x, w, s, fp32):
    m, k = x.shape
    n = w.shape[0]
    xs = x.view(m, s, k // s).transpose(0, 1)            # (S, M, K/S)
    ws = w.view(n, s, k // s).permute(1, 2, 0)           # (S, K/S, N), column-major slices
    if fp32:
        return torch.bmm(xs, ws, out_dtype=torch.float32).sum(0).to(x.dtype)
    return torch.bmm(xs, ws).sum(0, dtype=torch.float32).to(x.dtype)


for m in args.batch:
    for name, (n, k) in SHAPES.items():
        copies = max(2, math.ceil(ROTATE / (n * k * 2)))
        ws = [torch.randn(n, k, device=dev, dtype=bf) / k ** 0.5 for _ in range(copies)]
        x = torch.randn(m, k, device=dev, dtype=bf)
        ref = (x.double() @ ws[0].double().t())
        row = {"M": m, "what": name, "N": n, "K": k, "MB": round(n * k * 2 / 1e6, 1)}
        base = F.linear(x, ws[0])
        row["linear_err"] = (base.double() - ref).abs().max().item()
        row["linear_us"] = graph_us([lambda w=w: F.linear(x, w) for w in ws])
        for s in (2, 4, 8, 16):
            for fp32 in (True, False):
                key = f"split{s}{'_f32' if fp32 else ''}"
                try:
                    o = split_k(x, ws[0], s, fp32)
                    row[key + "_err"] = (o.double() - ref).abs().max().item()
                    row[key + "_us"] = graph_us([lambda w=w: split_k(x, w, s, fp32) for w in ws])
                except Exception as e:  # noqa: BLE001
                    row[key + "_us"] = repr(e)[:120]
        best = min((v, kk) for kk, v in row.items() if kk.endswith("_us") and isinstance(v, float))
        row["best"] = best[1]
        row["best_TBps"] = round(n * k * 2 / best[0] / 1e6, 2)
        row["linear_TBps"] = round(n * k * 2 / row["linear_us"] / 1e6, 2)
        print(json.dumps({kk: (round(v, 2) if isinstance(v, float) and kk.endswith("_us") else v) for kk, v in row.items()}), flush=True)
        out["rows"].append(row)
        del ws
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
