"""Launching LayerZero's own Triton kernels for less host time (imported with `_triton_impl`).

`kernel[grid](*args, **meta)` runs Triton's JIT entry on every call: it binds the arguments,
specialises each one, turns the options into a cache-key string and looks the kernel up. For a
RoPE or RMSNorm over a few thousand tokens that Python costs far more than the kernel (H100:
35-60 us of host time against 5 us of GPU time; `benchmarks/results/kernels_micro_h100.txt`).

`Launch(kernel)(grid, args, meta)` goes through the JIT once per specialisation and keeps the
compiled kernel Triton returns; later calls with the same specialisation call its launcher
directly. The key (`spec_key`, plus the current device and `meta`'s constexprs and launch
options) is finer than Triton's specialisation, so a key always maps to the kernel Triton itself
would launch. A caller that plans its launches per input shape may pass its plan key (`static`),
which must determine every non-tensor argument and `meta`; the key then reads only the tensors'
dtypes and alignment.

The launcher's argument convention is Triton's (the compiled kernel's `run(grid0, grid1, grid2,
stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook, *args)`). Which
arguments `*args` holds differs between Triton versions (every parameter, or only the non-
constexpr ones): the first direct launch tries both, and a launcher that takes neither (it raises
TypeError before launching) turns the direct path off for that kernel, with the reason in
`Launch.off`. The direct path is also skipped, per call, while Triton's launch hooks are set (a
profiler), and for kernels that are not compiled (TRITON_INTERPRET=1 makes them interpreted).
"""
from __future__ import annotations

import logging

import torch

_log = logging.getLogger("layerzero")
_MAX_ENTRIES = 512           # specialisations kept per kernel (cleared past it)


def _hook_holder():
    """The object whose launch_enter_hook / launch_exit_hook Triton's JIT passes to launchers."""
    try:
        from triton import knobs
        return knobs.runtime
    except (ImportError, AttributeError):            # Triton before knobs: hooks on CompiledKernel
        from triton.compiler import CompiledKernel
        return CompiledKernel


def _active(hook) -> bool:
    """A hook is set: a function, or one of Triton's hook chains that is not empty."""
    return hook is not None and bool(getattr(hook, "calls", True))


def tensor_key(args: tuple, tensors: int) -> tuple:
    """The first `tensors` arguments' dtypes and addresses mod 16 (what Triton specialises a
    tensor argument on, and a little more)."""
    return tuple([(t.dtype, t.data_ptr() & 15) for t in args[:tensors]])


def spec_key(args: tuple, tensors: int) -> tuple:
    """A key finer than Triton's specialisation: `tensor_key`, and every other argument's value
    (Triton looks at less: an int's width, whether it is 1 or a multiple of 16). Finer is safe:
    two calls with equal keys always get the same compiled kernel from Triton; it costs a JIT
    call for each new key, as without `Launch`."""
    return tensor_key(args, tensors), args[tensors:]


class Launch:
    """A Triton kernel launched directly once its specialisation has been compiled."""

    def __init__(self, kernel, tensors: int):
        """tensors: how many leading non-constexpr parameters are tensors (always tensors)."""
        self.kernel = kernel
        self.tensors = tensors
        self.constexprs = tuple(p.name for p in getattr(kernel, "params", ()) if p.is_constexpr)
        self.entries: dict = {}
        self.all_params = None       # launcher convention, found on the first direct launch
        self.direct = 0              # launches that took the direct path (tests read it)
        self.hooks = _hook_holder()
        self.stream = None           # Triton's current-stream getter, on the first direct launch
        from triton.runtime.jit import JITFunction
        self.off = (None if isinstance(kernel, JITFunction)  # why the direct path is off
                    else f"{type(kernel).__name__} is not a compiled Triton kernel (TRITON_INTERPRET=1?)")

    def __call__(self, grid, args: tuple, meta: dict, static=None):
        """kernel[grid](*args, **meta); args are the non-constexpr parameters in order, meta the
        constexprs (all of them, by name) and launch options. `static`, if given, is a hashable
        that determines args[tensors:] and meta (a caller's per-shape plan key): the key then
        uses it instead of reading them."""
        h = self.hooks
        if self.off is None and not (_active(h.launch_enter_hook) or _active(h.launch_exit_hook)):
            dev = torch.cuda.current_device()
            key = (dev, spec_key(args, self.tensors), tuple(meta.items())) if static is None else \
                (dev, tensor_key(args, self.tensors), static)
            entry = self.entries.get(key)
            if entry is not None and self._direct(entry, grid, args, meta, dev):
                return
            ran = self.kernel[grid](*args, **meta)
            if self.off is None and entry is None:
                self._remember(key, ran)
            return
        self.kernel[grid](*args, **meta)

    def _remember(self, key, compiled) -> None:
        if not (hasattr(compiled, "packed_metadata") and hasattr(compiled, "function")):
            self.off = f"the JIT returned {type(compiled).__name__}, not a compiled kernel"
            return
        if len(self.entries) >= _MAX_ENTRIES:
            self.entries.clear()
        self.entries[key] = [compiled, None]      # + the constexpr values the launcher takes

    def _direct(self, entry, grid, args, meta, dev) -> bool:
        compiled, tail = entry
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        if self.stream is None:
            from triton.runtime import driver
            self.stream = driver.active.get_current_stream
        head = (grid[0], g1, g2, self.stream(dev), compiled.function, compiled.packed_metadata,
                None, None, None)
        if tail is None:
            if self.all_params is None:
                err = None
                for all_params in (True, False):
                    try:
                        compiled.run(*head, *args, *self._tail(meta, all_params))
                    except TypeError as exc:
                        err = exc
                        continue
                    self.all_params = all_params
                    entry[1] = self._tail(meta, all_params)
                    self.direct += 1
                    return True
                self.off = f"the compiled kernel's launcher took neither argument convention ({err})"
                _log.info("layerzero: direct Triton launch off for %s: %s", self.kernel, self.off)
                return False
            tail = entry[1] = self._tail(meta, self.all_params)
        compiled.run(*head, *args, *tail)
        self.direct += 1
        return True

    def _tail(self, meta, all_params) -> tuple:
        """The constexpr values after the other arguments, for a launcher that takes them."""
        return tuple(meta[n] for n in self.constexprs) if all_params else ()
