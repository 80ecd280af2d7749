"""Circuit breaker per (kernel, call description) for runtime fallback.

A kernel that raises on a call is skipped for that call description once it has failed
`threshold` times in a row (open); after `cooldown` seconds one trial call is let through
(half-open); a success closes the breaker again.

Only a kernel's own failure is recorded: a call it raised on that a later kernel then ran
(`dispatch._run_chain`). The plain-PyTorch reference kernels, every op's last resort, are never
cooled down.
"""
from __future__ import annotations

import threading
import time

threshold = 3
cooldown = 30.0

_lock = threading.Lock()
# (kernel id, spec) -> [consecutive failures, time the breaker opened or was last trialled]
state: dict[tuple, list] = {}


def allows(kernel_id: str, spec) -> bool:
    """May this kernel be tried for this call now? Lets one trial through after the cool-down."""
    with _lock:
        st = state.get((kernel_id, spec))
        if st is None or st[0] < threshold:
            return True
        now = time.monotonic()
        if now - st[1] >= cooldown:
            st[1] = now            # half-open: this caller is the trial, others keep waiting
            return True
        return False


MAX_ENTRIES = 4096  # distinct (kernel, call) failure records kept; the oldest go first
LAST_RESORT = "reference."  # kernel ids that are never cooled down


def failure(kernel_id: str, spec) -> None:
    """Record one failure of `kernel_id` on a call described by `spec`."""
    if kernel_id.startswith(LAST_RESORT):
        return
    with _lock:
        if len(state) >= MAX_ENTRIES and (kernel_id, spec) not in state:
            del state[next(iter(state))]
        st = state.setdefault((kernel_id, spec), [0, 0.0])
        st[0] += 1
        if st[0] >= threshold:
            st[1] = time.monotonic()


def success(kernel_id: str, spec) -> None:
    with _lock:
        state.pop((kernel_id, spec), None)


def states() -> dict[str, str]:
    """kernel id -> "open" / "half-open" / "failing" for kernels with a recorded failure."""
    now = time.monotonic()
    out = {}
    with _lock:
        for (kid, _), (n, t) in state.items():
            s = "failing" if n < threshold else ("half-open" if now - t >= cooldown else "open")
            if out.get(kid) != "open":
                out[kid] = s
    return out


def reset() -> None:
    with _lock:
        state.clear()
