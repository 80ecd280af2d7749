"""The record of a patched model: the `Report` of every candidate module (`Item`), and the undo
list that puts back what was swapped (`Record`, kept per model in `records`).

Bottom layer of `layerzero.patching`: imports nothing from LayerZero; anything may import it.
"""
from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from torch import nn


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
class Record:
    """A patched model (or pipeline): its report, and the functions undoing the patch, in order."""
    report: Report
    undo: list[Callable] = field(default_factory=list)


# patched model or pipeline -> its Record (`lz.patch` adds, `lz.unpatch` pops and runs the undo)
records: "weakref.WeakKeyDictionary[nn.Module, Record]" = weakref.WeakKeyDictionary()
