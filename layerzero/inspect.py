"""Seeing what happens: which, explain, kernels."""
from __future__ import annotations

from typing import NamedTuple

from . import dispatch, ops, registry


class KernelInfo(NamedTuple):
    id: str
    op: str
    backend: str
    available: bool
    reason: str | None


def explain(op, *args, **kwargs):
    """The decision `lz.<op>(*args, **kwargs)` would make: `.chosen`, `.candidates` (every kernel
    of the op with `.kernel`, `.status`, `.reasons`, `.score`), `.spec`; `str()` is a table.
    `lz.explain(model)` instead lists each patched module's op and the kernels run so far."""
    if not isinstance(op, str) and not args and not kwargs:
        from .patch import explain_model, explain_pipeline  # per patched module: op, kernels
        if hasattr(op, "named_modules"):
            return explain_model(op)
        if isinstance(getattr(op, "components", None), dict):
            return explain_pipeline(op)
    spec, _ = ops.describe(op, args, kwargs, "explain")
    return dispatch.decide(spec)


def which(op: str, *args, **kwargs) -> str:
    """The kernel id the same `lz.<op>(*args, **kwargs)` call would run."""
    d = explain(op, *args, **kwargs)
    if d.error:
        raise ValueError(d.error)
    return d.chosen


def kernels(op: str | None = None) -> list[KernelInfo]:
    """Every registered kernel (of `op`, if given): (id, op, backend, available, reason).
    `available` says whether the packages it needs import; `lz.doctor()` and `layerzero kernels`
    also mark unavailable a kernel that runs on none of this machine's devices (a CUDA kernel on
    a CPU-only machine), see `doctor.kernel_rows`."""
    ks = registry.op_kernels(op) if op is not None else registry.all_kernels()
    out = []
    for k in ks:
        why = registry.unavailable_reason(k)
        out.append(KernelInfo(k.id, k.op, k.backend, why is None, why))
    return out
