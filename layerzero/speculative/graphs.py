"""CUDA graphs of lz.speculative_generate's steps: on CUDA each step (the draft's k forwards, the
target's verify of k + 1 columns, acceptance, the bookkeeping; `loop.Loop.step` under fixed
addressing) is captured once per k and replayed, so a step costs its kernels, not the Python and
launches of some hundred of them. The host still reads one small tensor per step (m and the
counters: the adaptive k and the stopping test need them).

The first step of each k runs eagerly (it warms its kernels up: LayerZero's choices, Triton
builds, cuBLAS handles) and is captured right after (a capture records, it runs nothing: the
state the eager step left is the state the graph will read); every later step of that k
replays. So a new k costs one eager step and a capture, not two steps. The graphs share
one memory pool; each keeps the tensor the step returns. A capture that raises is logged and
counted (`lz.metrics()["fallbacks"][GRAPH_FALLBACK]`) and the call's steps run eagerly.

The loop (its buffers and static caches) and its graphs stay with the target for the next call
of the same shape and settings (`kept` / `keep`: the last KEEP per target, the draft held
weakly), which then starts replaying at once,
with the acceptance schedule's estimates (`schedule.Schedule`) of the calls before."""
from __future__ import annotations

import logging
import weakref

import torch

from .. import telemetry
from ..generation.kept import PerModel, moved, weights_key

log = logging.getLogger("layerzero")

GRAPH_FALLBACK = "lz.speculative.cuda_graph"
ENABLED = True          # graph the steps on CUDA
FIXED_ON_CPU = False    # tests: the graphed steps' fixed addressing on CPU (run eagerly: no graphs)
KEEP = 2                # graphed loops kept per target
_KEPT = PerModel("_lz_speculative_loops")   # target -> {key: (draft ref, StepGraphs)}, on the target


def wanted(device: torch.device) -> bool:
    """Are this call's steps graphed (before what the call asks for rules it out)? With
    FIXED_ON_CPU, CPU calls take the same path, with steps that run eagerly."""
    return ENABLED and (device.type == "cuda" or FIXED_ON_CPU)


def prepare(target, draft) -> None:
    """`lz.patch` the models that are not patched (their attention must capture: LayerZero's
    does), and, as lz.generate's graphed steps do, run their sibling projections (q/k/v, gate/up)
    as one product each (`patching.siblings`). lz.unpatch undoes both."""
    from ..generation import FUSE_SIBLINGS, _fuse_siblings
    from ..patch import patch, report

    for model in (target, draft):
        if model is None:
            continue
        if report(model) is None:
            patch(model)
            log.info("lz.speculative_generate patched %s with lz.patch (lz.unpatch(model) undoes it)",
                     type(model).__name__)
        if FUSE_SIBLINGS:
            _fuse_siblings(model)


def kept(target, draft, key: tuple):
    """The StepGraphs kept for (target, draft, key) by `keep`, or None (also when the models'
    weights have moved since its graphs were captured: `kept.weights_key`; it is dropped)."""
    loops = _KEPT.get(target) or {}
    entry = loops.get(key)
    if entry is None:
        return None
    ref, steps = entry
    if (ref() if ref is not None else None) is not draft:
        return None
    if moved(steps.weights, weights_key(target, draft), "lz.speculative_generate", target):
        loops.pop(key, None)
        return None
    return steps


def keep(target, draft, key: tuple, steps: "StepGraphs") -> None:
    loops = _KEPT.setdefault(target, {})
    loops.pop(key, None)
    while len(loops) >= KEEP:
        loops.pop(next(iter(loops)))
    loops[key] = (weakref.ref(draft) if draft is not None else None, steps)


class StepGraphs:
    """`step(k)`: the loop's step for k drafts, replayed from its CUDA graph once captured."""

    def __init__(self, loop, runners):
        self.loop, self.runners = loop, runners
        self.weights = weights_key(*(r.model for r in runners))   # where the graphs read them
        self.graphs: dict = {}          # k -> (graph, the step's returned tensor, forwards per runner)
        self.pool = None
        self.failed = not loop.tok.is_cuda     # (FIXED_ON_CPU: eager steps)
        self.schedule = None                   # the acceptance schedule's state, for the next call

    def restart(self, input_ids: torch.Tensor, attention_mask) -> None:
        """A new call of the loop's shape: its state from these prompts, empty caches, counters
        from zero; the graphs stay."""
        self.loop.reset(input_ids, attention_mask)
        for r in self.runners:
            r.forwards = 0
            for layer in r.cache.layers:
                layer.reset()
        if hasattr(self.loop.draft, "seen"):
            self.loop.draft.seen = 0

    def step(self, k: int) -> torch.Tensor:
        if self.failed:
            return self.loop.step(k)
        entry = self.graphs.get(k)
        if entry is None:
            out = self.loop.step(k)                 # eager: warms this k's kernels up
            self.graphs[k] = self._capture(k)       # records the step for the next one
            return out
        graph, out, forwards = entry
        graph.replay()
        for r, n in zip(self.runners, forwards):
            r.forwards += n
        return out

    def _capture(self, k: int):
        before = [r.forwards for r in self.runners]
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.loop.step(k)
        except Exception as exc:  # noqa: BLE001 - any failure of the capture: steps run eagerly
            self.failed = True
            telemetry.count_fallback(GRAPH_FALLBACK)
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            log.warning("lz.speculative_generate: capturing the step of %d drafts of %s raised %s (%s); "
                        "its steps run eagerly, without CUDA graphs", k,
                        type(self.runners[0].model).__name__, type(exc).__name__, first)
            return None
        finally:
            forwards = [r.forwards - b for r, b in zip(self.runners, before)]
            for r, b in zip(self.runners, before):
                r.forwards = b          # capturing ran nothing
        self.pool = graph.pool()
        return graph, out, forwards
