"""The framework integrations `lz.patch` hands models to. Each integration module under
`layerzero.integrations` (transformers, diffusers) calls `register_integration` when it is
imported; `layerzero.patch` asks the registry, in registration order, and never imports an
integration itself.

What an integration registers (plain functions; every one but `owns` and `patch_model` optional):

    owns(model) -> bool          is this `nn.Module` the framework's? (the first integration owning
                                 a model patches its framework-specific parts)
    patch_model(model, report, undo, options)
                                 those parts (attention, RoPE, MoE experts, ...): adds an `Item` to
                                 `report` for each candidate and the functions undoing each change
                                 to `undo`; `options` is lz.patch's {"attention", "norm", "rope",
                                 "mlp"}. The generic recognisers (norms, MLPs, residual blocks) run
                                 afterwards on every module it did not report.
    is_pipeline(obj) -> bool     is `obj` a container of models that `lz.patch` / `lz.unpatch` take
                                 (a diffusers pipeline)?
    patch_pipeline(obj, *, attention, norm, rope, mlp) -> Report
                                 `lz.patch` for such a container (it keeps its own record in
                                 `record.records`); registered together with `is_pipeline`
    interface_items(model) -> [Item]
                                 for `lz.explain(model)` of a model not patched by `lz.patch`: the
                                 modules running LayerZero anyway (attn_implementation="layerzero")
    auto_patch(on: bool)         start / stop patching the models the framework builds
                                 (`lz.auto_patch`)

Middle of the patching stack: imports nothing from LayerZero; `layerzero.patch` reads this
registry and the integrations fill it.
"""
from __future__ import annotations

import types
from typing import Callable

# name -> the integration's functions (the names above, as attributes), in registration order
_integrations: dict[str, types.SimpleNamespace] = {}


def register_integration(name: str, *, owns: Callable, patch_model: Callable,
                         is_pipeline: Callable | None = None, patch_pipeline: Callable | None = None,
                         interface_items: Callable | None = None,
                         auto_patch: Callable | None = None) -> types.SimpleNamespace:
    """Register integration `name` (again: replaced, keeping its place in the order)."""
    if (is_pipeline is None) != (patch_pipeline is None):
        raise TypeError(f"register_integration({name!r}): is_pipeline and patch_pipeline go together, "
                        f"got only {'is_pipeline' if patch_pipeline is None else 'patch_pipeline'}")
    integ = types.SimpleNamespace(name=name, owns=owns, patch_model=patch_model, is_pipeline=is_pipeline,
                                  patch_pipeline=patch_pipeline, interface_items=interface_items,
                                  auto_patch=auto_patch)
    _integrations[name] = integ
    return integ


def registered() -> list:
    """The registered integrations, in registration order."""
    return list(_integrations.values())


def owner(model):
    """The first integration that owns `model`, or None for a plain module."""
    return next((i for i in _integrations.values() if i.owns(model)), None)


def pipeline_owner(obj):
    """The first integration for which `obj` is a pipeline, or None."""
    return next((i for i in _integrations.values() if i.is_pipeline is not None and i.is_pipeline(obj)),
                None)
