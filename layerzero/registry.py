"""Kernels per op, filled by one decorator: `register`.

A kernel is a function taking the op's arguments positionally, in the order of the op's signature
(see `layerzero.ops`), plus `supports(spec) -> list[str]` of reasons it can't run a `CallSpec`
(empty = can). Packages a kernel needs are named in `requires` and imported on first use; an import
that fails becomes the kernel's "unavailable" reason instead of an exception.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

OPS = ("attention", "rms_norm", "layer_norm", "rope", "swiglu", "geglu", "sample", "paged_attention")

log = logging.getLogger("layerzero")


@dataclass(eq=False)
class Kernel:
    id: str
    op: str
    fn: Callable
    priority: int | Callable = 0   # or priority(spec) -> int: a rule per call shape
    supports: Callable | None = None
    requires: tuple[str, ...] = ()
    order: int = field(default=0)
    plain: Callable | None = None

    @property
    def backend(self) -> str:
        return self.id.split(".", 1)[0]

    def reasons(self, spec) -> list[str]:
        return list(self.supports(spec)) if self.supports is not None else []


_lock = threading.RLock()
_kernels: dict[str, Kernel] = {}           # kernel id -> Kernel
_by_op: dict[str, list[Kernel]] = {op: [] for op in OPS}
_module_reasons: dict[str, str | None] = {}  # module name -> why it can't be imported (None = ok)
_listeners: list[Callable[[], None]] = []  # called when the set of kernels changes
_entry_points_loaded = False
entry_point_errors: dict[str, str] = {}


def check_op(op: str) -> str:
    if op not in _by_op:
        raise ValueError(f"unknown op {op!r}; known ops: {', '.join(OPS)}")
    return op


def register(op: str, kernel_id: str, fn: Callable | None = None, *, priority: int = 0,
             supports: Callable | None = None, requires: tuple[str, ...] | list[str] = (),
             plain: Callable | None = None, replace: bool = False):
    """Register `fn` as kernel `kernel_id` ("<backend>.<name>") of `op`; usable as a decorator.

    `supports(spec)` returns the reasons the kernel can't run a call (empty list = it can);
    `requires` names modules imported on first use (failure = kernel unavailable, with the reason).
    `priority` is an int or `priority(spec) -> int` (a pure function of the call description,
    e.g. per GPU generation and shape; see backends/priorities.py).
    `plain(spec)` (attention only) may return a function with F.scaled_dot_product_attention's
    signature and defaults `(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None)`
    (called as `(q, k, v, is_causal=...)` when the rest are defaults), which the op then calls
    directly for calls SDPA expresses as they are (`call.sdpa_expressible`): no adapter frame.
    Registering an id twice raises unless `replace=True`.
    """
    check_op(op)
    if not isinstance(kernel_id, str) or "." not in kernel_id or kernel_id.startswith("."):
        raise ValueError(f"kernel_id must look like '<backend>.<name>', got {kernel_id!r}")
    if isinstance(priority, bool) or not (isinstance(priority, int) or callable(priority)):
        raise TypeError(f"priority must be an int or a callable spec -> int, got {type(priority).__name__}")
    if supports is not None and not callable(supports):
        raise TypeError("supports must be a callable spec -> list[str] or None")

    def add(f: Callable) -> Callable:
        if not callable(f):
            raise TypeError(f"fn must be callable, got {type(f).__name__}")
        with _lock:
            old = _kernels.get(kernel_id)
            if old is not None:
                if not replace:
                    raise ValueError(f"kernel {kernel_id!r} is already registered (pass replace=True)")
                if old.op != op:
                    raise ValueError(f"kernel {kernel_id!r} is registered for op {old.op!r}, not {op!r}")
                _by_op[op].remove(old)
            k = Kernel(kernel_id, op, f, priority, supports, tuple(requires), len(_kernels), plain)
            _kernels[kernel_id] = k
            _by_op[op].append(k)
        _changed()
        return f

    return add if fn is None else add(fn)


def unregister(kernel_id: str) -> None:
    with _lock:
        k = get(kernel_id)
        del _kernels[kernel_id]
        _by_op[k.op].remove(k)
    _changed()


def on_change(callback: Callable[[], None]) -> None:
    _listeners.append(callback)


def _changed() -> None:
    for cb in _listeners:
        cb()


def load_entry_points() -> None:
    """Load third-party kernels from the `layerzero.kernels` entry-point group (once)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="layerzero.kernels"):
        try:
            obj = ep.load()
            if callable(obj):
                obj()
        except Exception as e:  # a broken plugin must not break layerzero
            entry_point_errors[ep.name] = f"{type(e).__name__}: {e}"
            log.warning("layerzero: kernel plugin %r failed to load: %s", ep.name, e)


def op_kernels(op: str) -> list[Kernel]:
    load_entry_points()
    return _by_op[check_op(op)]


def all_kernels() -> list[Kernel]:
    load_entry_points()
    return sorted(_kernels.values(), key=lambda k: k.order)


def get(kernel_id: str) -> Kernel:
    load_entry_points()
    k = _kernels.get(kernel_id)
    if k is None:
        raise ValueError(f"unknown kernel {kernel_id!r}; known kernels: {', '.join(sorted(_kernels))}")
    return k


def backends() -> list[str]:
    load_entry_points()
    return sorted({k.backend for k in _kernels.values()})


def module_reason(name: str) -> str | None:
    """Why module `name` can't be used (not installed / import error), or None. Cached."""
    if name in _module_reasons:
        return _module_reasons[name]
    reason = None
    try:
        if importlib.util.find_spec(name.split(".")[0]) is None:
            reason = f"{name.split('.')[0]} is not installed"
        else:
            # Crash isolation: a module with a probe is first tried in a subprocess (once per
            # machine and versions, cached on disk), so a crash there can't take this one down.
            from . import probe
            reason = probe.reason(name)
            if reason is None:
                importlib.import_module(name)
    except (ImportError, OSError, RuntimeError, AttributeError, ValueError) as e:
        reason = f"{name} failed to import: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    _module_reasons[name] = reason
    return reason


def unavailable_reason(k: Kernel) -> str | None:
    for mod in k.requires:
        r = module_reason(mod)
        if r:
            return r
    return None
