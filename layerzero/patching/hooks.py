"""Post-import hooks: `when_imported(name, callback)` runs `callback(module)` once module `name` is
imported, without importing it. This is how `import layerzero` registers with optional packages
(transformers, diffusers, torch._dynamo) that the user may never import.

Bottom layer of `layerzero.patching`: imports nothing from LayerZero; anything may import it.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
import threading
from typing import Callable

log = logging.getLogger("layerzero")

_pending: dict[str, list[Callable]] = {}    # module name -> callbacks waiting for its import
_lock = threading.RLock()


class _Loader(importlib.abc.Loader):
    """Wraps a module's loader; runs the module's callbacks right after the module executes."""

    def __init__(self, loader, name: str):
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        with _lock:
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
    with _lock:
        module = sys.modules.get(name)
        if module is None:
            _pending.setdefault(name, []).append(callback)
            if _finder not in sys.meta_path:
                sys.meta_path.insert(0, _finder)
            return
    _run(callback, module)
