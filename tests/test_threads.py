"""16 threads x 10k mixed calls: correct results, consistent metrics, no deadlock."""
from __future__ import annotations

import threading

import torch

import layerzero as lz

THREADS, CALLS = 16, 10_000


def _workload():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    a1 = (r(1, 2, 4, 8), r(1, 2, 4, 8), r(1, 2, 4, 8))
    a2 = (r(2, 4, 3, 16), r(2, 2, 7, 16), r(2, 2, 7, 16))
    x, w = r(3, 32), r(32)
    gate, up = r(4, 16), r(4, 16)
    logits = r(2, 10)
    calls = [
        ("attention", a1, {"is_causal": True}),
        ("attention", a2, {"is_causal": True, "causal_align": "bottom_right"}),
        ("attention", a2, {"window": (2, 0)}),
        ("rms_norm", (x, w), {}),
        ("layer_norm", (x, w, w), {}),
        ("swiglu", (gate, up), {}),
        ("sample", (logits,), {"temperature": 0.0}),
    ]
    return [(op, args, kw, getattr(lz, op)(*args, **kw), lz.which(op, *args, **kw)) for op, args, kw in calls]


def test_many_threads_mixed_calls():
    work = _workload()
    lz.reset_metrics()
    errors, barrier = [], threading.Barrier(THREADS)

    def run(tid):
        try:
            barrier.wait()
            for i in range(CALLS):
                op, args, kw, expect, _ = work[(i + tid) % len(work)]
                out = getattr(lz, op)(*args, **kw)
                if not torch.equal(out, expect):
                    errors.append((tid, i, op))
                    return
        except Exception as e:  # surfaced below
            errors.append((tid, repr(e)))

    threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "deadlock: threads still running"
    assert errors == []
    m = lz.metrics()
    total = THREADS * CALLS
    assert sum(n for per in m["calls"].values() for n in per.values()) == total
    assert m["cache_hits"] + m["cache_misses"] == total and m["cache_misses"] <= len(work)
    assert m["fallbacks"] == {}
    expected: dict = {}
    for tid in range(THREADS):
        for i in range(CALLS):
            op, _, _, _, kid = work[(i + tid) % len(work)]
            expected.setdefault(op, {}).setdefault(kid, 0)
            expected[op][kid] += 1
    assert m["calls"] == expected


def test_threads_while_configuration_changes():
    """Calls stay correct and are all counted while another thread keeps changing the policy."""
    work = _workload()
    lz.reset_metrics()
    stop, errors = threading.Event(), []

    def churn():
        i = 0
        while not stop.is_set():
            lz.configure(policy={"deny": [{"kernel": "torch.sdpa"}]} if i % 2 else {})
            i += 1

    def run(tid):
        try:
            for i in range(1000):
                op, args, kw, expect, _ = work[(i + tid) % len(work)]
                out = getattr(lz, op)(*args, **kw)
                if not torch.allclose(out.float(), expect.float(), atol=1e-5):
                    errors.append((tid, i, op))
        except Exception as e:
            errors.append((tid, repr(e)))

    c = threading.Thread(target=churn)
    c.start()
    threads = [threading.Thread(target=run, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    stop.set()
    c.join()
    assert errors == [] and not any(t.is_alive() for t in threads)
    m = lz.metrics()
    assert sum(n for per in m["calls"].values() for n in per.values()) == 8000
    assert m["cache_hits"] + m["cache_misses"] == 8000
