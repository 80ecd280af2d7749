"""From a described call to the kernel that runs it: decision caches and runtime fallback.

Two bounded dicts, both dropped when configuration or the registry changes:
- `fast`: raw key (shapes, dtypes, devices and flags an op reads off its arguments, plus this
  thread's `use` preferences) -> Entry. A hit skips validation and selection, since both depend
  only on what the key holds.
- `decisions`: (CallSpec, preferences) -> Decision, shared by calls whose raw keys differ.
"""
from __future__ import annotations

import logging
import threading
import time
import warnings

from . import control, health, registry, telemetry
from .call import sdpa_expressible
from .select import Decision, select

log = logging.getLogger("layerzero")
MAX_ENTRIES = 4096

fast: dict = {}
decisions: dict = {}
_lock = threading.Lock()
_warned: set = set()


class Entry:
    __slots__ = ("spec", "decision", "fn", "plain", "kernel_id", "hit_key", "hits", "grad_ok",
                 "__weakref__")

    def __init__(self, spec, decision: Decision):
        self.spec, self.decision = spec, decision
        k = decision.order[0]
        self.fn, self.kernel_id = k.fn, k.id
        self.plain = k.plain(spec) if k.plain is not None and sdpa_expressible(spec) else None
        self.hit_key = (spec.op, k.id, True)
        self.hits = telemetry.hit_counter(self)  # next(e.hits) counts a cached call
        # Would a call needing backward choose the same kernel? Then an op may reuse this entry
        # without reading its inputs' requires_grad.
        self.grad_ok = spec.grad or decide(spec._replace(grad=True)).chosen == k.id


def clear() -> None:
    with _lock:
        fast.clear()
        decisions.clear()


control.on_change(clear)


def _bounded_put(d: dict, key, value) -> None:
    if len(d) >= MAX_ENTRIES:
        try:  # drop the oldest tenth (dicts keep insertion order)
            for old in list(d)[: MAX_ENTRIES // 10]:
                d.pop(old, None)
        except RuntimeError:
            d.clear()
    d[key] = value


def decide(spec, prefs=None) -> Decision:
    """The (cached) decision for a call description under the current configuration."""
    prefs = control.local.prefs if prefs is None else prefs
    dkey = (spec, prefs)
    d = decisions.get(dkey)
    if d is None:
        gen = control.generation
        t0 = time.perf_counter()
        d = select(spec, registry.op_kernels(spec.op), control.effective, prefs)
        took = time.perf_counter() - t0
        telemetry.record_selection(took)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("new decision in %.0f us for %s%s\n%s", took * 1e6, _brief(spec),
                      f" under lz.use{prefs}" if prefs else "", d)
        with _lock:
            if gen == control.generation:
                _bounded_put(decisions, dkey, d)
    return d


def _brief(spec) -> str:
    """The fields of a CallSpec that differ from their defaults, for the debug log."""
    defaults = {**spec._field_defaults, "sm": 0, "flags": []}
    return ", ".join(f"{k}={v}" for k, v in spec.as_dict().items()
                     if k not in defaults or v != defaults[k])


def call(key, args, describe):
    """Run an op: `key` is the raw cache key (holding this thread's `use` preferences), `args`
    the op's arguments in signature order, `describe(*args)` validates them and returns the
    CallSpec (only on a cache miss)."""
    e = fast.get(key)
    if e is None or health.state:
        return _call_slow(key, args, describe, e)
    try:
        out = e.fn(*args)
    except Exception as exc:
        return recover(e, args, describe, exc)
    next(e.hits)
    return out


def recover(e: Entry, args, describe, exc: Exception):
    """The cached kernel raised. Invalid input the raw key could not see (a k or v on another
    device) raises its ValueError/TypeError; otherwise fall back to the next kernel."""
    describe(*args)
    first = e.decision.order[0]
    _note_failure(first.id, e.spec, exc)
    return _run_chain(e.spec, e.decision, args, True, first_exc=exc, skip=(first.id,))


def entry_for(key, args, describe) -> Entry:
    """Validate, describe and select for a call, caching the result under `key`."""
    gen = control.generation
    spec = describe(*args)
    d = decide(spec)
    if d.error:
        raise ValueError(d.error)
    e = Entry(spec, d)
    with _lock:
        if gen == control.generation:
            _bounded_put(fast, key, e)
    return e


def _call_slow(key, args, describe, e):
    hit = e is not None
    if e is None:
        e = entry_for(key, args, describe)
    else:  # a breaker is open somewhere: validate what the raw key leaves out, then walk the chain
        describe(*args)
    return _run_chain(e.spec, e.decision, args, hit)


def _run_chain(spec, decision: Decision, args, hit: bool, first_exc=None, skip=()):
    """Try the decision's kernels in order, honouring circuit breakers."""
    for k in decision.order:
        if k.id in skip or not health.allows(k.id, spec):
            continue
        try:
            out = k.fn(*args)
        except Exception as exc:
            _note_failure(k.id, spec, exc)
            first_exc = first_exc or exc
            continue
        health.success(k.id, spec)
        telemetry.count_call((spec.op, k.id, hit))
        return out
    if first_exc is not None:
        raise first_exc
    raise RuntimeError(f"every kernel that can run this {spec.op} call is cooling down after "
                       f"failures ({', '.join(k.id for k in decision.order)}); "
                       f"see lz.metrics()['fallbacks']")


def _note_failure(kernel_id: str, spec, exc: Exception) -> None:
    health.failure(kernel_id, spec)
    telemetry.count_fallback(kernel_id)
    if control.strict:
        raise RuntimeError(f"layerzero strict mode: kernel {kernel_id} raised on {spec.op} "
                           f"({type(exc).__name__}: {exc})") from exc
    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    msg = (f"layerzero: kernel {kernel_id} raised {type(exc).__name__} on a {spec.op} call; "
           f"falling back to the next eligible kernel ({first_line})")
    log.warning(msg)
    once = (kernel_id, type(exc))
    if once not in _warned:
        _warned.add(once)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)
