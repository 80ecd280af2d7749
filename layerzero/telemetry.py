"""Counters behind `lz.metrics()`: calls per op and kernel, cache hits/misses, fallbacks.

A cached call costs one `next()` on its cache entry's itertools.count (atomic, no lock);
everything else is counted under one lock.
"""
from __future__ import annotations

import itertools
import threading
import weakref

lock = threading.RLock()   # re-entrant: a hit counter's finalizer may run while it is held
fallbacks: dict[str, int] = {}                  # kernel id that raised -> n
selections = 0
_calls: dict[tuple[str, str, bool], int] = {}   # (op, kernel id, decision-cache hit) -> n
_live: dict[int, tuple] = {}                    # id(counter) -> (hit key, counter, [baseline])


def count_call(key: tuple[str, str, bool]) -> None:
    """Count a call made through the slow path (a cache miss or a fallback)."""
    with lock:
        _calls[key] = _calls.get(key, 0) + 1


def _value(counter) -> int:
    return int(repr(counter)[6:-1])  # "count(N)": N is the number of next() calls so far


def hit_counter(entry) -> itertools.count:
    """A counter for the cached calls of one decision-cache entry. `next()` on it is atomic and
    lock-free (the hot path); when the entry is garbage-collected its count is folded in."""
    counter, base = itertools.count(), [0]
    with lock:
        _live[id(counter)] = (entry.hit_key, counter, base)
    weakref.finalize(entry, _retire, id(counter))
    return counter


def _retire(cid: int) -> None:
    with lock:
        key, counter, base = _live.pop(cid)
        _calls[key] = _calls.get(key, 0) + _value(counter) - base[0]


def count_selection() -> None:
    global selections
    with lock:
        selections += 1


def count_fallback(kernel_id: str) -> None:
    with lock:
        fallbacks[kernel_id] = fallbacks.get(kernel_id, 0) + 1


def _call_counts() -> dict:
    with lock:
        total = dict(_calls)
        for key, counter, base in list(_live.values()):
            total[key] = total.get(key, 0) + _value(counter) - base[0]
    return total


def metrics() -> dict:
    """`{"calls": {op: {kernel_id: n}}, "selections", "cache_hits", "cache_misses", "fallbacks"}`."""
    counts = _call_counts()
    with lock:
        fb, sel = dict(fallbacks), selections
    per_op: dict[str, dict[str, int]] = {}
    hits = misses = 0
    for (op, kid, hit), n in counts.items():
        per_op.setdefault(op, {})
        per_op[op][kid] = per_op[op].get(kid, 0) + n
        if hit:
            hits += n
        else:
            misses += n
    return {"calls": per_op, "selections": sel, "cache_hits": hits, "cache_misses": misses,
            "fallbacks": fb}


def reset() -> None:
    global selections
    with lock:
        for _, counter, base in _live.values():
            base[0] = _value(counter)
        _calls.clear()
        fallbacks.clear()
        selections = 0
