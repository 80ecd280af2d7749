"""Where the time goes, on the GPU host: torch.profiler tables (by GPU and by CPU time) per variant
of the end-to-end benchmarks' models (transformers 1b / 8b8: sdpa, lz.patch, sdpa + Liger; Flux step:
native, lz.patch), wall vs host-enqueue time, and CUDA sync points in the LayerZero variant
(torch.cuda.set_sync_debug_mode). One file per model under $OUT (prof_1b.txt, ...).

    PYTHONPATH=$PWD OUT=/tmp python3 benchmarks/profile_e2e.py 1b 8b8 flux
"""
import sys, os, time, statistics, warnings, traceback, collections
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import torch
import layerzero as lz
from torch.profiler import profile, ProfilerActivity
OUT = os.environ.get("OUT", "/tmp")
which = sys.argv[1:] or ["1b", "8b8", "flux"]

def wall(fn, n=10):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    ts, hs = [], []
    for _ in range(n):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(); t0 = time.perf_counter(); fn(); t1 = time.perf_counter(); e1.record(); torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1)); hs.append((t1 - t0) * 1e3)
    return statistics.median(ts), statistics.median(hs)

def prof(tag, fn, f):
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(2): fn()
        torch.cuda.synchronize()
    ka = p.key_averages()
    gpu_total = sum(e.self_device_time_total for e in ka) / 2e3
    print(f"\n==== {tag}: GPU busy per iter {gpu_total:.2f} ms", file=f)
    print(ka.table(sort_by="self_cuda_time_total", row_limit=28, max_name_column_width=70), file=f)
    print(ka.table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=70), file=f)
    # sync points
    syncs = [e for e in ka if any(s in e.key for s in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaEventSynchronize", "item", "_local_scalar_dense"))]
    for e in syncs: print(f"  SYNC-ish {e.key}: count {e.count/2}", file=f)

def syncdebug(tag, fn, f):
    torch.cuda.set_sync_debug_mode(1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always"); fn(); torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(0)
    c = collections.Counter(str(x.message).splitlines()[0][:120] + " @ " + f"{x.filename}:{x.lineno}" for x in w)
    print(f"\n==== {tag}: sync debug warnings {sum(c.values())}", file=f)
    for k, n in c.most_common(10): print(f"  {n}x {k}", file=f)

def variant(tag, is_lz, fn, f):
    """Wall vs host-enqueue time, (for LayerZero) the kernels it ran and its sync points, then
    the profiler tables, of one variant."""
    lz.reset_metrics()
    w, h = wall(fn)
    print(f"\n#### {tag}: wall {w:.2f} ms, host enqueue {h:.2f} ms", file=f, flush=True)
    if is_lz:
        print("  kernels:", lz.metrics()["calls"], file=f)
        syncdebug(tag, fn, f)
    prof(tag, fn, f)
    f.flush()

def transformers_shape(label, f):
    import e2e_transformers as E
    shape = E.SHAPES[label]
    saved = dict(vars(E._modeling()))
    model = E.build(shape, "cuda", torch.bfloat16)
    ids = torch.randint(0, shape["vocab_size"], (1, shape["tokens"]), device="cuda")
    def fn():
        with torch.inference_mode():
            return E.prefill(model, ids)
    for name in ("sdpa", "layerzero", "sdpa+liger"):
        E.set_variant(model, name)
        variant(f"{label} {name}", name == "layerzero", fn, f)
    E._restore_modeling(saved)
    del model; torch.cuda.empty_cache()

def flux(f):
    import e2e_diffusers as D
    model, inputs = D.build(D.FULL, "cuda", torch.bfloat16)
    def fn():
        with torch.inference_mode():
            return model(**inputs, return_dict=False)[0]
    for name in ("native", "layerzero"):
        if name == "layerzero": lz.patch(model)
        variant(f"flux {name}", name == "layerzero", fn, f)

for w in which:
    with open(os.path.join(OUT, f"prof_{w}.txt"), "w") as f:
        try:
            flux(f) if w == "flux" else transformers_shape(w, f)
        except Exception:
            traceback.print_exc(file=f)
    print(open(os.path.join(OUT, f"prof_{w}.txt")).read()[:3000])
