"""Copies of functions that read other module-level names: how a patched module gets LayerZero's
version of a helper its forward calls (a modeling module's `apply_rotary_pos_emb`, diffusers'
attention functions) without touching the helper itself.

Module-level functions are shared by every model in the process, and torch.compile may be tracing
any of them: LayerZero never reassigns one. A patched module instead runs a copy of its own code
whose global names resolve to LayerZero's functions (`with_globals`), so only the patched model
sees them.

Bottom layer of `layerzero.patching`: imports nothing from LayerZero; anything may import it.
"""
from __future__ import annotations

import dis
import sys
import threading
import types

_lock = threading.Lock()


def global_uses(code) -> tuple[set, set]:
    """(names X read as globals, names X with X.scaled_dot_product_attention read) in `code` and the
    functions nested in it (which inherit a rebound namespace when created)."""
    names, sdpa_owners = set(), set()
    prev = None
    for ins in dis.get_instructions(code):
        if ins.opname == "LOAD_GLOBAL":
            names.add(ins.argval)
        if (prev is not None and prev.opname == "LOAD_GLOBAL" and ins.opname in ("LOAD_ATTR", "LOAD_METHOD")
                and ins.argval == "scaled_dot_product_attention"):
            sdpa_owners.add(prev.argval)
        prev = ins
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            n, o = global_uses(const)
            names |= n
            sdpa_owners |= o
    return names, sdpa_owners


def global_names(code) -> set:
    """Names `code` and the functions nested in it read as globals."""
    return global_uses(code)[0]


def rebound_module(g: dict, rebind: dict) -> dict:
    """The namespace of a copy of the module whose globals are `g`, with the names in `rebind`
    rebound: a real module in sys.modules named after the original (torch.compile re-reads a
    function's globals through the module its `__name__` names). One per (module, names), kept
    in step with the original's globals; entries change only when their value does."""
    name = f"layerzero.rebound.{g.get('__name__', 'module')}.{'.'.join(sorted(rebind))}"
    with _lock:
        mod = sys.modules.get(name)
        if mod is None:
            mod = sys.modules[name] = types.ModuleType(name)
        d = mod.__dict__
        want = {k: v for k, v in g.items() if k not in ("__name__", "__spec__", "__loader__")}
        want.update(rebind)
        for k, v in want.items():
            if d.get(k, d) is not v:
                d[k] = v
    return d


def _cell(c):
    try:
        return c.cell_contents
    except ValueError:  # an empty cell
        return None


def _copy_function(fn, namespace: dict, closure):
    """Function `fn` (defaults, names, doc, attributes) over `namespace` and `closure`."""
    new = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, closure)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__, new.__doc__ = fn.__qualname__, fn.__doc__
    new.__dict__.update(fn.__dict__)
    return new


def rebound_function(fn, rebind: dict):
    """A copy of function `fn` reading the names in `rebind` from `rebound_module`."""
    return _copy_function(fn, rebound_module(fn.__globals__, rebind), fn.__closure__)


def with_globals(fn, rebind: dict):
    """A copy of function `fn` whose innermost function (through `functools.wraps` decorators whose
    closure holds the function they wrap; each one is copied around the new inner one) reads the
    names in `rebind` from `rebound_module`. None when a decorator hides the function it wraps."""
    inner = getattr(fn, "__wrapped__", None)
    if getattr(fn, "__code__", None) is None:
        return None
    if inner is None:
        return rebound_function(fn, rebind)
    cells = fn.__closure__ or ()
    at = [i for i, c in enumerate(cells) if _cell(c) is inner]
    new_inner = with_globals(inner, rebind) if len(at) == 1 else None
    if new_inner is None:
        return None
    cells = tuple(types.CellType(new_inner) if i == at[0] else c for i, c in enumerate(cells))
    new = _copy_function(fn, fn.__globals__, cells)
    new.__wrapped__ = new_inner
    return new
