"""Where the host time of one of our Triton launches goes (RoPE of a 1B llama layer: q (1, 32,
2048, 64), k (1, 8, 2048, 64), bf16), on the GPU host: the whole call, `Launch.__call__` with
prepared arguments, the compiled kernel's launcher alone, Triton's JIT entry, the specialisation
key, the two output allocations, and two torch launches for scale. Enqueue time per call (the GPU
is kept busy by torch.cuda._sleep), median of 5 loops of 500 calls; then a cProfile of the
launcher. The numbers behind layerzero/backends/_triton_launch.py and the per-shape launch plans
of _triton_impl.

    PYTHONPATH=$PWD python3 benchmarks/triton_launch_cost.py
"""
import sys, os, time, statistics
sys.path.insert(0, os.getcwd())
import torch
from layerzero.backends import _triton_impl as T
from triton.runtime import driver
def host(fn, n=2000):
    for _ in range(50): fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(3e8))           # GPU busy: time enqueue only (queue well below its limit)
    t0 = time.perf_counter()
    for _ in range(n // 4): fn()
    t = (time.perf_counter() - t0) / (n // 4) * 1e6
    torch.cuda.synchronize(); return t
def med(fn): return round(statistics.median(host(fn) for _ in range(5)), 2)
q = torch.randn(1, 2048, 32, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
k = torch.randn(1, 2048, 8, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
ang = torch.rand(2048, 64, device="cuda"); cos, sin = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)
T.rope(q, k, cos, sin, "bhsd", False); T.rope(q, k, cos, sin, "bhsd", False)
(static, (la, grid, ints, meta)), = T._rope_plans.items()     # the per-shape plan rope made
compiled = next(iter(la.entries.values()))[0]
qo, ko = torch.empty_like(q), torch.empty(k.shape, dtype=k.dtype, device="cuda")
args = (q, k, qo, ko, cos, sin, *ints)
print("kernel", la.kernel)
stream = driver.active.get_current_stream(0)
head = (grid[0], grid[1], 1, stream, compiled.function, compiled.packed_metadata, None, None, None)
full = args + la._tail(meta, la.all_params)
run = compiled.run
x = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
print("triton", __import__("triton").__version__, "all_params", la.all_params, "direct", la.direct)
print("T.rope full                  ", med(lambda: T.rope(q, k, cos, sin, "bhsd", False)), "us")
print("Launch.__call__ (prepared)   ", med(lambda: la(grid, args, meta)), "us")
print("Launch.__call__ (plan key)   ", med(lambda: la(grid, args, meta, static)), "us")
print("compiled.run (prepared)      ", med(lambda: run(*head, *full)), "us")
print("JIT kernel[grid]             ", med(lambda: la.kernel[grid](*args, **meta)), "us")
print("spec key                     ", med(lambda: (0, __import__('layerzero.backends._triton_launch', fromlist=['x']).spec_key(args, 6), tuple(meta.items()))), "us")
print("plan key (shapes, strides)   ", med(lambda: (q.shape, q.stride(), k.shape, k.stride(), cos.shape, cos.stride(), sin.shape, sin.stride(), "bhsd", False)), "us")
print("2x empty                     ", med(lambda: (torch.empty_like(q), torch.empty(k.shape, dtype=k.dtype, device="cuda"))), "us")
print("torch x.mul_(1) (one launch) ", med(lambda: x.mul_(1.0)), "us")
print("torch.rms_norm               ", med(lambda: torch.rms_norm(x, (2048,), None, 1e-6)), "us")
print("current_device+stream        ", med(lambda: driver.active.get_current_stream(torch.cuda.current_device())), "us")
import cProfile, pstats
pr = cProfile.Profile(); pr.enable()
for _ in range(3000): run(*head, *full)
pr.disable(); torch.cuda.synchronize()
pstats.Stats(pr).sort_stats("tottime").print_stats(8)
