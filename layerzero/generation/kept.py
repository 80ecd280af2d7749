"""Decode loops kept with the model they run (`PerModel`): lz.generate's and
lz.speculative_generate's loops hold their model, its caches and CUDA graphs, so a table keyed
weakly by the model would keep every model alive (its values reach the key). Kept in an attribute
of the model instead, model -> loops -> model is a cycle the garbage collector frees with the
model; copies and pickles of the model start with none.

A kept loop's CUDA graphs read the models' weights where they were at the capture: `weights_key`
says where that is, and a loop whose models' tensors have moved since is built again, not
replayed (the old place may be freed and reused)."""
from __future__ import annotations

import itertools
import logging

log = logging.getLogger("layerzero")


class Loops(dict):
    """{key: loop} on one model; a deepcopy or a pickle of the model gets an empty one."""

    def __deepcopy__(self, memo):
        return Loops()

    def __reduce__(self):
        return (Loops, ())


NAMES: list[str] = []      # the attributes every PerModel keeps its loops in (`drop`)


def drop(model) -> bool:
    """Forget every decode loop kept on `model` (lz.generate's and lz.speculative_generate's:
    their caches, buffers and CUDA graphs' memory go once nothing else holds them). True when
    there were any."""
    found = False
    for name in NAMES:
        found |= bool(model.__dict__.pop(name, None))
    return found


class PerModel:
    """{model: Loops} kept as the attribute `name` of each model (dict-like: setdefault, get,
    [], pop)."""

    def __init__(self, name: str):
        self.name = name
        NAMES.append(name)

    def get(self, model, default=None):
        return model.__dict__.get(self.name, default)

    def __getitem__(self, model) -> Loops:
        loops = self.get(model)
        if loops is None:
            raise KeyError(model)
        return loops

    def setdefault(self, model, default=None) -> Loops:
        loops = self.get(model)
        if loops is None:
            loops = model.__dict__[self.name] = Loops()
        return loops

    def pop(self, model, default=None):
        return model.__dict__.pop(self.name, default)


def weights_key(*models) -> tuple:
    """Where every parameter and buffer of `models` lives: (data_ptr, shape) of each. It changes
    when lz.unpatch puts fused sibling weights back in storage of their own, when a parameter's
    data is replaced (`param.data = ...`, `load_state_dict(assign=True)`, `model.to(...)`), when
    a buffer is re-registered; in-place writes keep it."""
    return tuple((t.data_ptr(), tuple(t.shape)) for m in models if m is not None
                 for t in itertools.chain(m.parameters(), m.buffers()))


def moved(captured: tuple, now: tuple, who: str, model) -> bool:
    """Have the weights moved since the `weights_key` `captured` (now `now`)? Logged when they
    have: the caller builds its loop again."""
    if captured == now:
        return False
    log.info("%s: the weights of %s moved since its decode loop was captured (lz.unpatch, "
             "param.data = ..., .to()); the loop is built again", who, type(model).__name__)
    return True
