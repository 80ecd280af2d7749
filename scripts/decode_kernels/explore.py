"""The kernels of a decode step on the 1B llama shape (bf16, CUDA), alone, each inside a CUDA
graph (as lz.generate replays them), with the weights rotated through enough copies that none
stays in L2:

  gemv   the step's matrix-vector products at batch 1 and 8: cuBLAS (F.linear), inductor with
         coordinate-descent tuning (what lz.generate's batch-1 step compiles; for the MLP also
         its fused form down(silu(gate) * up)), and candidate Triton kernels gemv / gated_gemv
         (gemv.py here) over a sweep of launch configurations
  attn   decode attention, 32 q / 8 kv heads, d64, a (B, 1, 1, L) bool mask over a static
         cache of L keys: SDPA (what the step runs, cuDNN there; each of its kernels forced, with
         GQA as enable_gqa and packed as query rows of the kv heads) and a candidate split-KV
         Triton decode kernel (attention.py here) over key splits (not with --quick)

The candidates lost (benchmarks/RESULTS.md, "Issue 13, third session"), so they live here, not
in the library.

    PYTHONPATH=$PWD python3 scripts/decode_kernels/explore.py --json $OUT/decode_kernels.json
"""
import argparse
import contextlib
import itertools
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attention as TD  # noqa: E402
from _timing import copy_bandwidth, graph_us  # noqa: E402
import gemv as TG  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--json", default="")
ap.add_argument("--what", nargs="*", default=["gemv", "attn"])
ap.add_argument("--quick", action="store_true", help="fewer configurations; no Triton attention sweep")
args = ap.parse_args()

dev = "cuda"
bf = torch.bfloat16
out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "gemv": [], "attn": []}
ROTATE = 320 << 20          # bytes of weights cycled through per timing (L2 is 50-60 MB)


def save():
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


out["copy_GBps"] = round(copy_bandwidth(dev) / 1e9, 1)
print(out, flush=True)

SHAPES = {"q/o": (2048, 2048), "k/v": (512, 2048), "qkv": (3072, 2048), "gate|up": (8192, 2048),
          "down": (2048, 8192), "lm_head": (128256, 2048)}


def weights(n, k, count_factor=1):
    per = n * k * 2 * count_factor
    copies = max(2, math.ceil(ROTATE / per))
    return [torch.randn(n, k, device=dev, dtype=bf) * 0.02 for _ in range(copies * count_factor)]


def gemv_configs(m, gated):
    bm = TG._pow2(m)
    bns = [2, 4, 8, 16] if not args.quick else [4, 8]
    bks = ([256, 512, 1024] if bm == 1 else [128, 256, 512]) if not args.quick else [256, 512]
    for bn, bk, w, st in itertools.product(bns, bks, [4, 8], [1, 3]):
        if bm * bn * bk > 32768 or (gated and bm * bn * bk > 16384):
            continue
        yield dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st)


def run_gemv():
    import torch._inductor.config as icfg
    for name, (n, k) in SHAPES.items():
        ws = weights(n, k)
        for m in (1, 8):
            x = torch.randn(m, k, device=dev, dtype=bf)
            rec = {"shape": name, "N": n, "K": k, "M": m, "bytes": n * k * 2}
            ref = F.linear(x, ws[0]).float()
            rec["cublas_us"] = graph_us([lambda w=w: F.linear(x, w) for w in ws])
            torch._dynamo.reset()
            with icfg.patch(coordinate_descent_tuning=True):
                f = torch.compile(lambda x, w: F.linear(x, w), fullgraph=True, dynamic=False)
                f(x, ws[0])
                rec["inductor_cdt_us"] = graph_us([lambda w=w: f(x, w) for w in ws])
            res = []
            for cfg in gemv_configs(m, False):
                try:
                    y = TG.gemv(x, ws[0], cfg)
                    err = (y.float() - ref).abs().max().item()
                    us = graph_us([lambda w=w: TG.gemv(x, w, cfg) for w in ws])
                    res.append((us, cfg, err))
                except Exception as e:  # a configuration that does not compile
                    res.append((float("inf"), cfg, repr(e)[:120]))
            res.sort(key=lambda r: r[0])
            rec["triton_best"] = [{"us": r[0], "cfg": r[1], "err": r[2]} for r in res[:5]]
            dflt = TG.config(m, n, k, False)
            rec["triton_default_us"] = graph_us([lambda w=w: TG.gemv(x, w) for w in ws])
            rec["triton_default_cfg"] = dflt
            for key in ("cublas_us", "inductor_cdt_us", "triton_default_us"):
                rec[key.replace("_us", "_TBps")] = round(n * k * 2 / rec[key] / 1e6, 2)
            rec["triton_best_TBps"] = round(n * k * 2 / res[0][0] / 1e6, 2)
            print(json.dumps(rec), flush=True)
            out["gemv"].append(rec)
            save()
        del ws
        torch.cuda.empty_cache()
    # the gated MLP: gate and up projections and SiLU (then the down projection)
    n, k = SHAPES["gate|up"]
    wg, wu, wd = weights(n, k), weights(n, k), weights(k, n)
    for m in (1, 8):
        x = torch.randn(m, k, device=dev, dtype=bf)
        rec = {"shape": "gated_mlp", "N": n, "K": k, "M": m, "bytes": 3 * n * k * 2}
        ref = (F.silu(F.linear(x, wg[0]).float()) * F.linear(x, wu[0]).float())
        rec["cublas_3_us"] = graph_us([lambda i=i: F.linear(F.silu(F.linear(x, wg[i])) * F.linear(x, wu[i]), wd[i])
                                       for i in range(len(wg))])
        torch._dynamo.reset()
        with icfg.patch(coordinate_descent_tuning=True):
            f = torch.compile(lambda x, a, b, c: F.linear(F.silu(F.linear(x, a)) * F.linear(x, b), c),
                              fullgraph=True, dynamic=False)
            f(x, wg[0], wu[0], wd[0])
            rec["inductor_cdt_us"] = graph_us([lambda i=i: f(x, wg[i], wu[i], wd[i]) for i in range(len(wg))])
        res = []
        for cfg in gemv_configs(m, True):
            try:
                y = TG.gated_gemv(x, wg[0], wu[0], "silu", cfg)
                err = (y.float() - ref).abs().max().item()
                us = graph_us([lambda i=i: TG.gated_gemv(x, wg[i], wu[i], "silu", cfg) for i in range(len(wg))])
                res.append((us, cfg, err))
            except Exception as e:
                res.append((float("inf"), cfg, repr(e)[:120]))
        res.sort(key=lambda r: r[0])
        rec["gated_best"] = [{"us": r[0], "cfg": r[1], "err": r[2]} for r in res[:5]]
        rec["triton_mlp_us"] = graph_us([lambda i=i: TG.gemv(TG.gated_gemv(x, wg[i], wu[i], "silu", res[0][1]), wd[i])
                                         for i in range(len(wg))])
        rec["triton_mlp_TBps"] = round(3 * n * k * 2 / rec["triton_mlp_us"] / 1e6, 2)
        rec["inductor_cdt_TBps"] = round(3 * n * k * 2 / rec["inductor_cdt_us"] / 1e6, 2)
        print(json.dumps(rec), flush=True)
        out["gemv"].append(rec)
        save()


