"""Builds: kernels that compile before they can run, kept out of the calls that need them.

A kernel whose variant for a call needs a long build (FlashInfer's nvcc JIT: minutes) asks
`need(...)` from its `supports(spec)`. Until the variant is built that is a reason like any
other, so the call runs the next kernel and selection stays a pure function of its inputs; the
build runs on a background thread, and when it ends the cached decisions are dropped
(`control.changed()`), so the next call selects again. The log says so once per variant: build
started (WARNING), finished (INFO), failed (WARNING; the error stays the kernel's reason for it).
A build starts only for a variant its kernel would be chosen for (`lz.warmup` builds the rest)
and never from inside torch.compile tracing or CUDA-graph capture.

`lz.warmup(op, *args, **kwargs)` builds what a call's kernels need ahead of time and waits;
`lz.warmup()` waits for the builds already started.

`compile_lock` serialises LayerZero's own torch.compile work (see `compile_serialised`).
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Callable, Hashable

import torch

from . import control, registry
from .backends._gpu import _compiling, _modes

log = logging.getLogger("layerzero")

# ---- torch.compile ------------------------------------------------------------------------------

compile_lock = threading.RLock()


def compile_serialised(fn: Callable, **options) -> Callable:
    """`torch.compile(fn, **options)`, with the compile itself (its first call) made under the
    process-wide `compile_lock`: concurrent first calls compile one at a time, later calls don't
    take the lock.

    torch._dynamo and torch._inductor import each other. Two threads entering that cycle at
    different modules at once (flex's mask helper imports torch._dynamo, torch.compile imports
    torch._inductor) make Python's import-lock deadlock detection hand one of them a partially
    initialised module ("cannot import name 'IndentedBuffer' from partially initialized module
    'torch._inductor.utils'"), and dynamo stays broken for the process. So torch._dynamo is
    imported first, under the lock: the cycle is entered at its top, the way every other path
    enters it."""
    with compile_lock:
        import torch._dynamo  # noqa: F401  (see the docstring)

        compiled = torch.compile(fn, **options)
    first = [True]

    def run(*args):
        if first[0] and not torch.compiler.is_compiling():
            with compile_lock:
                out = compiled(*args)
            first[0] = False
            return out
        return compiled(*args)

    run.__name__ = run.__qualname__ = getattr(fn, "__name__", "compiled")
    return run


# ---- background builds --------------------------------------------------------------------------

class Build:
    """One kernel variant's build state: "ready" (nothing to build), "missing" (needs a build
    not started), "building", "built" (a build here finished), "failed" (`error` says why)."""

    def __init__(self, key: Hashable, what: str, state: str, error: str = ""):
        self.key, self.what, self.state, self.error = key, what, state, error
        self.done = threading.Event()
        self.seconds = 0.0
        if state not in ("missing", "building"):
            self.done.set()

    def reason(self) -> str | None:
        if self.state == "missing":
            return (f"{self.what} needs a JIT build (minutes on first use); not started, since "
                    f"another kernel is chosen for this call (lz.warmup(...) builds it)")
        if self.state == "building":
            return f"{self.what} is being built in the background (ready in a later call)"
        if self.state == "failed":
            return f"{self.what} failed to build: {self.error}"
        return None


_builds: dict[Hashable, Build] = {}
_lock = threading.Lock()


class _Local(threading.local):
    assume_built = False      # inside need()'s "would it be chosen?" selection
    noted: list | None = None  # lz.warmup collecting the builds a call's kernels need


_local = _Local()


def tracing() -> bool:
    """Inside torch.compile tracing, a dispatch mode (make_fx, fake tensors) or CUDA-graph
    capture: nothing may be checked on the device or started there."""
    if _compiling() or _modes():
        return True
    guards = sys.modules.get("torch._guards")           # dynamo calls decisions eagerly
    if guards is not None and guards.TracingContext.try_get() is not None:
        return True
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def need(kernel_id: str, spec, key: Hashable, what: str, check: Callable[[], bool],
         build: Callable[[], None]) -> str | None:
    """For `supports(spec)` of kernel `kernel_id`: None when its variant `key` (described by
    `what`, e.g. "FlashInfer variant prefill bf16 d128 ...") runs without a build, else the
    reason it can't run yet.

    `check()` says (once per variant) whether it is built, without building; `build()` builds
    it, on a background thread started here when `kernel_id` would be chosen for `spec` were
    the variant built (or when `lz.warmup` asks)."""
    if _local.assume_built:
        return None
    b = _builds.get(key)
    if b is None:
        if tracing():
            return (f"{what} is not known to be built, and nothing is checked or built inside "
                    f"torch.compile tracing or CUDA-graph capture (lz.warmup(...) builds it ahead)")
        try:
            b = Build(key, what, "ready" if check() else "missing")
        except Exception as e:  # the variant itself fails: its error is the reason
            b = Build(key, what, "failed", _first_line(e))
        with _lock:
            b = _builds.setdefault(key, b)
    if _local.noted is not None:
        _local.noted.append(b)
        _start(b, build)
    elif b.state == "missing" and not tracing() and _would_choose(kernel_id, spec):
        _start(b, build)
    return b.reason()


def _would_choose(kernel_id: str, spec) -> bool:
    """Would selection choose `kernel_id` for `spec` if every variant were built?"""
    from .select import select

    _local.assume_built = True
    try:
        d = select(spec, registry.op_kernels(spec.op), control.effective, control.local.prefs)
    finally:
        _local.assume_built = False
    return d.chosen == kernel_id


def _start(b: Build, build: Callable[[], None]) -> None:
    with _lock:
        if b.state != "missing":
            return
        b.state = "building"
    log.warning("layerzero: %s needs a JIT build (minutes on first use); building it in the "
                "background, calls run the next eligible kernel until it is ready", b.what)
    threading.Thread(target=_run, args=(b, build), name=f"layerzero-build {b.what}",
                     daemon=True).start()


def _run(b: Build, build: Callable[[], None]) -> None:
    t0 = time.perf_counter()
    try:
        build()
    except BaseException as e:  # noqa: B036  (a build's SystemExit/KeyboardInterrupt is its failure)
        b.error, b.state = _first_line(e), "failed"
        log.warning("layerzero: building %s failed after %.0f s: %s; calls keep running other "
                    "kernels", b.what, time.perf_counter() - t0, b.error)
    else:
        b.state = "built"
        log.info("layerzero: %s built in %.0f s; calls select it from now on", b.what,
                 time.perf_counter() - t0)
    finally:
        b.seconds = time.perf_counter() - t0
        b.done.set()
        control.changed()     # drop cached decisions: the next call selects again


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def _wait(builds, timeout: float | None) -> None:
    end = None if timeout is None else time.monotonic() + timeout
    for b in builds:
        b.done.wait(None if end is None else max(0.0, end - time.monotonic()))


def _report(builds) -> dict:
    out: dict = {"built": [], "ready": [], "failed": {}, "building": []}
    for b in dict.fromkeys(builds):                   # each once, in order
        if b.state == "failed":
            out["failed"][b.what] = b.error
        elif b.state in out:
            out[b.state].append(b.what)
    return out


def warmup(op: str | None = None, *args, timeout: float | None = None, **kwargs) -> dict:
    """Build ahead of time what calls need, and wait.

    `lz.warmup("attention", q, k, v, is_causal=True, window=(128, 0))` takes an op call's
    arguments: every kernel variant the kernels that can run it need is built (not only the one
    chosen), waiting up to `timeout` seconds (None: no limit); then the call runs once, so the
    chosen kernel has done its first-call work too (torch.flex's compile, Triton's JIT).
    `lz.warmup()` waits for the builds already started (by calls) instead.

    Returns {"built": [...], "ready": [...], "failed": {variant: error}, "building": [...]}:
    variants built now (or by an earlier background build), already there (AOT-shipped or in
    the JIT cache), failed, and still building when `timeout` ran out; with an op, "kernel"
    too: the kernel that ran the call.
    """
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(f"timeout must be a number of seconds or None, got {timeout!r}")
        if not timeout >= 0:
            raise ValueError(f"timeout must be >= 0 seconds, got {timeout!r}")
    if op is None:
        if args or kwargs:
            raise TypeError("warmup() takes the op first: lz.warmup('attention', q, k, v, ...)")
        with _lock:
            started = [b for b in _builds.values() if b.state in ("building", "built", "failed")]
        _wait(started, timeout)
        return _report(started)
    from . import ops
    from .select import select

    spec, _ = ops.describe(op, args, kwargs, "warmup")
    _local.noted = noted = []
    try:
        select(spec, registry.op_kernels(op), control.effective, control.local.prefs)
    finally:
        _local.noted = None
    _wait(noted, timeout)
    out = _report(noted)
    ops.PUBLIC[op](*args, **kwargs)
    from .dispatch import decide

    out["kernel"] = decide(spec).chosen
    return out
