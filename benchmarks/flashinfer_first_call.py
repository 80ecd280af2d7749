"""First calls of a FlashInfer variant nobody has built yet, on a GPU host with flashinfer.

FlashInfer JIT-compiles each kernel variant (dtype, head_dim, window, softcap, ...) with nvcc on
first use. LayerZero builds it on a background thread while calls run the next kernel
(docs/backends.md, "FlashInfer's JIT builds and lz.warmup"). With an empty JIT cache
(FLASHINFER_WORKSPACE_BASE pointed at a fresh directory before flashinfer is imported) this
measures:

1. the first calls of `lz.attention` for a new variant: each call's latency and the kernel that
   ran it, until FlashInfer is selected (or --max-wait runs out); then the latency of calls on
   FlashInfer;
2. `lz.warmup(...)` for a second new variant (another softcap setting): how long it takes and
   what it reports.

Prints a summary and writes JSON to --out. AOT-shipped kernels (flashinfer-jit-cache) make a
variant ready at once; the JSON says whether that happened ("ready_at_once").

    python benchmarks/flashinfer_first_call.py --out first_call.json
    python benchmarks/flashinfer_first_call.py --head-dim 256 --window 512,-1 --softcap 30 --seq-q 1
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="flashinfer_first_call.json", help="JSON report path")
    p.add_argument("--max-wait", type=float, default=300.0,
                   help="seconds to wait for each build (the call loop, then warmup); default 300")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--seq-q", type=int, default=1, help="1: a decode step (FlashInfer's decode kernel "
                   "is preferred there); larger: prefill")
    p.add_argument("--seq-k", type=int, default=4096)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--window", default="1024,-1", help="LEFT,RIGHT or 'none' (default 1024,-1)")
    p.add_argument("--softcap", type=float, default=30.0, help="0 = none (default 30)")
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between calls while building")
    p.add_argument("--no-warmup", action="store_true", help="skip the lz.warmup part (runs against "
                   "packages without lz.warmup too: the 'before' measurement)")
    p.add_argument("--cache-dir", help="FLASHINFER_WORKSPACE_BASE to use (default: a fresh temp dir)")
    a = p.parse_args()
    if a.max_wait <= 0 or a.interval <= 0:
        p.error("--max-wait and --interval must be > 0")
    a.window = None if a.window == "none" else tuple(int(x) for x in a.window.split(","))
    return a


def main() -> int:
    a = parse()
    base = a.cache_dir or tempfile.mkdtemp(prefix="flashinfer-cache-")
    os.environ["FLASHINFER_WORKSPACE_BASE"] = base       # read when flashinfer is imported
    import torch

    if not torch.cuda.is_available():
        print("flashinfer_first_call: needs a CUDA GPU (torch.cuda.is_available() is False)")
        return 2
    import layerzero as lz
    from layerzero import registry

    t0 = time.perf_counter()
    why = registry.module_reason("flashinfer")     # its probe may build the norm module (fresh cache)
    setup_s = time.perf_counter() - t0
    if why:
        print(f"flashinfer_first_call: needs flashinfer ({why})")
        return 2
    lines: list[str] = []
    t_start = time.perf_counter()

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(f"{time.perf_counter() - t_start:8.1f} s  {record.getMessage()}")
    log = logging.getLogger("layerzero")
    log.addHandler(Keep())
    log.setLevel(logging.INFO)

    dtype = getattr(torch, a.dtype)
    g = torch.Generator(device="cuda").manual_seed(0)

    def tensors(head_dim):
        def rn(*s):
            return torch.randn(*s, generator=g, device="cuda", dtype=torch.float32).to(dtype)
        return (rn(a.batch, a.heads, a.seq_q, head_dim), rn(a.batch, a.kv_heads, a.seq_k, head_dim),
                rn(a.batch, a.kv_heads, a.seq_k, head_dim))
    kw = dict(window=a.window, softcap=a.softcap or None, causal_align="bottom_right",
              is_causal=a.seq_q > 1)
    q, k, v = tensors(a.head_dim)

    def timed_call(kwargs=None):
        lz.reset_metrics()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        lz.attention(q, k, v, **(kwargs or kw))
        torch.cuda.synchronize()
        ran = lz.metrics()["calls"].get("attention", {})
        return (time.perf_counter() - t0) * 1e3, next(iter(ran), None)

    t_start = time.perf_counter()
    calls = []
    deadline = t_start + a.max_wait
    while True:
        ms, kernel = timed_call()
        calls.append({"t_s": round(time.perf_counter() - t_start, 2), "ms": round(ms, 3), "kernel": kernel})
        if (kernel or "").startswith("flashinfer.") or time.perf_counter() > deadline:
            break
        time.sleep(a.interval)
    selected_after = calls[-1]["t_s"] if (calls[-1]["kernel"] or "").startswith("flashinfer.") else None
    after = [timed_call() for _ in range(20)] if selected_after is not None else []
    explain = str(lz.explain("attention", q, k, v, **kw))

    kw2 = dict(kw, softcap=None if a.softcap else 30.0)    # a second variant: softcap toggled
    report, warm_s, after_warm = None, None, []
    if not a.no_warmup:
        t0 = time.perf_counter()
        report = lz.warmup("attention", q, k, v, timeout=a.max_wait, **kw2)
        warm_s = time.perf_counter() - t0
        after_warm = [timed_call(kw2) for _ in range(3)]

    out = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "flashinfer": getattr(sys.modules.get("flashinfer"), "__version__", "?"),
        "flashinfer_workspace_base": base,
        "call": {"shape": [a.batch, a.heads, a.kv_heads, a.seq_q, a.seq_k, a.head_dim],
                 "dtype": a.dtype, **{n: (list(x) if isinstance(x, tuple) else x) for n, x in kw.items()}},
        "first_call_ms": calls[0]["ms"], "first_call_kernel": calls[0]["kernel"],
        "ready_at_once": (calls[0]["kernel"] or "").startswith("flashinfer."),
        "flashinfer_import_and_probe_s": round(setup_s, 1),
        "calls_until_flashinfer": calls,
        "flashinfer_selected_after_s": selected_after,
        "flashinfer_call_ms_median": round(statistics.median(ms for ms, _ in after), 3) if after else None,
        "kernels_after": sorted({k for _, k in after}),
        "warmup": {"variant_kwargs": {n: (list(x) if isinstance(x, tuple) else x) for n, x in kw2.items()},
                   "seconds": None if warm_s is None else round(warm_s, 1), "report": report},
        "log": lines, "explain_after": explain,
    }
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1, default=str)

    print(f"{out['device']}, torch {out['torch']}, flashinfer {out['flashinfer']}, cache {base}")
    print(f"call: B,Hq,Hkv,Sq,Sk,D = {out['call']['shape']} {a.dtype} {kw}")
    print(f"first call: {calls[0]['ms']:.1f} ms on {calls[0]['kernel']}"
          + (" (the variant was already built)" if out["ready_at_once"] else ""))
    ran = {}
    for c in calls:
        ran[c["kernel"]] = ran.get(c["kernel"], 0) + 1
    print(f"calls while building: {len(calls)} ({ran}), max {max(c['ms'] for c in calls):.1f} ms")
    if selected_after is None:
        print(f"FlashInfer not selected within --max-wait {a.max_wait:g} s")
    else:
        print(f"FlashInfer selected after {selected_after:.1f} s; then {out['flashinfer_call_ms_median']} ms "
              f"a call (median of 20, {out['kernels_after']})")
    if report is not None:
        print(f"lz.warmup for {kw2}: {warm_s:.1f} s -> {report}; then "
              f"{', '.join(f'{ms:.2f} ms on {k}' for ms, k in after_warm)}")
    for line in lines:
        print("  log", line)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
