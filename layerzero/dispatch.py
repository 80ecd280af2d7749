"""From a described call to the kernel that runs it: decision caches and runtime fallback.

Two bounded dicts, both dropped when configuration or the registry changes:
- `fast`: raw key (shapes, dtypes, devices and flags an op reads off its arguments, plus this
  thread's `use` preferences) -> Entry. A hit skips validation and selection, since both depend
  only on what the key holds.
- `decisions`: (CallSpec, preferences) -> Decision, shared by calls whose raw keys differ.
  (`grad_choices` holds the answers of `Entry`'s grad probe, which are not decisions.)

Runtime fallback: a kernel that raises hands the call to the next kernel of the decision. Only a
kernel's own failure is a fallback (logged, counted, recorded by its circuit breaker): one that a
later kernel then runs without error. When every kernel raises, the input is at fault (NaN logits,
a tensor on the wrong device): the first error is raised and no kernel is marked. Exceptions torch
raises to unwind user code (`CONTROL_FLOW`) pass through untouched.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
import warnings
from typing import Any, Callable, Hashable

import torch

from . import control, health, registry, telemetry
from .call import sdpa_expressible
from .select import Decision, select

log = logging.getLogger("layerzero")
MAX_ENTRIES = 4096

fast: dict = {}
decisions: dict = {}
grad_choices: dict = {}   # (CallSpec with grad=True, preferences) -> kernel id or None
_lock = threading.Lock()
_warned: set = set()
# Exceptions torch raises through user code on purpose, to unwind it, never a kernel failing:
# (module, class), looked up (on the failure path only) in modules already imported.
CONTROL_FLOW = (("torch.utils.checkpoint", "_StopRecomputationError"),  # checkpoint's early stop
                ("torch.distributed.elastic.multiprocessing.api", "SignalException"))  # SIGTERM


def control_flow(exc: BaseException) -> bool:
    """Is `exc` one of torch's control-flow exceptions (see CONTROL_FLOW)?"""
    return any(isinstance(exc, getattr(sys.modules.get(mod), name, ()))
               for mod, name in CONTROL_FLOW)


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
        # Would a call needing backward choose the same kernel? Then ops.attention, whose raw key
        # holds grad mode but not its inputs' requires_grad, may reuse this entry without reading
        # them. Other ops' keys hold whether the call needs grad; with grad mode off no call needs
        # it: no need to ask then.
        self.grad_ok = (spec.grad or spec.op != "attention" or not torch.is_grad_enabled()
                        or _grad_choice(spec._replace(grad=True)) == k.id)


def clear() -> None:
    with _lock:
        fast.clear()
        decisions.clear()
        grad_choices.clear()


control.on_change(clear)


