"""What torch.compile traces in place of the public ops.

The eager path of `lz.attention` & co. (raw-key dict, hit counters, thread-local preferences,
runtime fallback) is built for speed, not for dynamo. When `torch._dynamo` is imported, each public
op gets a stand-in through `torch.compiler.substitute_in_graph`: dynamo inlines the stand-in wherever
traced code calls `lz.<op>`, while eager calls keep running the original at no extra cost.

The stand-in decides before anything is captured: `_choose` runs once per trace, outside the graph
(`assume_constant_result`), on the call's metadata only (shapes, dtypes, devices, flags, grad mode),
and returns the kernel id, which becomes a constant of the graph. The graph then holds the chosen
kernel's own operations (kernels that dynamo can't trace expose themselves as `torch.library`
custom ops). Nothing in the traced path reads tensor values.

Invalid arguments raise at trace time, in `_choose`, as the TypeError/ValueError the eager op
raises. Dynamo re-wraps any exception escaping a trace as `InternalTorchDynamoError` (and a raise
in traced code becomes a graph break, an `Unsupported` error under fullgraph=True), except its own
`TorchRuntimeError`, which it re-raises as it is (torch/_dynamo/convert_frame.py); so `_choose`
raises the error as a subclass of both (`_user_error`): `except ValueError` catches it, and the
message names the argument as in eager mode, followed by dynamo's "from user code" trace.

A traced call's CallSpec carries the flag "traced": ops inductor fuses (norms, RoPE, gated
activations) then take their plain-PyTorch form, which inductor fuses with the code around it,
over opaque custom-op kernels (backends.priorities.reference).

Consequences: a compiled graph keeps the kernel chosen when it was traced (reset dynamo after
changing the policy), has no runtime fallback, and `lz.metrics()` counts each traced call once,
when it is traced, not on every replay.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import threading
from typing import Any, Callable

import torch

from . import dispatch, registry, telemetry
from .call import device_sm

log = logging.getLogger("layerzero")
_installed = False
TRACED = frozenset({"traced"})   # in a traced call's CallSpec (see backends.priorities.reference)
_local = threading.local()        # .flags: what `trace_flags` adds to traced calls' CallSpecs


@contextlib.contextmanager
def trace_flags(*flags: str):
    """Within the block (this thread), the CallSpec of every call traced by torch.compile also
    carries `flags`: what the caller knows about the graph being traced that the call's own
    arguments don't say (e.g. lz.generate's "matvec", backends.priorities.reference). Flags are
    part of the spec, so selection stays a pure, cached function of it."""
    old = getattr(_local, "flags", frozenset())
    _local.flags = old | frozenset(flags)
    try:
        yield
    finally:
        _local.flags = old


def _meta(v: Any) -> Any:
    """A constant standing for one argument: tensors become (shape, dtype, device, requires_grad).
    (Written for dynamo, which traces it for every argument of every op call in a compiled
    model: `map`, not generator expressions, whose frames dynamo steps through per item.)"""
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(map(int, v.shape)), v.dtype, v.device, v.requires_grad)
    return v


def _is_meta_tensor(m: Any) -> bool:
    return isinstance(m, tuple) and len(m) == 5 and m[0] == "tensor"


@functools.lru_cache(maxsize=None)
def _user_error(kind: type) -> type:
    """`kind` (TypeError or ValueError) as an exception dynamo passes through unwrapped."""
    from torch._dynamo.exc import TorchRuntimeError

    return type(kind.__name__, (TorchRuntimeError, kind), {"__module__": __name__})


def _choose(op: str, args: tuple, kwargs: tuple, grad: bool) -> str:
    """The kernel id for the op call `lz.<op>(*args, **dict(kwargs))`, its tensors described by
    `_meta`. Runs eagerly, at trace time; invalid arguments raise as in eager mode (see above)."""
    from . import ops

    try:
        metas = ops.bind(op, args, dict(kwargs))
        device = next((m[3] for m in metas if _is_meta_tensor(m)), torch.device("cpu"))
        vals = []
        for m in metas:
            if _is_meta_tensor(m):
                t = torch.empty(m[1], dtype=m[2], device="meta")
                vals.append(t.requires_grad_(m[4]) if m[4] else t)
            else:
                vals.append(m)
        with torch.set_grad_enabled(grad):
            spec = ops.DESCRIBE[op](*vals)
        flags = spec.flags | TRACED | getattr(_local, "flags", frozenset())
        spec = spec._replace(device=device.type, sm=device_sm(device), flags=flags)
        d = dispatch.decide(spec)
        if d.error:
            raise ValueError(d.error)
    except (TypeError, ValueError) as e:
        kind = TypeError if isinstance(e, TypeError) else ValueError
        raise _user_error(kind)(str(e)).with_traceback(e.__traceback__) from None
    telemetry.count_call((op, d.chosen, False))
    log.debug("torch.compile: %s -> %s", op, d.chosen)
    return d.chosen


def _stand_in(op: str, fn: Callable) -> Callable:
    """The function dynamo traces instead of `fn` (= lz.<op>): choose (a constant, which binds
    and validates the arguments), bind, run."""
    params = inspect.signature(fn).parameters
    defaults = tuple(p.default for p in params.values())
    index = {name: i for i, name in enumerate(params)}
    windowed = op in ("attention", "paged_attention")

    # dynamo traces this body at every lz op call of a compiled model (80 in a 16-layer llama
    # step): no generator expressions (dynamo steps through their frames per item), the
    # defaults filled by index
    def traced(*args, **kwargs):
        kid = _choose(op, tuple(map(_meta, args)),
                      tuple(zip(kwargs, map(_meta, kwargs.values()))) if kwargs else (),
                      torch.is_grad_enabled())
        if kwargs:
            vals = list(args) + list(defaults[len(args):])
            for name, v in kwargs.items():
                vals[index[name]] = v
        else:
            vals = args + defaults[len(args):]
        if windowed and vals[7] is not None:   # window
            vals = tuple(vals[:7]) + (tuple(vals[7]),) + tuple(vals[8:])
        return registry.get(kid).fn(*vals)

    traced.__name__ = traced.__qualname__ = f"{op}_traced"
    return traced


def install(public: dict[str, Callable]) -> None:
    """Register the stand-ins of the public ops with dynamo (called when torch._dynamo is imported).
    On a torch without `substitute_in_graph` (< 2.5), compiled code graph-breaks around lz ops."""
    global _installed
    if _installed:
        return
    _installed = True
    substitute = getattr(torch.compiler, "substitute_in_graph", None)
    constant = getattr(torch.compiler, "assume_constant_result", None)
    if substitute is None or constant is None:
        log.info("torch %s has no substitute_in_graph: lz ops graph-break under torch.compile",
                 torch.__version__)
        return
    constant(_choose)
    for op, fn in public.items():
        substitute(fn, skip_signature_check=True)(_stand_in(op, fn))
