"""Tiny, host-bound attention calls on CUDA: host+GPU time per call (loop of 2000, median of 7) and
GPU time alone (CUDA graph) of F.sdpa, lz.attention, and candidate direct paths (aten's cuDNN, flash
and efficient ops; GQA as heads-as-batch with stride-0 K/V, decode with query groups as queries).
Needs only torch on the GPU host:

    PYTHONPATH=$PWD python3 benchmarks/attention_tiny_paths.py
"""
import sys, os, time, statistics
sys.path.insert(0, os.getcwd())
import torch, torch.nn.functional as F
import layerzero as lz
dev = "cuda"
def per_call(fn, n=2000):
    for _ in range(20): fn()
    torch.cuda.synchronize(); res = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(n): fn()
        torch.cuda.synchronize(); res.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(res)
def gpu(fn):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(); fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            for _ in range(20): fn()
    except Exception as e:
        return float("nan")
    for _ in range(3): g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(10): g.replay()
    e1.record(); e1.synchronize(); return e0.elapsed_time(e1) / 200 * 1e3
FL = getattr(torch, "_scaled_dot_product_flash_attention", None)
EF = getattr(torch, "_scaled_dot_product_efficient_attention", None)
CU = getattr(torch, "_scaled_dot_product_cudnn_attention", None)
for name, (b, hq, hk, sq, sk, d, causal) in {"1x512 gqa causal": (1, 32, 8, 512, 512, 128, True),
        "decode 1x1k gqa": (1, 32, 8, 1, 1024, 128, False), "decode 64x4k gqa": (64, 32, 8, 1, 4096, 128, False),
        "16x512 d64": (16, 16, 16, 512, 512, 64, False), "8x1k d64 causal": (8, 16, 16, 1024, 1024, 64, True),
        "2x1k d64 alibi-less": (2, 16, 16, 1024, 1024, 64, False)}.items():
    q = torch.randn(b, hq, sq, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(b, hk, sk, d, device=dev, dtype=torch.bfloat16); v = torch.randn_like(k)
    g = hq // hk
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=g > 1)
    fns = {"F.sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=g > 1),
           "lz.attention": lambda: lz.attention(q, k, v, is_causal=causal),
           "cudnn op": lambda: CU(q, k, v, None, False, 0.0, causal, False)[0]}
    if g > 1:
        qb = q.view(b * hk, g, sq, d)
        kb = k.view(b * hk, 1, sk, d).expand(b * hk, g, sk, d); vb = v.view(b * hk, 1, sk, d).expand(b * hk, g, sk, d)
        fns["flash op, heads as batch, K/V stride 0"] = lambda: FL(qb, kb, vb, 0.0, causal)[0].view(b, hq, sq, d)
        if sq == 1:
            qg = q.view(b, hk, g, d)
            fns["flash op, decode groups as queries"] = lambda: FL(qg, k, v, 0.0, False)[0].view(b, hq, 1, d)
            fns["cudnn op, decode groups as queries"] = lambda: CU(qg, k, v, None, False, 0.0, False, False)[0].view(b, hq, 1, d)
            fns["efficient op, groups as queries"] = lambda: EF(qg, k, v, None, False, 0.0, False)[0].view(b, hq, 1, d)
    else:
        fns["flash op"] = lambda: FL(q, k, v, 0.0, causal)[0]
        fns["efficient op"] = lambda: EF(q, k, v, None, False, 0.0, causal)[0]
    print(f"== {name}", flush=True)
    for n, f in fns.items():
        try:
            o = f(); err = (o.float() - ref.float()).abs().max().item()
            print(f"   {n:42s} host+GPU {per_call(f):7.2f} us/call   GPU {gpu(f):7.2f} us   err {err:.3g}", flush=True)
        except Exception as e:
            print(f"   {n:42s} raised {type(e).__name__}: {str(e)[:150]}", flush=True)