def _bounded_put(d: dict, key, value) -> None:
    if len(d) >= MAX_ENTRIES:
        try:  # drop the oldest tenth (dicts keep insertion order)
            for old in list(d)[: MAX_ENTRIES // 10]:
                d.pop(old, None)
        except RuntimeError:
            d.clear()
    d[key] = value


def decide(spec, prefs: tuple | None = None) -> Decision:
    """The (cached) decision for a call description under the current configuration. A new one
    counts as a selection in `lz.metrics()`. While the environment's configuration is invalid
    (`control.environment_error`), raises ValueError saying so: nothing is decided under a
    configuration the user did not get."""
    prefs = control.local.prefs if prefs is None else prefs
    dkey = (spec, prefs)
    d = decisions.get(dkey)
    if d is None:
        env_error = getattr(control, "environment_error", None)
        if env_error:
            raise ValueError(env_error)
        gen = control.generation
        t0 = time.perf_counter()
        d = select(spec, registry.op_kernels(spec.op), control.effective, prefs)
        took = time.perf_counter() - t0
        telemetry.record_selection(took)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("new decision in %.0f us%s\n%s", took * 1e6,   # d's first line: the call
                      f" under lz.use{prefs}" if prefs else "", d)
        with _lock:
            if gen == control.generation:
                _bounded_put(decisions, dkey, d)
    return d


def _grad_choice(spec) -> str | None:
    """The kernel a call described by `spec` would get, for `Entry`'s probe: asked once per call
    description, neither counted as a selection nor kept as a decision (no call needed one yet;
    one that does makes and counts it)."""
    pkey = (spec, control.local.prefs)
    try:
        return grad_choices[pkey]
    except KeyError:
        pass
    gen = control.generation
    d = decisions.get(pkey) or select(spec, registry.op_kernels(spec.op), control.effective, pkey[1])
    with _lock:
        if gen == control.generation:
            _bounded_put(grad_choices, pkey, d.chosen)
    return d.chosen


def call(key: Hashable | None, args: tuple, describe: Callable[..., Any]) -> Any:
    """Run an op: `key` is the raw cache key (holding this thread's `use` preferences; None when
    the arguments could not make one), `args` the op's arguments in signature order,
    `describe(*args)` validates them and returns the CallSpec (only on a cache miss)."""
    try:
        e = fast.get(key)
    except TypeError:  # an unhashable argument (a list for a number): validation names it
        key = e = None
    if e is None or health.state:
        return _call_slow(key, args, describe, e)
    try:
        out = e.fn(*args)
    except Exception as exc:
        return recover(e, args, describe, exc)
    next(e.hits)
    return out


def recover(e: Entry, args: tuple, describe: Callable[..., Any], exc: Exception) -> Any:
    """The cached kernel raised. torch's control flow passes through; invalid input the raw key
    could not see (a k or v on another device) raises its ValueError/TypeError; otherwise the
    next kernels run (see `_run_chain`)."""
    if control_flow(exc):
        raise exc
    describe(*args)
    return _run_chain(e.spec, e.decision, args, True, failed=((e.kernel_id, exc),))


def entry_for(key: Hashable | None, args: tuple, describe: Callable[..., Any]) -> Entry:
    """Validate, describe and select for a call, caching the result under `key` (if any)."""
    gen = control.generation
    spec = describe(*args)
    d = decide(spec)
    if d.error:
        raise ValueError(d.error)
    e = Entry(spec, d)
    if key is not None:
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


def _run_chain(spec, decision: Decision, args, hit: bool, failed=()):
    """Try the decision's kernels in order, honouring circuit breakers. `failed`: (kernel id,
    exception) of the kernels that already raised on this call. Their failures count (logged,
    `fallbacks`, breaker) once a later kernel succeeds; if none does, the first error is raised
    and no kernel is marked: the call itself is at fault, not the kernels."""
    failed = list(failed)
    tried = {kid for kid, _ in failed}
    for k in decision.order:
        if k.id in tried or not health.allows(k.id, spec):
            continue
        try:
            out = k.fn(*args)
        except Exception as exc:
            if control_flow(exc):
                raise
            failed.append((k.id, exc))
            continue
        for kid, exc in failed:
            _note_failure(kid, k.id, spec, exc)
        health.success(k.id, spec)
        telemetry.count_call((spec.op, k.id, hit))
        return out
    if failed:
        raise failed[0][1]
    raise RuntimeError(f"every kernel that can run this {spec.op} call is cooling down after "
                       f"failures ({', '.join(k.id for k in decision.order)}); "
                       f"see lz.metrics()['fallbacks']")


def _note_failure(kernel_id: str, ran: str, spec, exc: Exception) -> None:
    """`kernel_id` raised `exc` on a call that kernel `ran` then ran: count, log and warn (once);
    record it in the kernel's breaker. Strict mode raises instead, and records no breaker state:
    a kernel cooled down would be skipped silently, a fallback strict mode forbids."""
    telemetry.count_fallback(kernel_id)
    if control.strict:
        raise RuntimeError(f"layerzero strict mode: kernel {kernel_id} raised on {spec.op} "
                           f"({type(exc).__name__}: {exc})") from exc
    health.failure(kernel_id, spec)
    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    msg = (f"layerzero: kernel {kernel_id} raised {type(exc).__name__} on a {spec.op} call; "
           f"fell back to {ran} ({first_line})")
    log.warning(msg)
    once = (kernel_id, type(exc))
    if once not in _warned:
        _warned.add(once)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)
