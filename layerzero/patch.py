"""Patching loaded models in place: `lz.patch`, `lz.unpatch`, `lz.auto_patch`, `lz.explain(model)`.

Modules are recognised by structure and class tags, then checked by behaviour: a candidate's own
forward and the LayerZero replacement run on one small random input (a "probe", computed with
`layerzero.reference`, so it neither selects kernels nor counts calls) and the module is patched
only when they agree. Nothing is written per model family.

- norms: a 1-D `weight`, an `eps`/`variance_epsilon` attribute and an "RMSNorm"/"LayerNorm" class
  tag (or `nn.LayerNorm`/`nn.RMSNorm`); the probe decides between `rms_norm` with offset 0 or 1
  (Gemma's `1 + w`) and `layer_norm`.
- gated MLPs: `gate_proj` + `up_proj` + `down_proj`, or a fused `gate_up_proj` + `down_proj`,
  with a SiLU or GELU activation -> `lz.swiglu` / `lz.geglu`.
- framework-specific parts (attention, RoPE, MoE experts) come from `layerzero.integrations.*`.

Everything is changed on the model's own modules, never module-wide: another model of the same
family in the process runs its library's code only (`with_globals` gives a patched module a copy
of its forward reading LayerZero's versions of module-level helpers such as RoPE).

A patched module gets its `forward` swapped on the instance; when accelerate hooks wrap the
module (`_hf_hook`), the function the hook calls (`_old_forward`) is swapped instead, so the hook
keeps moving weights. `unpatch` puts back exactly what was there. Every candidate appears in the
report, patched or skipped with the reason; other modules are counted per class.

This module also holds `when_imported`, the post-import hook that lets `import layerzero` register
with optional packages without importing them.
"""
from __future__ import annotations

import dis
import importlib.abc
import importlib.util
import inspect
import logging
import math
import re
import sys
import threading
import types
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from . import ops, reference

log = logging.getLogger("layerzero")

# ---- post-import hooks -------------------------------------------------------------------------

_pending: dict[str, list[Callable]] = {}
_hook_lock = threading.RLock()


class _Loader(importlib.abc.Loader):
    """Wraps a module's loader; runs the module's callbacks right after the module executes."""

    def __init__(self, loader, name: str):
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        with _hook_lock:
            callbacks = _pending.pop(module.__name__, [])
        for cb in callbacks:
            _run(cb, module)

    def __getattr__(self, name):  # get_source, get_data, is_package, ...
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    _busy: set = set()

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _pending or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _Loader(spec.loader, fullname)
        return spec


_finder = _Finder()


def _run(cb: Callable, module) -> None:
    try:
        cb(module)
    except Exception as e:  # a broken integration must not break the user's import
        log.warning("layerzero: post-import hook %s for %s failed: %s: %s",
                    getattr(cb, "__qualname__", cb), module.__name__, type(e).__name__, e)


def when_imported(name: str, callback: Callable) -> None:
    """Call `callback(module)` once module `name` is imported: now if it already is, else right
    after it executes (whichever import statement triggers it). `name` itself is never imported."""
    with _hook_lock:
        module = sys.modules.get(name)
        if module is None:
            _pending.setdefault(name, []).append(callback)
            if _finder not in sys.meta_path:
                sys.meta_path.insert(0, _finder)
            return
    _run(callback, module)


# ---- the record of a patched model -------------------------------------------------------------

@dataclass
class Item:
    """One candidate: a module (or module-level function) LayerZero patched or left alone."""
    name: str                    # dotted module name, or "<modeling module>.<function>"
    kind: str                    # "attention" | "norm" | "rope" | "mlp" | "experts" | "cache" | "residual"
    status: str                  # "patched" | "skipped"
    op: str | None = None        # the LayerZero op that now runs it
    detail: str = ""             # what was recognised, or why it was skipped
    match: dict = field(default_factory=dict, repr=False)  # CallSpec fields of its calls (explain)


