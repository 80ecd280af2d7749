"""What fusing around the kernels LayerZero picks would save, on the GPU host (torch only; the
residual-norm section also times FlashInfer's and Liger's kernels when installed):

  gemm     q/k/v and gate/up projections as one GEMM vs separate (llama 8B and 1B shapes)
  swiglu   silu(gate) * up on contiguous tensors vs halves of a fused gate_up output
  cache    DynamicCache's first update: torch.cat of an empty tensor with K (contiguous) / V (a
           transposed view), what transformers does per layer and lz.patch skips
  addmm    residual + linear(x, W) vs addmm(residual, x, W.T) out of place / addmm_ in place
  resnorm  residual add + RMSNorm: add then a norm vs each kernel's fused residual path
  host     lz.attention's Python dispatch with its kernel replaced by a no-op

    PYTHONPATH=$PWD python3 benchmarks/fusions_micro.py [section ...]
"""
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import layerzero as lz  # noqa: E402
from layerzero import dispatch  # noqa: E402
from _cuda_timing import cuda_time, show  # noqa: E402

DEV, BF = "cuda", torch.bfloat16
SHAPES = ((8192, 4096, 32, 8, 14336), (2048, 2048, 32, 8, 8192))   # tokens, hidden, Hq, Hkv, inter


def gemm_swiglu_cache():
    for m, h, hq, hkv, inter in SHAPES:
        d = h // hq
        x = torch.randn(m, h, device=DEV, dtype=BF)
        wq, wk, wv = (torch.randn(n * d, h, device=DEV, dtype=BF) * 0.02 for n in (hq, hkv, hkv))
        wqkv = torch.cat([wq, wk, wv])
        wg, wu = (torch.randn(inter, h, device=DEV, dtype=BF) * 0.02 for _ in range(2))
        wgu = torch.cat([wg, wu])
        show(f"GEMMs M={m} H={h} I={inter}", cuda_time({
            "q,k,v separate": lambda: (F.linear(x, wq), F.linear(x, wk), F.linear(x, wv)),
            "qkv fused": lambda: F.linear(x, wqkv),
            "gate,up separate": lambda: (F.linear(x, wg), F.linear(x, wu)),
            "gate_up fused": lambda: F.linear(x, wgu)}))
        g, u, gu = F.linear(x, wg), F.linear(x, wu), F.linear(x, wgu)
        show(f"swiglu M={m} I={inter}", cuda_time({
            "silu(g)*u contiguous": lambda: F.silu(g) * u,
            "silu(g)*u halves of fused": lambda: F.silu(gu[:, :inter]) * gu[:, inter:]}))
        v = torch.randn(1, m, hkv, d, device=DEV, dtype=BF).transpose(1, 2)
        k, e = v.contiguous(), torch.tensor([], device=DEV, dtype=BF)
        show(f"DynamicCache first update M={m}", cuda_time({
            "cat(empty, k contiguous)": lambda: torch.cat([e, k], dim=-2),
            "cat(empty, v transposed view)": lambda: torch.cat([e, v], dim=-2)}))


def addmm():
    for m, k, n in ((8192, 4096, 4096), (8192, 14336, 4096), (2048, 2048, 2048), (2048, 8192, 2048)):
        x, w = torch.randn(m, k, device=DEV, dtype=BF), torch.randn(n, k, device=DEV, dtype=BF) * 0.02
        r = torch.randn(m, n, device=DEV, dtype=BF)
        r2 = r.clone()
        show(f"M={m} K={k} N={n}", cuda_time({
            "linear + add": lambda: r + F.linear(x, w),
            "addmm(r, x, w.t())": lambda: torch.addmm(r, x, w.t()),
            "r.addmm_(x, w.t())  (in place)": lambda: r2.addmm_(x, w.t(), beta=1.0),
            "linear": lambda: F.linear(x, w)}))


def resnorm():
    for m, h in ((8192, 4096), (2048, 2048)):
        a, r = torch.randn(m, h, device=DEV, dtype=BF), torch.randn(m, h, device=DEV, dtype=BF)
        w = torch.rand(h, device=DEV, dtype=BF) + 0.5
        fns = {"add, then lz.rms_norm": lambda: lz.rms_norm(a + r, w, 1e-5)}
        for kid in ("triton.rms_norm", "flashinfer.rms_norm", "liger.rms_norm", "torch.rms_norm"):
            def run(kid=kid):
                with lz.use(kid):
                    return lz.rms_norm(a, w, 1e-5, residual=r)
            try:
                run()
            except Exception as e:  # noqa: BLE001 - not installed here: say so
                print(f"   {kid}: {type(e).__name__}: {str(e)[:100]}")
                continue
            fns[f"{kid} residual="] = run
        show(f"residual rms_norm M={m} H={h} (lz picks {lz.which('rms_norm', a, w, 1e-5, residual=r)})",
             cuda_time(fns))


def host():
    q = torch.randn(1, 32, 512, 128, device=DEV, dtype=BF)
    k, v = torch.randn(1, 8, 512, 128, device=DEV, dtype=BF), torch.randn(1, 8, 512, 128, device=DEV, dtype=BF)
    lz.attention(q, k, v, is_causal=True)
    noop = lambda q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None: q  # noqa: E731
    saved = {key: e.plain for key, e in dispatch.fast.items() if key[0] == "attention"}
    for key in saved:
        dispatch.fast[key].plain = noop

    def wall(fn, n=20000):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n * 1e9
    fns = {"no-op called directly": lambda: noop(q, k, v, None, 0.0, True),
           "lz.attention (no-op kernel)": lambda: lz.attention(q, k, v, is_causal=True),
           "(q.shape, k.shape, v.shape)": lambda: (q.shape, k.shape, v.shape)}
    res = {name: [] for name in fns}
    for _ in range(9):
        for name, f in fns.items():
            res[name].append(wall(f))
    show("host Python, ns per call (median of 9)", {n: statistics.median(x) for n, x in res.items()}, "ns")
    for key, p in saved.items():
        dispatch.fast[key].plain = p


SECTIONS = {"gemm": gemm_swiglu_cache, "addmm": addmm, "resnorm": resnorm, "host": host}

if __name__ == "__main__":
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for s in sys.argv[1:] or list(SECTIONS):
        SECTIONS[s]()