def run_attn():
    hq, hkv, d = 32, 8, 64
    for b, length, filled in ((1, 256, 200), (8, 256, 200), (1, 2304, 2100), (8, 2304, 2100)):
        per = b * hkv * length * d * 2 * 2
        copies = max(2, math.ceil(ROTATE / per))
        q = torch.randn(b, hq, 1, d, device=dev, dtype=bf)
        kv = [(torch.randn(b, hkv, length, d, device=dev, dtype=bf),
               torch.randn(b, hkv, length, d, device=dev, dtype=bf)) for _ in range(copies)]
        mask = torch.zeros(b, 1, 1, length, dtype=torch.bool, device=dev)
        mask[..., :filled] = True
        mask[0, ..., :7] = False
        rec = {"B": b, "L": length, "filled": filled, "kv_bytes": per}
        k0, v0 = kv[0]
        ref = F.scaled_dot_product_attention(q.float(), k0.float().repeat_interleave(4, 1),
                                             v0.float().repeat_interleave(4, 1), attn_mask=mask)
        rec["sdpa_gqa_us"] = graph_us([lambda k=k, v=v: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=True) for k, v in kv])
        rec["sdpa_expand_us"] = graph_us([lambda k=k, v=v: F.scaled_dot_product_attention(
            q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=mask) for k, v in kv])
        torch._dynamo.reset()
        f = torch.compile(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True),
                          fullgraph=True, dynamic=False)
        f(q, k0, v0, mask)
        rec["sdpa_compiled_us"] = graph_us([lambda k=k, v=v: f(q, k, v, mask) for k, v in kv])
        # SDPA's kernels forced one by one, with GQA as enable_gqa and "packed": the G query heads
        # of a kv head as G query rows of one head (right for one query token: the rows share
        # their mask), so each kernel reads every K/V head once with no GQA handling
        qp = q.view(b, hkv, hq // hkv, d)
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                              ("any", None)):
            for form in ("gqa", "packed"):
                def call(k, v, backend=backend, form=form):
                    with contextlib.ExitStack() as st:
                        if backend is not None:
                            st.enter_context(sdpa_kernel([backend]))
                        if form == "gqa":
                            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
                        return F.scaled_dot_product_attention(qp, k, v, attn_mask=mask).view(b, hq, 1, d)
                try:
                    err = (call(k0, v0).float() - ref).abs().max().item()
                    rec[f"{form}_{name}_us"] = graph_us([lambda k=k, v=v: call(k, v) for k, v in kv])
                    rec[f"{form}_{name}_err"] = err
                except Exception as e:
                    rec[f"{form}_{name}_us"] = repr(e)[:160]
        if args.quick:
            print(json.dumps(rec), flush=True)
            out["attn"].append(rec)
            save()
            continue
        res = []
        for splits, bs in itertools.product([1, 2, 4, 8, 16, 32], [16, 32, 64]):
            if splits * 16 > length:
                continue
            try:
                o = TD.decode_attention(q, k0, v0, mask, splits=splits, block_s=bs)
                err = (o.float() - ref).abs().max().item()
                us = graph_us([lambda k=k, v=v: TD.decode_attention(q, k, v, mask, splits=splits, block_s=bs)
                               for k, v in kv])
                res.append((us, splits, bs, err))
            except Exception as e:
                res.append((float("inf"), splits, bs, repr(e)[:120]))
        res.sort(key=lambda r: r[0])
        rec["triton_best"] = [{"us": r[0], "splits": r[1], "block_s": r[2], "err": r[3]} for r in res[:6]]
        rec["triton_default_us"] = graph_us([lambda k=k, v=v: TD.decode_attention(q, k, v, mask) for k, v in kv])
        rec["triton_default_splits"] = TD.splits_for(b, hkv, length)
        print(json.dumps(rec), flush=True)
        out["attn"].append(rec)
        save()


t0 = time.time()
if "attn" in args.what:
    run_attn()
if "gemv" in args.what:
    run_gemv()
out["seconds"] = round(time.time() - t0, 1)
save()
print("done", out["seconds"], "s", flush=True)