@dataclass
class Report:
    """What `lz.patch` did: every candidate module with its status, plus the untouched rest."""
    model: str
    items: list[Item] = field(default_factory=list)
    untouched: Counter = field(default_factory=Counter)  # class name -> count of other modules
    options: dict = field(default_factory=dict)

    @property
    def patched(self) -> list[Item]:
        return [i for i in self.items if i.status == "patched"]

    @property
    def skipped(self) -> list[Item]:
        return [i for i in self.items if i.status == "skipped"]

    def add(self, name, kind, status, op=None, detail="", match=None) -> Item:
        item = Item(name, kind, status, op, detail, match or {})
        self.items.append(item)
        return item

    def __str__(self) -> str:
        lines = [f"lz.patch({self.model}): {len(self.patched)} patched, {len(self.skipped)} skipped"]
        w = max([len(i.name) for i in self.items] + [6])
        for i in self.items:
            op = i.op or "-"
            lines.append(f"  {i.status:<8} {i.kind:<9} {op:<10} {i.name:<{w}}  {i.detail}")
        if self.untouched:
            rest = ", ".join(f"{n} x{c}" for c, n in sorted((c, n) for n, c in self.untouched.items())[::-1])
            lines.append(f"  left as is (no LayerZero op): {rest}")
        return "\n".join(lines)


@dataclass
class _Record:
    report: Report
    undo: list[Callable] = field(default_factory=list)


_records: "weakref.WeakKeyDictionary[nn.Module, _Record]" = weakref.WeakKeyDictionary()


def _unwrap(model):
    """The module behind a torch.compile wrapper."""
    return getattr(model, "_orig_mod", model)


# ---- swapping things, with undo ----------------------------------------------------------------

def swap_forward(module: nn.Module, make: Callable, undo: list) -> None:
    """Replace the forward of `module` (instance-level) by `make(original_forward)`, a function
    taking (self, *args). Under an accelerate hook the hook's `_old_forward` is swapped instead."""
    hooked = getattr(module, "_hf_hook", None) is not None and "_old_forward" in module.__dict__
    slot = "_old_forward" if hooked else "forward"
    had = slot in module.__dict__
    old = module.__dict__.get(slot)
    original = old if had else module.forward
    new = types.MethodType(make(original), module)
    setattr(module, slot, new)

    def restore():
        d = module.__dict__
        # a hook attached after patching wraps our forward: restore inside the hook then
        for s in (slot, "_old_forward", "forward"):
            if d.get(s) is new:
                if s == slot and not had:
                    del d[s]
                else:
                    d[s] = old if s == slot else original
                return
    undo.append(restore)


def set_attr(obj, name: str, value, undo: list) -> None:
    """obj.name = value (instance attribute), undone exactly."""
    had = name in obj.__dict__
    old = obj.__dict__.get(name)
    setattr(obj, name, value)
    undo.append(lambda: setattr(obj, name, old) if had else delattr(obj, name))


def watch(module: nn.Module, undo: list) -> None:
    """Give a patched module the set its calls note their sizes in (`observe`)."""
    set_attr(module, "_lz_seen", set(), undo)


def observe(module: nn.Module, key) -> None:
    """Note that `module` made a call of sizes `key`: an input's shape, or (batch, Sq, Sk) for
    attention. `lz.explain(model)` shows each module the decisions for these only. Not while
    torch.compile traces (the set would be a side effect of the graph), and not even read then:
    dynamo would guard on its contents, and every eager call of a new size would invalidate the
    compiled graph."""
    if torch.compiler.is_compiling():
        return
    seen = module.__dict__.get("_lz_seen")
    if seen is not None:
        seen.add(key)


# Module-level functions (a modeling module's `apply_rotary_pos_emb`, diffusers' attention
# helpers) are shared by every model in the process, and torch.compile may be tracing any of them:
# LayerZero never reassigns one. A patched module instead runs a copy of its own code whose global
# names resolve to LayerZero's functions (`with_globals`), so only the patched model sees them.

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
    with _hook_lock:
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


# ---- probes ------------------------------------------------------------------------------------

