"""The public verbs of patching: `lz.patch`, `lz.unpatch`, `lz.auto_patch`, `lz.explain(model)`.

Modules are recognised by structure and class tags, then checked by behaviour: a candidate's own
forward and the LayerZero replacement run on one small random input (a "probe", computed with
`layerzero.reference`, so it neither selects kernels nor counts calls) and the module is patched
only when they agree. Nothing is written per model family.

`lz.patch(model)` hands the model to the framework integration that owns it (attention, RoPE,
MoE experts: `layerzero.integrations.*`, registered in `patching.frameworks`), then runs the
generic recognisers on every module the integration did not report on: norms
(`patching.norms`), gated MLPs (`patching.mlps`), then pre-norm decoder blocks
(`patching.residual`).

Everything is changed on the model's own modules, never module-wide: another model of the same
family in the process runs its library's code only (`patching.rebind.with_globals` gives a patched
module a copy of its forward reading LayerZero's versions of module-level helpers such as RoPE).

A patched module gets its `forward` swapped on the instance; when accelerate hooks wrap the
module (`_hf_hook`), the function the hook calls (`_old_forward`) is swapped instead, so the hook
keeps moving weights. `unpatch` puts back exactly what was there. Every candidate appears in the
report, patched or skipped with the reason; other modules are counted per class.

Layer: above `layerzero.patching` (mechanics, recognisers, the integration registry), which is all
it imports of the patching machinery; below `layerzero.integrations`, which import it (`patch`,
`unpatch`, `auto_patch_model`) and which it never imports. Anything may import it. The mechanics'
names are re-exported here for code that imports them from `layerzero.patch`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from torch import nn

from .patching import frameworks, mlps, norms, residual
from .patching.hooks import _pending, when_imported
from .patching.mlps import activation_op
from .patching.probes import META, agree, probe, probe_input, unloaded
from .patching.probes import param_device as _param_device, run_original as _run_original
from .patching.rebind import global_names, global_uses, rebound_function, rebound_module, with_globals
from .patching.record import Item, Record, Report, records
from .patching.record import Record as _Record, records as _records
from .patching.swap import observe, set_attr, swap_forward, watch

log = logging.getLogger("layerzero")

__all__ = [
    # the public verbs
    "patch", "unpatch", "report", "auto_patch", "auto_patch_model", "explain_model", "explain_pipeline",
    "Report", "Item", "ModelExplanation",
    # re-exported from layerzero.patching for code importing them from here
    "META", "agree", "probe", "probe_input", "_param_device", "_run_original", "_Record", "_records",
    "swap_forward", "set_attr", "watch", "observe", "global_uses", "global_names", "rebound_module",
    "rebound_function", "with_globals", "when_imported", "_pending", "activation_op",
]


def _unwrap(model):
    """The module behind a torch.compile wrapper."""
    return getattr(model, "_orig_mod", model)


# The generic recognisers, tried in this order on each module no integration reported on:
# (lz.patch option, recognised(module), patch(name, module, report, undo)). The first whose option
# is on and that recognises the module decides it; a module none recognises is counted untouched.
_RECOGNISERS = (("norm", norms.recognised, norms.patch_norm),
                ("mlp", mlps.recognised, mlps.patch_mlp))


# ---- the public verbs --------------------------------------------------------------------------

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
        integ = frameworks.pipeline_owner(model)
        if integ is not None:  # every module of the pipeline, one combined report
            return integ.patch_pipeline(model, attention=attention, norm=norm, rope=rope, mlp=mlp)
        raise TypeError(f"lz.patch takes a torch.nn.Module (a transformers or diffusers model) or a "
                        f"diffusers pipeline, got {type(model).__name__}")
    options = {"attention": attention, "norm": norm, "rope": rope, "mlp": mlp}
    rec = records.get(model)
    if rec is not None:
        deferred = any(i.detail.endswith(META) for i in rec.report.skipped)
        if rec.report.options == options and not (deferred and not unloaded(model)):
            return rec.report
        unpatch(model)
    rec = Record(Report(type(model).__name__, options=options))
    integ = frameworks.owner(model)
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
            for opt, recognises, patch_one in _RECOGNISERS:
                if options[opt] and recognises(m):
                    patch_one(name, m, rec.report, rec.undo)
                    break
            else:
                rec.report.untouched[type(m).__name__] += 1
        if norm:
            residual.patch_blocks(model, rec.report, rec.undo)
    except BaseException:
        for fn in reversed(rec.undo):
            fn()
        raise
    records[model] = rec
    log.info("%s", rec.report)
    return rec.report


def _is_pipeline(obj) -> bool:
    return frameworks.pipeline_owner(obj) is not None


def unpatch(model) -> None:
    """Restore everything `lz.patch` changed on `model` (no-op for an unpatched model), and drop
    the decode loops lz.generate and lz.speculative_generate kept on it (their static caches and
    CUDA graphs: memory the next call would otherwise have to find stale first)."""
    model = _unwrap(model)
    if not isinstance(model, nn.Module) and model not in records and not _is_pipeline(model):
        raise TypeError(f"lz.unpatch takes a model or diffusers pipeline (what lz.patch takes), "
                        f"got {type(model).__name__}")
    from .generation.kept import drop    # (the generation loops sit above patching)

    if drop(model):
        log.info("lz.unpatch dropped the decode loops kept on %s", type(model).__name__)
    rec = records.pop(model, None)
    if rec is None:
        return
    for fn in reversed(rec.undo):
        fn()


def report(model) -> Report | None:
    """The report of a patched model, or None."""
    rec = records.get(_unwrap(model))
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
    rec = records.get(model)
    decisions = [d for d in list(dispatch.decisions.values()) if d.chosen]
    rows = []
    items = [i for i in rec.report.patched if i.op] if rec is not None else []
    if rec is None:  # attn_implementation="layerzero" without lz.patch
        items = [i for integ in frameworks.registered() if integ.interface_items is not None
                 for i in integ.interface_items(model)]
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
    _auto["on"], _auto["options"] = on, dict(options)
    for integ in frameworks.registered():   # each hooks (or unhooks) its framework's builders
        if integ.auto_patch is not None:
            integ.auto_patch(on)


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
