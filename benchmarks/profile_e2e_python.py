"""Host (Python) time of the 1B llama prefill, on the GPU host: sdpa vs lz.patch per forward (10
forwards, 5 interleaved rounds), then a cProfile of 10 forwards of each (top 32 by own time).

    PYTHONPATH=$PWD python3 benchmarks/profile_e2e_python.py
"""
import os, sys, time, statistics, cProfile, pstats, io, torch
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import layerzero as lz
import e2e_transformers as E
shape = E.SHAPES["1b"]
model = E.build(shape, "cuda", torch.bfloat16)
ids = torch.randint(0, shape["vocab_size"], (1, shape["tokens"]), device="cuda")
def fwd():
    with torch.inference_mode():
        return E.prefill(model, ids)
def t(n=10):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(n): fwd()
    torch.cuda.synchronize(); return (time.perf_counter() - t0) / n * 1e3
res = {"sdpa": [], "layerzero": []}
for r in range(5):
    for v in res:
        E.set_variant(model, v); fwd(); fwd()
        res[v].append(t())
for v, xs in res.items(): print(f"{v:10s} {statistics.median(xs):7.2f} ms  {[round(x, 2) for x in xs]}")
for v in ("sdpa", "layerzero"):
    E.set_variant(model, v); fwd(); fwd(); torch.cuda.synchronize()
    pr = cProfile.Profile(); pr.enable()
    for _ in range(10): fwd()
    torch.cuda.synchronize(); pr.disable()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(32); print(f"==== {v}"); print(s.getvalue()[:9000])
