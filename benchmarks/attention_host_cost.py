"""Host cost per call of tiny, host-bound attention calls on CUDA: F.scaled_dot_product_attention,
lz.attention, and aten's cuDNN op called directly (what torch.sdpa_cudnn's plain path does); plus a
cProfile of lz.attention. Wall time per call of 2000 calls, median of 5.

    PYTHONPATH=$PWD python3 benchmarks/attention_host_cost.py    # on the GPU host
"""
import sys, os, time, statistics, cProfile, pstats
sys.path.insert(0, os.getcwd())
import torch, torch.nn.functional as F
import layerzero as lz
dev = "cuda"
def per_call(fn, n=2000):
    for _ in range(20): fn()
    torch.cuda.synchronize()
    res = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n): fn()
        torch.cuda.synchronize()
        res.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(res)
for name, (b, hq, hk, sq, sk, d, causal) in {"1x512 gqa causal": (1, 32, 8, 512, 512, 128, True),
                                             "decode 1x1k gqa": (1, 32, 8, 1, 1024, 128, False),
                                             "16x512 d64": (16, 16, 16, 512, 512, 64, False)}.items():
    q = torch.randn(b, hq, sq, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(b, hk, sk, d, device=dev, dtype=torch.bfloat16); v = torch.randn_like(k)
    gqa = hq != hk
    fns = {"F.sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa),
           "lz.attention": lambda: lz.attention(q, k, v, is_causal=causal),
           "aten cudnn op": lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, causal, False),
           "torch._cudnn": (lambda: torch._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, causal, False)) if hasattr(torch, "_scaled_dot_product_cudnn_attention") else None,
           "torch._flash (mha only)": (lambda: torch._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)) if not gqa and hasattr(torch, "_scaled_dot_product_flash_attention") else None,
           "torch._fused_sdp_choice": lambda: torch._fused_sdp_choice(q, k, v, None, 0.0, causal, enable_gqa=gqa)}
    print(f"== {name}")
    ref = fns["F.sdpa"]()
    for n, f in fns.items():
        if f is None: print(f"   {n:26s} n/a"); continue
        try:
            out = f(); o = out[0] if isinstance(out, tuple) else out
            err = (o.float() - ref.float()).abs().max().item() if isinstance(o, torch.Tensor) and o.shape == ref.shape else "-"
            print(f"   {n:26s} {per_call(f):7.2f} us/call  err {err}")
        except Exception as e:
            print(f"   {n:26s} raised {type(e).__name__}: {str(e)[:120]}")
    if name == "1x512 gqa causal":
        f = fns["lz.attention"]
        pr = cProfile.Profile(); pr.enable()
        for _ in range(20000): f()
        pr.disable(); torch.cuda.synchronize()
        pstats.Stats(pr).sort_stats("tottime").print_stats(8)