def _tol(dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def agree(a, b, dtype) -> tuple[bool, float]:
    """Do two probe outputs agree for `dtype` (relative to the output's scale)? (ok, max error)."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape:
        return False, float("inf")
    a, b = a.detach().double(), b.detach().double()
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = max(b.abs().max().item() if b.numel() else 0.0, 1.0)
    return err <= _tol(dtype) * scale, err


def probe_input(shape, like: torch.Tensor | None, dtype=None, device=None) -> torch.Tensor:
    """A reproducible random probe tensor (never zeros) on `like`'s device and dtype."""
    g = torch.Generator().manual_seed(1234)
    dtype = dtype or (like.dtype if like is not None else torch.float32)
    device = device or (like.device if like is not None else "cpu")
    return torch.randn(shape, generator=g, device="cpu").to(dtype=dtype, device=device)


# why a probe needing a module's weights was not run (a model built with `torch.device("meta")`,
# accelerate's `init_empty_weights`, ...); `lz.patch` on the model again, once loaded, probes it
META = ("parameters are on the meta device (not loaded) and no execution device is known, so the "
        "probe cannot run; call lz.patch(model) again once the weights are loaded")


def _unloaded(model: nn.Module) -> bool:
    """Does the model still hold meta parameters without an execution device (see META)?"""
    return any(p.is_meta for p in model.parameters()) and _param_device(model) is None


def _param_device(module: nn.Module):
    """Where the module's parameters live, or its accelerate hook's execution device when they are
    offloaded (meta); None when unknown (META)."""
    p = next(module.parameters(recurse=True), None)
    if p is None:
        return None
    if p.device.type != "meta":
        return p.device
    for sub in module.modules():
        hook = getattr(sub, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or [hook]:
            dev = getattr(h, "execution_device", None)
            if dev is not None:
                return torch.device(dev)
    return None


def _run_original(module: nn.Module, x, **kwargs):
    """The module's current forward on a probe, without autograd and in eval mode."""
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            return module(x, **kwargs)
    finally:
        module.train(was)


# ---- norms -------------------------------------------------------------------------------------

_NORM_TAG = re.compile(r"(RMSNorm|LayerNorm|RmsNorm)", re.IGNORECASE)
_EPS_ATTRS = ("variance_epsilon", "eps", "epsilon")


def _eps_attr(m) -> str | None:
    for a in _EPS_ATTRS:
        v = getattr(m, a, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return a
    return None


def _is_norm_candidate(m: nn.Module) -> bool:
    if isinstance(m, nn.LayerNorm) or (hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm)):
        return True
    return bool(_NORM_TAG.search(type(m).__name__) or getattr(m, "kernel_layer_name", None) == "RMSNorm")


def _norm_forward(op: str, eps_attr: str, offset: float, fns=None):
    """make(original) -> forward running `op` (fns: (rms_norm, layer_norm), default lz's ops)."""
    rms, ln = fns or (ops.rms_norm, ops.layer_norm)

    def make(original):
        # A call with more than the hidden states (a gated norm's `gate`, mamba2 / bamba / zamba2)
        # is not a plain norm: the module's own forward runs it.
        if op == "rms_norm":
            def forward(self, x, *more, **kw):
                w = self.weight
                if more or kw or (w is not None and w.dtype != x.dtype):  # mixed dtypes: keep
                    return original(x, *more, **kw)                      # the module's promotion
                observe(self, x.shape)
                return rms(x, w, getattr(self, eps_attr), offset=offset)
        else:
            def forward(self, x, *more, **kw):
                w, b = self.weight, getattr(self, "bias", None)
                if more or kw or (w is not None and w.dtype != x.dtype) or (b is not None and b.dtype != x.dtype):
                    return original(x, *more, **kw)
                observe(self, x.shape)
                return ln(x, w, b, getattr(self, eps_attr))
        forward.__name__ = f"lz_{op}_forward"
        forward.lz_norm = (op, eps_attr, offset)        # read by patch_residual
        return forward
    return make


_REF_NORMS = (lambda x, w, eps, offset: reference.rms_norm(x, w, eps, None, offset),
              lambda x, w, b, eps: reference.layer_norm(x, w, b, eps))


def probe(module: nn.Module, make: Callable, x, **kwargs) -> tuple:
    """(module's output, output with forward `make(original)` swapped in) on probe input x (and
    keyword arguments). Both run through the module's hooks (accelerate loads offloaded weights
    for each)."""
    got = _run_original(module, x, **kwargs)
    tmp: list = []
    swap_forward(module, make, tmp)
    try:
        want = _run_original(module, x, **kwargs)
    finally:
        for fn in reversed(tmp):
            fn()
    return got, want


def _more_params(forward) -> list[str]:
    """The parameters of a norm's forward beyond self and the hidden states (a gated norm's
    `gate`)."""
    try:
        params = list(inspect.signature(forward).parameters.values())[2:]
    except (TypeError, ValueError):
        return []
    return [p.name for p in params]


def _patch_norm(name: str, m: nn.Module, report: Report, undo: list) -> None:
    w = getattr(m, "weight", None)
    b = getattr(m, "bias", None)
    eps_attr = _eps_attr(m)
    hidden = w.shape[0] if isinstance(w, torch.Tensor) and w.dim() == 1 else None
    if hidden is None and isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
        hidden = m.normalized_shape[0]
    why = None
    if eps_attr is None:
        why = "no numeric eps / variance_epsilon attribute"
    elif hidden is None:
        why = "no 1-D weight (normalised shape unknown)"
    device = _param_device(m) if why is None else None
    if why is None and device is None and w is not None:
        why = META
    if why is not None:
        report.add(name, "norm", "skipped", detail=f"{type(m).__name__}: {why}")
        return
    dtype = w.dtype if isinstance(w, torch.Tensor) else torch.float32
    x = probe_input((2, 3, hidden), None, dtype=dtype, device=device or "cpu")
    tries = [("rms_norm", 0.0), ("rms_norm", 1.0)] if b is None else []
    tries.append(("layer_norm", 0.0))
    errs = []
    for op, offset in tries:
        try:
            got, want = probe(m, _norm_forward(op, eps_attr, offset, _REF_NORMS), x)
        except Exception as e:
            report.add(name, "norm", "skipped", detail=f"{type(m).__name__}: probe raised {type(e).__name__}: {e}")
            return
        ok, err = agree(got, want, dtype)
        if ok:
            swap_forward(m, _norm_forward(op, eps_attr, offset), undo)
            watch(m, undo)
            eps = getattr(m, eps_attr)
            what = f"{op}(offset={offset:g})" if op == "rms_norm" else op
            more = _more_params(type(m).forward)
            also = f"; calls passing {', '.join(more)} run its own forward" if more else ""
            report.add(name, "norm", "patched", op, f"{type(m).__name__} -> {what}, eps={eps:g}{also}",
                       {"op": op, "head_dim": hidden})
            return
        errs.append(f"{op}{'(+1)' if offset else ''} err {err:.2g}")
    report.add(name, "norm", "skipped",
               detail=f"{type(m).__name__}: forward matches no LayerZero norm ({'; '.join(errs)})")


# ---- gated MLPs --------------------------------------------------------------------------------

_MLP_TAG = re.compile(r"(MLP|FeedForward|FFN|DenseActDense|Intermediate)$", re.IGNORECASE)
_ACT_ATTRS = ("act_fn", "activation_fn", "act", "activation")


def activation_op(act) -> tuple[str, dict] | None:
    """('swiglu', {}) for SiLU, ('geglu', {'approximate': ...}) for GELU; None otherwise."""
    if not callable(act):
        return None
    x = probe_input((257,), None) * 3
    try:
        with torch.no_grad():
            y = act(x)
    except Exception:
        return None
    F = torch.nn.functional
    for op, kw, ref in (("swiglu", {}, F.silu(x)), ("geglu", {"approximate": "none"}, F.gelu(x)),
                        ("geglu", {"approximate": "tanh"}, F.gelu(x, approximate="tanh"))):
        if isinstance(y, torch.Tensor) and y.shape == x.shape and (y - ref).abs().max().item() <= 1e-6:
            return op, kw
    return None


def _gated(op: str, kw: dict):
    if op == "swiglu":
        return ops.swiglu
    approximate = kw["approximate"]
    return lambda gate, up: ops.geglu(gate, up, approximate)


def _ref_gated(op: str, kw: dict):
    return reference.swiglu if op == "swiglu" else (lambda g, u: reference.geglu(g, u, kw["approximate"]))


def _mlp_forward(fused: bool, act_attr: str, gate_fn):
    def make(original):
        if fused:
            def forward(self, x):
                observe(self, x.shape)
                gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
                return self.down_proj(gate_fn(gate, up))
        else:
            def forward(self, x):
                observe(self, x.shape)
                return self.down_proj(gate_fn(self.gate_proj(x), self.up_proj(x)))
        forward.__name__ = "lz_gated_mlp_forward"
        forward.lz_gated = (fused, gate_fn)              # read by patch_residual
        return forward
    return make


def _in_features(lin) -> int | None:
    n = getattr(lin, "in_features", None)
    if n is None:
        w = getattr(lin, "weight", None)
        n = w.shape[-1] if isinstance(w, torch.Tensor) and w.dim() == 2 else None
    return n


def _patch_mlp(name: str, m: nn.Module, report: Report, undo: list) -> None:
    cls = type(m).__name__
    fused = isinstance(getattr(m, "gate_up_proj", None), nn.Module)
    gated = fused or all(isinstance(getattr(m, a, None), nn.Module) for a in ("gate_proj", "up_proj"))
    if not gated or not isinstance(getattr(m, "down_proj", None), nn.Module):
        report.add(name, "mlp", "skipped", detail=f"{cls}: not a gated MLP (no gate/up/down projections)")
        return
    act_attr = next((a for a in _ACT_ATTRS if callable(getattr(m, a, None))), None)
    found = activation_op(getattr(m, act_attr)) if act_attr else None
    if found is None:
        what = (f"activation {type(getattr(m, act_attr)).__name__} is neither SiLU nor GELU" if act_attr
                else f"no activation attribute ({', '.join(_ACT_ATTRS)})")
        report.add(name, "mlp", "skipped", detail=f"{cls}: {what}")
        return
    if any(isinstance(c, nn.Dropout) and c.p > 0 for c in m.children()):
        report.add(name, "mlp", "skipped", detail=f"{cls}: has dropout between the projections")
        return
    op, kw = found
    first = m.gate_up_proj if fused else m.gate_proj
    n_in, device = _in_features(first), _param_device(m)
    if n_in is None or device is None:
        report.add(name, "mlp", "skipped", detail=f"{cls}: {'input size unknown' if device else META}")
        return
    dtype = next(m.parameters()).dtype
    x = probe_input((2, 3, n_in), None, dtype=dtype, device=device)
    try:
        got, want = probe(m, _mlp_forward(fused, act_attr, _ref_gated(op, kw)), x)
    except Exception as e:
        report.add(name, "mlp", "skipped", detail=f"{cls}: probe raised {type(e).__name__}: {e}")
        return
    ok, err = agree(got, want, dtype)
    if not ok:
        report.add(name, "mlp", "skipped", detail=f"{cls}: forward is not down({act_attr}(gate) * up) "
                   f"(probe error {err:.2g})")
        return
    swap_forward(m, _mlp_forward(fused, act_attr, _gated(op, kw)), undo)
    watch(m, undo)
    inter = (first.weight.shape[0] // (2 if fused else 1)) if isinstance(getattr(first, "weight", None), torch.Tensor) else 0
    detail = f"{cls}: {'fused gate_up' if fused else 'gate/up'} + {act_attr} -> {op}" + (
        f"(approximate={kw['approximate']!r})" if kw else "")
    report.add(name, "mlp", "patched", op, detail, {"op": op, "head_dim": inter} if inter else {"op": op})


# ---- the public verbs --------------------------------------------------------------------------

def _integration(model):
    """The framework integration owning `model` (transformers, ...) or None for a plain module."""
    from .integrations import diffusers as df, transformers as hf

    for integ in (hf, df):
        if integ.owns(model):
            return integ
    return None


def patch(model, *, attention: bool = True, norm: bool = True, rope: bool = True, mlp: bool = True) -> Report:
    """Patch a loaded model in place so its attention, norms, RoPE and gated MLPs run through
    LayerZero's ops; returns the `Report` of every candidate, patched or skipped with the reason.

    Idempotent: patching a patched model with the same options returns its report; with other
    options it is unpatched first. A torch.compile wrapper is unwrapped (patch before compiling).
    """
    for flag, v in (("attention", attention), ("norm", norm), ("rope", rope), ("mlp", mlp)):
        if not isinstance(v, bool):
            raise TypeError(f"{flag} must be a bool, got {type(v).__name__}")
    model = _unwrap(model)
    if not isinstance(model, nn.Module):
        from .integrations import diffusers as df
        if df.is_pipeline(model):  # every module of the pipeline, one combined report
            return df.patch_pipeline(model, attention=attention, norm=norm, rope=rope, mlp=mlp)
        raise TypeError(f"lz.patch takes a torch.nn.Module (a transformers or diffusers model) or a "
                        f"diffusers pipeline, got {type(model).__name__}")
    options = {"attention": attention, "norm": norm, "rope": rope, "mlp": mlp}
    rec = _records.get(model)
    if rec is not None:
        deferred = any(i.detail.endswith(META) for i in rec.report.skipped)
        if rec.report.options == options and not (deferred and not _unloaded(model)):
            return rec.report
        unpatch(model)
    rec = _Record(Report(type(model).__name__, options=options))
    integ = _integration(model)
    try:
        if integ is not None:
            integ.patch_model(model, rec.report, rec.undo, options)
        elif attention:
            n = sum(1 for m in model.modules() if type(m).__name__.endswith("Attention"))
            if n:
                rec.report.add(type(model).__name__, "attention", "skipped",
                               detail=f"{n} attention modules, but no integration knows this model's "
                                      f"attention call (supported: transformers)")
        claimed = {i.name for i in rec.report.items}
        for name, m in model.named_modules():
            if name in claimed:
                continue
            if norm and _is_norm_candidate(m) and not list(m.children()):
                _patch_norm(name, m, rec.report, rec.undo)
            elif mlp and _MLP_TAG.search(type(m).__name__):
                _patch_mlp(name, m, rec.report, rec.undo)
            else:
                rec.report.untouched[type(m).__name__] += 1
        if norm:
            from .patch_residual import patch_blocks
            patch_blocks(model, rec.report, rec.undo)
    except BaseException:
        for fn in reversed(rec.undo):
            fn()
        raise
    _records[model] = rec
    log.info("%s", rec.report)
    return rec.report


def _is_pipeline(obj) -> bool:
    from .integrations import diffusers as df
    return df.is_pipeline(obj)


def unpatch(model) -> None:
    """Restore everything `lz.patch` changed on `model` (no-op for an unpatched model)."""
    model = _unwrap(model)
    if not isinstance(model, nn.Module) and model not in _records and not _is_pipeline(model):
        raise TypeError(f"lz.unpatch takes a model or diffusers pipeline (what lz.patch takes), "
                        f"got {type(model).__name__}")
    rec = _records.pop(model, None)
    if rec is None:
        return
    for fn in reversed(rec.undo):
        fn()


def report(model) -> Report | None:
    """The report of a patched model, or None."""
    rec = _records.get(_unwrap(model))
    return rec.report if rec is not None else None


# ---- lz.explain(model) -------------------------------------------------------------------------

@dataclass
class ModelExplanation:
    """`lz.explain(model)`: per patched module, its op and the kernels that ran for the shapes seen
    so far (decisions in the decision cache matching the module's op and sizes), and why."""
    model: str
    rows: list[dict]

    def __str__(self) -> str:
        lines = [f"lz.explain({self.model})"]
        w = max([len(r["module"]) for r in self.rows] + [6])
        for r in self.rows:
            if not r["kernels"]:
                lines.append(f"  {r['module']:<{w}}  {r['op']:<10} (no call seen yet)")
            for k in r["kernels"]:
                lines.append(f"  {r['module']:<{w}}  {r['op']:<10} {k['kernel']:<18} {k['shapes']}  — {k['why']}")
        return "\n".join(lines)


def _why(decision) -> str:
    if decision.note:
        return decision.note
    chosen = next((c for c in decision.candidates if c.status == "chosen"), None)
    better = [c for c in decision.candidates if c.status in ("rejected", "unavailable", "denied")
              and c.reasons]
    parts = [f"highest-scoring eligible kernel (score {chosen.score})" if chosen else "chosen"]
    parts += [f"{c.kernel}: {_clip(c.reasons[0])}" for c in better[:2]]
    return "; ".join(parts)


def _clip(text: str, n: int = 70) -> str:
    """text, or its first words up to n characters and an ellipsis."""
    return text if len(text) <= n else text[:n].rsplit(" ", 1)[0].rstrip(",;:") + " ..."


def _saw(spec, seen: set) -> bool:
    """Was a call described by `spec` one of those a module noted (`observe`)?"""
    if spec.op == "attention":
        return (spec.batch, spec.seq_len_q, spec.seq_len_k) in seen
    return any(math.prod(shape[:-1]) == spec.batch for shape in seen)   # rows of the noted inputs


def _shape(spec) -> str:
    if spec.op == "attention":
        return (f"B={spec.batch} H={spec.num_heads}/{spec.num_kv_heads} Sq={spec.seq_len_q} "
                f"Sk={spec.seq_len_k} D={spec.head_dim} {str(spec.dtype)[6:]}"
                + (" causal" if spec.causal else "") + (f" mask={spec.mask}" if spec.mask != "none" else ""))
    if spec.op == "rope":
        return f"B={spec.batch} H={spec.num_heads}/{spec.num_kv_heads} S={spec.seq_len_q} D={spec.head_dim} {str(spec.dtype)[6:]}"
    return f"rows={spec.batch} D={spec.head_dim} {str(spec.dtype)[6:]}"


def _shapes(decisions, n: int = 3) -> str:
    shapes = sorted({_shape(d.spec) for d in decisions})
    return "; ".join(shapes[:n]) + (f"; (+{len(shapes) - n} more)" if len(shapes) > n else "")


def explain_model(model) -> ModelExplanation:
    from . import dispatch

    model = _unwrap(model)
    rec = _records.get(model)
    decisions = [d for d in list(dispatch.decisions.values()) if d.chosen]
    rows = []
    items = [i for i in rec.report.patched if i.op] if rec is not None else []
    if rec is None:
        from .integrations import transformers as hf
        items = hf.interface_items(model)  # attn_implementation="layerzero" without lz.patch
    modules = dict(model.named_modules())
    for item in items:
        # calls a module noted itself (`observe`); else (RoPE, calls traced by torch.compile)
        # every decision of its op and sizes
        seen = getattr(modules.get(item.name), "__dict__", {}).get("_lz_seen")
        kernels: dict[str, list] = {}
        for d in decisions:
            s = d.spec
            if all(getattr(s, k) == v for k, v in item.match.items()) and (not seen or _saw(s, seen)):
                kernels.setdefault(d.chosen, []).append(d)
        rows.append({"module": item.name, "op": item.op or "-", "kernels": [
            {"kernel": kid, "shapes": _shapes(ds), "why": _why(ds[0])} for kid, ds in kernels.items()]})
    return ModelExplanation(type(model).__name__, rows)


def explain_pipeline(pipe) -> ModelExplanation:
    """`lz.explain(pipe)` for a diffusers pipeline: each model component's rows, prefixed."""
    rows = []
    for name, comp in pipe.components.items():
        if hasattr(comp, "named_modules"):
            rows += [{**row, "module": f"{name}.{row['module']}"} for row in explain_model(comp).rows]
    return ModelExplanation(type(pipe).__name__, rows)


# ---- lz.auto_patch ------------------------------------------------------------------------------

_auto = {"on": False, "options": {}}


class _AutoPatch:
    """Returned by `auto_patch`: a context manager restoring the previous state on exit."""

    def __init__(self, enable: bool, options: dict, now: bool):
        self._enable, self._options = enable, options
        self._prev = (_auto["on"], dict(_auto["options"]))
        if now:
            _set_auto(enable, options)

    def __enter__(self):
        _set_auto(self._enable, self._options)
        return self

    def __exit__(self, *exc):
        _set_auto(*self._prev)
        return False


def _set_auto(on: bool, options: dict) -> None:
    from .integrations import transformers as hf

    _auto["on"], _auto["options"] = on, dict(options)
    if on:
        when_imported("transformers.modeling_utils", hf.install_auto_patch)
    elif "transformers.modeling_utils" in sys.modules:
        hf.remove_auto_patch()


def auto_patch(enable: bool | None = None, **options) -> _AutoPatch:
    """Models built by transformers' `from_pretrained` / `from_config` come out `lz.patch`ed.

        with lz.auto_patch():            # within the block
            model = AutoModelForCausalLM.from_pretrained(...)
        lz.auto_patch(True)              # from now on (lz.auto_patch(False) turns it off)

    `options` are `lz.patch`'s (attention=, norm=, rope=, mlp=)."""
    bad = set(options) - {"attention", "norm", "rope", "mlp"}
    if bad:
        raise TypeError(f"auto_patch got unknown options {sorted(bad)}; allowed: attention, norm, rope, mlp")
    if enable is not None and not isinstance(enable, bool):
        raise TypeError(f"auto_patch(enable) takes True, False or nothing, got {enable!r}")
    return _AutoPatch(True if enable is None else enable, options, now=enable is not None)


def auto_patch_model(model, attn_implementation=None):
    """Patch `model` if auto-patching is on (called by the integrations' build hooks). An
    `attn_implementation` the user chose explicitly stands: attention is then left as is."""
    if not _auto["on"]:
        return model
    options = dict(_auto["options"])
    if attn_implementation is None or not options.get("attention", True):
        patch(model, **options)
        return model
    report = patch(model, **{**options, "attention": False})
    if not any(i.kind == "attention" for i in report.items):
        report.add(type(model).__name__, "attention", "skipped",
                   detail=f"attn_implementation={attn_implementation!r} was chosen explicitly: lz.auto_patch "
                          f"keeps it (lz.patch(model) switches it to 'layerzero')")
    return model
