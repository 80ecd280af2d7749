"""Per-kernel GPU time and host (enqueue) time on CUDA: rms_norm (with and without residual),
swiglu, rope for every kernel LayerZero has (our Triton kernels with their direct launch, see
layerzero/backends/_triton_launch.py), and flash-attn-4 with q/k/v in different memory layouts.

For each: "loop" = CUDA-event time per call of 50 back-to-back calls (host cost included),
"graph(GPU)" = per call inside a captured CUDA graph (kernel time alone), "host" = wall time per
call to enqueue; maxerr vs a float64 reference. The numbers behind priorities.py's size rules.

    PYTHONPATH=$PWD python3 benchmarks/kernels_micro.py      # on the GPU host (~1 min)
"""
import sys, os, time, statistics
sys.path.insert(0, os.getcwd())
import torch
import layerzero as lz
from layerzero import registry, reference
dev = "cuda"
def loop(fn, n):
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(n): fn()
    e1.record(); e1.synchronize(); return e0.elapsed_time(e1) / n * 1e3
def host(fn, n=50):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(n): fn()
    t = (time.perf_counter() - t0) / n * 1e6; torch.cuda.synchronize(); return t
def gpu_only(fn):  # GPU time with the host ahead: capture in a CUDA graph
    try:
        s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn(); fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(10): fn()
        return loop(g.replay, 20) / 10
    except Exception as e:
        return float("nan")
def bench(title, fns, ref=None):
    print(f"== {title}")
    for n, f in fns.items():
        try:
            out = f(); torch.cuda.synchronize()
        except Exception as e:
            print(f"   {n:24s} raised {type(e).__name__}: {str(e)[:100]}"); continue
        for _ in range(3): f()
        res = [loop(f, 50) for _ in range(5)]
        err = ""
        if ref is not None:
            o = out[0] if isinstance(out, tuple) else out
            r = ref[0] if isinstance(ref, tuple) else ref
            err = f"maxerr {(o.float() - r.float()).abs().max().item():.3g}"
        print(f"   {n:24s} loop {statistics.median(res):8.1f} us  graph(GPU) {gpu_only(f):8.1f} us  host {host(f):7.1f} us  {err}")
torch.manual_seed(0)
for rows, h in ((2048, 2048), (8192, 4096), (4608 * 24, 128)):
    x = torch.randn(rows, h, device=dev, dtype=torch.bfloat16); w = torch.randn(h, device=dev, dtype=torch.bfloat16)
    r = torch.randn_like(x)
    ref = reference.rms_norm(x.double(), w.double(), 1e-6)
    fns = {kid: (lambda kid=kid: registry.get(kid).fn(x, w, 1e-6, None, 0.0)) for kid in ("torch.rms_norm", "liger.rms_norm", "triton.rms_norm", "flashinfer.rms_norm", "reference.rms_norm")}
    fns["lz.rms_norm"] = lambda: lz.rms_norm(x, w, 1e-6)
    bench(f"rms_norm {rows}x{h} (lz picks {lz.explain('rms_norm', x, w, 1e-6).chosen})", fns, ref)
    refr = reference.rms_norm(x.double(), w.double(), 1e-6, residual=r.double())
    fns = {kid: (lambda kid=kid: registry.get(kid).fn(x, w, 1e-6, r, 0.0)) for kid in ("torch.rms_norm", "liger.rms_norm", "triton.rms_norm", "flashinfer.rms_norm")}
    bench(f"rms_norm+residual {rows}x{h} (lz picks {lz.explain('rms_norm', x, w, 1e-6, residual=r).chosen})", fns, refr)
for rows, h in ((1, 8192), (2048, 8192), (8192, 14336)):
    g = torch.randn(rows, h, device=dev, dtype=torch.bfloat16); u = torch.randn_like(g)
    fns = {kid: (lambda kid=kid: registry.get(kid).fn(g, u)) for kid in ("triton.swiglu", "liger.swiglu", "reference.swiglu")}
    fns["lz.swiglu"] = lambda: lz.swiglu(g, u)
    bench(f"swiglu {rows}x{h} (lz picks {lz.explain('swiglu', g, u).chosen})", fns, reference.swiglu(g.double(), u.double()))
import transformers.models.llama.modeling_llama as ML
for s_, hq, hk, d in ((2048, 32, 8, 64), (8192, 32, 8, 128)):
    q = torch.randn(1, s_, hq, d, device=dev, dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(1, s_, hk, d, device=dev, dtype=torch.bfloat16).transpose(1, 2)
    ang = torch.randn(1, s_, d // 2, device=dev)
    cos = torch.cat([ang.cos()] * 2, -1).to(torch.bfloat16); sin = torch.cat([ang.sin()] * 2, -1).to(torch.bfloat16)
    ref = reference.rope(q.double(), k.double(), cos.double(), sin.double())
    fns = {kid: (lambda kid=kid: registry.get(kid).fn(q, k, cos, sin, "bhsd", False)) for kid in ("triton.rope", "liger.rope", "flashinfer.rope", "reference.rope")}
    fns["hf eager"] = lambda: ML.apply_rotary_pos_emb(q, k, cos, sin)
    bench(f"rope q{tuple(q.shape)} (lz picks {lz.explain('rope', q, k, cos, sin).chosen})", fns, ref)
# FA4 layouts
from layerzero.backends import flash_attn as FA
for s_ in (2048, 8192):
    qb = torch.randn(1, s_, 32, 128, device=dev, dtype=torch.bfloat16); kb = torch.randn(1, s_, 8, 128, device=dev, dtype=torch.bfloat16); vb = torch.randn_like(kb)
    kh = kb.transpose(1, 2).contiguous().transpose(1, 2); vh = vb.transpose(1, 2).contiguous().transpose(1, 2)
    qh = qb.transpose(1, 2).contiguous().transpose(1, 2)
    fns = {"fa4 bshd-contig": lambda: FA.fa4_impl(qb, kb, vb, 128 ** -0.5, True, -1, 0, 0.0, None, 1),
           "fa4 q bshd, kv head-major": lambda: FA.fa4_impl(qb, kh, vh, 128 ** -0.5, True, -1, 0, 0.0, None, 1),
           "fa4 all head-major": lambda: FA.fa4_impl(qh, kh, vh, 128 ** -0.5, True, -1, 0, 0.0, None, 1),
           "sdpa (cudnn) bhsd": lambda: torch.nn.functional.scaled_dot_product_attention(qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2), is_causal=True, enable_gqa=True)}
    bench(f"attention 1x{s_} gqa causal layouts", fns)
