"""Changing one module of a model, undoably: `swap_forward` (its forward, on the instance),
`set_attr` (any instance attribute); and `watch` / `observe`, the sizes of the calls a patched
module makes, which `lz.explain(model)` shows.

Each change appends to `undo` the function that puts back exactly what was there; `lz.unpatch`
runs them in reverse. Everything is changed on the model's own modules, never module-wide.

Bottom layer of `layerzero.patching`: imports nothing from LayerZero; anything may import it.
"""
from __future__ import annotations

import types
from typing import Callable

import torch
from torch import nn


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
