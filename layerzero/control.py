"""Configuration that steers selection: policy, locks, strict mode, scoped `use` preferences.

Every change bumps `generation` and tells the dispatcher to drop its cached decisions, so it takes
effect on the next call. `use` preferences are thread-local and part of the decision key.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Callable

from . import policy as _policy
from . import registry

log = logging.getLogger("layerzero")


class _Local(threading.local):
    prefs: tuple = ()          # ((kernel id or backend, op or None), ...), innermost last


local = _Local()
uses_active = 0                # `use` blocks open in any thread: 0 lets ops skip `local`
generation = 0
strict = False
file_policy = _policy.Policy()
lock_rules: tuple = ()         # from lz.lock(), after the file policy: they win
effective = _policy.Policy()
environment_error: str | None = None   # why LAYERZERO_* settings were not applied (ops raise it)
environment_errors: dict[str, str] = {}       # variable -> its message, in load_environment's order
_listeners: list[Callable[[], None]] = []
_lock = threading.RLock()


def on_change(callback: Callable[[], None]) -> None:
    _listeners.append(callback)


def changed() -> None:
    global generation
    with _lock:
        generation += 1
    for cb in _listeners:
        cb()


registry.on_change(changed)


def _rebuild() -> None:
    global effective
    effective = _policy.Policy(file_policy.locks + lock_rules, file_policy.allow,
                               file_policy.deny, file_policy.boosts, file_policy.sources)
    changed()


def _clear_env_error(name: str) -> None:
    """An explicit setting replaced what environment variable `name` asked for."""
    global environment_error
    if environment_errors.pop(name, None) is not None:
        environment_error = "; ".join(environment_errors.values()) or None


def configure(*, policy=None, strict: bool | None = None) -> None:
    """Set the selection policy (a dict, a YAML path, or a list of them) and/or strict mode.

    `policy={}` clears it. `strict=True` turns every runtime fallback into an error. Nothing
    changes if either is invalid. A setting made here replaces a bad LAYERZERO_POLICY /
    LAYERZERO_STRICT (see `load_environment`).
    """
    global file_policy
    if strict is not None and not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {strict!r}")
    loaded = _policy.load(policy) if policy is not None else None
    with _lock:
        if strict is not None:
            globals()["strict"] = strict
            _clear_env_error("LAYERZERO_STRICT")
        if loaded is not None:
            file_policy = loaded
            _clear_env_error("LAYERZERO_POLICY")
        _rebuild()


def lock(op: str, kernel_id: str, **when) -> None:
    """Force `kernel_id` for `op` (only for calls matching `when`, if given).

    A call the locked kernel can't run raises ValueError with the kernel's reasons.
    """
    global lock_rules
    registry.check_op(op)
    if not isinstance(kernel_id, str):
        raise TypeError(f"kernel_id must be a kernel id string, got {type(kernel_id).__name__}")
    glob = _policy.lock_glob_error(kernel_id)
    if glob:
        raise ValueError(f"lz.lock({op!r}, {kernel_id!r}): {glob}")
    k = registry.get(kernel_id)
    if k.op != op:
        raise ValueError(f"kernel {kernel_id!r} implements op {k.op!r}, not {op!r}")
    rule = _policy.Rule(kernel=kernel_id, op=op, origin=f"lz.lock({op!r}, {kernel_id!r})",
                        when=_policy.parse_when(when or None, f"lz.lock({op!r}, {kernel_id!r})"))
    with _lock:
        lock_rules = lock_rules + (rule,)
        _rebuild()


def unlock(op: str) -> None:
    """Remove the locks `lz.lock` set for `op` (policy-file locks stay)."""
    global lock_rules
    registry.check_op(op)
    with _lock:
        lock_rules = tuple(r for r in lock_rules if r.op != op)
        _rebuild()


def _check_target(target: str, op: str | None) -> None:
    if not isinstance(target, str):
        raise TypeError(f"use() takes a kernel id or backend name, got {type(target).__name__}")
    if op is not None:
        registry.check_op(op)
    if "." in target:
        k = registry.get(target)
        if op is not None and k.op != op:
            raise ValueError(f"kernel {target!r} implements op {k.op!r}, not {op!r}")
    elif target not in registry.backends():
        raise ValueError(f"unknown backend {target!r}; known backends: {', '.join(registry.backends())}")


@contextlib.contextmanager
def use(target: str, op: str | None = None):
    """Within the block (this thread only) run `target` — a kernel id or a backend — for `op`
    (or every op it implements). A call the preferred kernels can't run raises ValueError
    with their reasons rather than silently running something else."""
    global uses_active
    _check_target(target, op)
    old = local.prefs
    local.prefs = old + ((target, op),)
    with _lock:
        uses_active += 1
    try:
        yield
    finally:
        local.prefs = old
        with _lock:
            uses_active -= 1


def _env_log(value: str) -> None:
    if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("is not a log level; allowed: debug, info, warning, error, critical")
    log.setLevel(value.upper())
    if not log.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
        log.addHandler(h)


def _env_strict(value: str) -> None:
    if value.lower() not in ("0", "1", "true", "false", "yes", "no"):
        raise ValueError("is not a flag; allowed: 0, 1, true, false, yes, no")
    configure(strict=value.lower() in ("1", "true", "yes"))


def _env_policy(value: str) -> None:
    try:
        configure(policy=value)
    except (ValueError, TypeError) as e:
        raise ValueError(f"can't be used: {e}") from None


_ENVIRONMENT = (("LAYERZERO_LOG", _env_log), ("LAYERZERO_STRICT", _env_strict),
                ("LAYERZERO_POLICY", _env_policy))


def load_environment() -> None:
    """Apply LAYERZERO_LOG, LAYERZERO_STRICT and LAYERZERO_POLICY (when set), each on its own.

    Never raises: a bad value is not applied; its message (the variable, the value, what is
    allowed) goes into `environment_error` (several joined by "; ") and is logged once at ERROR
    level. While it is set every op call raises it. `configure(strict=...)` / `configure(policy=...)`
    replaces a bad LAYERZERO_STRICT / LAYERZERO_POLICY; calling this again re-reads all three.
    """
    global environment_error
    errors = {}
    for name, apply in _ENVIRONMENT:
        value = os.environ.get(name)
        if value:
            try:
                apply(value)
            except ValueError as e:
                errors[name] = f"{name}={value!r} {e}"
    with _lock:
        had = environment_error
        environment_errors.clear()
        environment_errors.update(errors)
        environment_error = "; ".join(errors.values()) or None
    if had or errors:
        changed()   # cached decisions were made under the old state
    if errors:
        log.error("layerzero: ignoring the environment: %s. Until this is fixed every op call raises "
                  "this error (lz.configure(policy=...) / lz.configure(strict=...) replaces a bad "
                  "LAYERZERO_POLICY / LAYERZERO_STRICT).", environment_error)
