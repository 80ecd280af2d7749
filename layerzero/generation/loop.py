"""One decode loop of lz.generate (`_Loop`): the static cache, the preallocated buffers, the step
(forward of one token per row, processors, `lz.sample`, EOS), the prefill, and on CUDA the
compiled step captured as a CUDA graph and the prefill captured per padded prompt length."""
from __future__ import annotations

import logging

import torch

from .. import ops, reference, telemetry
from ..compiled import trace_flags
from .plan import _Plan, _refuse

log = logging.getLogger("layerzero")

PREFILL_BUCKET = 64     # graphed prefills: prompts left-padded to a multiple of this (one graph each)
CHECK_EVERY = 16        # graph replays between two looks at the stop flag
GRAPH_FALLBACK = "lz.generate.cuda_graph"   # lz.metrics()["fallbacks"] key: a step run eagerly
PREFILL_FALLBACK = "lz.generate.prefill_graph"  # ... a prefill run eagerly
# torch.compile arguments of the decode step, for a batch bucket of one row and for larger ones.
# Coordinate-descent tuning of inductor's kernels at batch 1: on the H200 (1B llama, bf16) a
# step took 1.156 ms instead of 1.439 (matrix-vector products as tuned Triton reductions fused
# with the norms and the gate; 184 kernels, not 282), for 41.6 s of first call instead of 12.4 s
# (scripts/generate_gpu_profile.py, since replaced by generate_gpu_explore.py). At batch 8 the products stay cuBLAS's either way and the
# tuning bought nothing (1.484 vs 1.454 ms a step) for 2.3x the first call
# (scripts/generate_gpu_explore.py, benchmarks/RESULTS.md).
COMPILE_OPTIONS: dict = {"options": {"coordinate_descent_tuning": True}}
COMPILE_OPTIONS_BATCHED: dict = {}
# Under that tuning inductor turns the batch-1 step's (1, K) x (K, N) products into reductions and
# fuses norms and gates into them (recomputed per output row), so the batch-1 step is traced with
# the flag "matvec": LayerZero's opaque Triton norms, RoPE and gates go first there
# (backends.priorities.MATVEC_OPAQUE; H200, 1B: 1.28 -> 1.08 ms a step).
TRACE_FLAGS = ("matvec",)
TRACE_FLAGS_BATCHED: tuple = ()

def _forward_kwargs(model) -> tuple[str, bool, bool, bool]:
    """(cache keyword, takes position_ids, takes cache_position, takes logits_to_keep) of
    model.forward in this transformers version."""
    import inspect

    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    return cache_kw, "position_ids" in params, "cache_position" in params, "logits_to_keep" in params


def _static_cache(model, max_len: int):
    """A StaticCache with one full-length static layer per decoder layer: one shape per step,
    no Python-side counters (sliding windows are in the mask transformers builds)."""
    from transformers.cache_utils import Cache, StaticCache, StaticLayer

    cfg = model.config.get_text_config(decoder=True)
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    odd = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
    if odd:
        raise _refuse(f"layer type(s) {', '.join(odd)} (only full and sliding-window attention layers)")

    class _FullStaticCache(StaticCache):
        def __init__(self):
            Cache.__init__(self, layers=[StaticLayer(max_cache_len=max_len) for _ in types])

    return _FullStaticCache()


def compile_options(opts: dict) -> dict:
    """`opts` for torch.compile; under coordinate-descent tuning, with the Triton kernels kept out
    of inductor's FX graph cache entries. Inductor keeps each tuned kernel's best config on disk,
    but a process that hits an entry with the kernels bundled in loads them from the bundle and
    tunes them all again: on the H200 (1B llama, batch-1 step) 84-96 tuning runs in every new
    process, 12 with the bundle off, and the first 8-token lz.generate 8.1 s instead of 10.7
    (benchmarks/RESULTS.md, "Issue 13, eighth session"). Older torch has no such bundle."""
    inner = opts.get("options", {})
    if not inner.get("coordinate_descent_tuning") or "bundle_triton_into_fx_graph_cache" in inner:
        return opts
    from torch._inductor import config as inductor_config
    if not hasattr(inductor_config, "bundle_triton_into_fx_graph_cache"):
        return opts
    return {**opts, "options": {**inner, "bundle_triton_into_fx_graph_cache": False}}


class _Loop:
    """The buffers, cache and (on CUDA) the captured step of one (batch, length bucket, plan)."""

    def __init__(self, model, batch: int, max_len: int, plan: _Plan, device, cache=None):
        self.model, self.plan = model, plan
        self.max_new = self.rows = 0            # this call's, set by prefill
        self.cache_kw, self.takes_pos, self.takes_cp, self.takes_keep = _forward_kwargs(model)
        self.cache = _static_cache(model, max_len) if cache is None else cache
        z = dict(device=device, dtype=torch.long)
        self.tok = torch.zeros(batch, 1, **z)
        self.pos = torch.zeros(batch, 1, **z)
        self.step_i = torch.zeros((), **z)      # new tokens so far
        self.cur = torch.zeros((), **z)         # where the next token goes in seq (the fed
                                                # token's cache position is cur - 1)
        self.done_at = torch.full((), -1, **z)
        self.unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        self.mask = torch.ones(batch, max_len, **z)
        self.seq = torch.zeros(batch, max_len, **z)
        self.prompt_len = 0                     # the host's copy, for the eager paths
        self.pad = torch.zeros((), **z)
        self.scores = self.logits = None
        self.graph = None
        self.compiled = None
        self.prefill_graphs: dict = {}          # padded prompt length -> (graph, ids) or False

    # -- the step -----------------------------------------------------------------------------
    def _forward(self, ids, mask, pos, cp):
        kw = {self.cache_kw: self.cache, "attention_mask": mask, "use_cache": True}
        if self.takes_pos:
            kw["position_ids"] = pos
        if self.takes_cp:
            kw["cache_position"] = cp
        if self.takes_keep:
            kw["logits_to_keep"] = 1
        return self.model(input_ids=ids, **kw).logits[:, -1].float()

    def _choose(self, logits, cur: int | None):
        """(next tokens, scores) from float32 logits (B, V): transformers' processors, then
        argmax or sampling through lz.sample."""
        p = self.plan
        if p.eager_processors:
            scores = logits
            for proc in p.eager_processors:
                scores = proc(self.seq[:, :cur], scores)
            nxt = ops.sample(scores, temperature=0.0 if p.greedy else 1.0)
            return nxt, scores
        if p.min_new > 0:
            eos = p._min_eos
            cols = logits.index_select(1, eos)
            cols = torch.where(self.step_i < p.min_new, torch.full_like(cols, -float("inf")), cols)
            logits = logits.index_copy(1, eos, cols)
        if p.greedy:
            return ops.sample(logits, temperature=0.0), logits
        nxt = ops.sample(logits, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p)
        scores = (reference.filter_logits(logits, p.temperature, p.top_k, p.top_p, p.min_p)
                  if self.scores is not None else logits)
        return nxt, scores

    def _advance(self, logits, cur: int | None = None) -> None:
        """Append the next token of every row (the step's tail, also after the prefill)."""
        p = self.plan
        nxt, scores = self._choose(logits, cur)
        if p.has_eos_criteria:
            nxt = torch.where(self.unfinished, nxt, self.pad)
        self.seq.index_copy_(1, self.cur.view(1), nxt.view(-1, 1))
        if self.scores is not None:
            self.scores.index_copy_(0, self.step_i.view(1), scores.unsqueeze(0))
        if self.logits is not None:
            self.logits.index_copy_(0, self.step_i.view(1), logits.unsqueeze(0))
        if p.eos is not None:
            self.unfinished &= ~torch.isin(nxt, p.eos)
        for c in p.eager_criteria:
            self.unfinished &= ~c(self.seq[:, :cur + 1], scores).to(self.unfinished.device)
        newly = (self.done_at < 0) & ~self.unfinished.any()
        self.done_at.copy_(torch.where(newly, self.step_i, self.done_at))
        self.tok.copy_(nxt.view(-1, 1))
        self.step_i += 1
        self.cur += 1

    def step(self, cur: int | None = None) -> None:
        """One decode step: the forward of the last token, then `_advance`. Reads and writes
        tensors only (`cur`, the sequence length on the host, is for eager processors)."""
        cp = (self.cur - 1).view(1) if self.takes_cp else None
        logits = self._forward(self.tok, self.mask, self.pos, cp)
        self.pos += 1
        self._advance(logits, cur)

    # -- running ------------------------------------------------------------------------------
    def _state(self) -> list[torch.Tensor]:
        lengths = [layer.cumulative_length for layer in self.cache.layers
                   if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]
        return [self.tok, self.pos, self.step_i, self.cur, self.done_at, self.unfinished,
                self.seq] + lengths

    def prefill(self, input_ids, attention_mask, max_new: int, rows: int, output_scores: bool,
                output_logits: bool, graphed: bool = False) -> None:
        """Reset the loop's state, run the prompt through the model and append the first new
        token. Rows past `rows` only fill the batch bucket: finished from the start. `graphed`:
        replay the prefill of this prompt length as a CUDA graph (captured on first use, eager
        prefill counted as a fallback when capturing fails)."""
        b, n = input_ids.shape
        self.max_new, self.rows = max_new, rows
        self._reset_cache()
        self.prompt_len = n
        self.mask.fill_(1)
        if attention_mask is not None:
            self.mask[:, :n].copy_(attention_mask)
        self.seq.zero_()
        self.seq[:, :n].copy_(input_ids)
        self.step_i.zero_()
        self.cur.fill_(n)
        self.done_at.fill_(-1)
        self.unfinished.fill_(True)
        if self.plan.has_eos_criteria:
            self.unfinished[rows:] = False
        self.scores = self.logits = None
        if graphed and self._prefill_graphed(input_ids):
            return
        logits = self._prefill_forward(input_ids, eager=True)
        vocab = logits.shape[-1]
        self.scores = (torch.empty(self.max_new, b, vocab, device=logits.device)
                       if output_scores else None)
        self.logits = (torch.empty(self.max_new, b, vocab, device=logits.device)
                       if output_logits else None)
        self._advance(logits, n)

    def _prefill_forward(self, input_ids, eager: bool = False):
        """The prompt's forward from the loop's mask (positions from its cumulative sum); sets
        `pos` for the first decode step. The prefill's graph runs this and `_advance`."""
        n = input_ids.shape[1]
        mask = self.mask[:, :n]
        pos = mask.cumsum(-1) - 1
        pos.masked_fill_(mask == 0, 1)
        logits = self._forward(input_ids, self.mask, pos, torch.arange(n, device=input_ids.device))
        self.pos.copy_(pos[:, -1:] + 1)
        return logits

    def _prefill_graphed(self, input_ids) -> bool:
        """Replay the prefill graph of this prompt length (capture it first: one eager prefill
        warms every kernel up, then the capture); False when capturing failed (logged, counted
        once per length: the prefill of that length runs eagerly)."""
        n = input_ids.shape[1]
        entry = self.prefill_graphs.get(n)
        if entry is None:
            entry = self.prefill_graphs[n] = self._capture_prefill(input_ids)
        if entry is False:
            return False
        graph, ids = entry
        ids.copy_(input_ids)
        graph.replay()
        return True

    def _capture_prefill(self, input_ids):
        saved = [t.clone() for t in self._state()]
        ids = input_ids.clone()

        def body():
            self._advance(self._prefill_forward(ids), None)

        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                body()                        # warm-up: lazy cache allocation, kernel choices
            torch.cuda.current_stream().wait_stream(s)
            for t, v in zip(self._state(), saved):
                t.copy_(v)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                body()
            return g, ids
        except Exception as exc:  # noqa: BLE001 - any failure of the capture: prefill eagerly
            telemetry.count_fallback(PREFILL_FALLBACK)
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            log.warning("lz.generate: capturing the prefill of %d tokens of %s raised %s (%s); "
                        "prefills of that length run eagerly", ids.shape[1], type(self.model).__name__,
                        type(exc).__name__, first)
            return False
        finally:
            for t, v in zip(self._state(), saved):
                t.copy_(v)
            self._reset_cache()

    def _reset_cache(self) -> None:
        for layer in self.cache.layers:
            layer.reset()

    def _graphable(self) -> bool:
        """May the decode steps become a CUDA graph (the cache's updates are device work)?"""
        return True

    def _capture(self) -> None:
        """Compile the step (every kernel decision made while tracing), warm it up on a side
        stream and capture it as a CUDA graph; the loop's state is put back afterwards (also when
        this raises)."""
        saved = [t.clone() for t in self._state()]
        one = self.tok.shape[0] == 1
        try:
            if self.compiled is None:
                opts = compile_options(COMPILE_OPTIONS if one else COMPILE_OPTIONS_BATCHED)
                self.compiled = torch.compile(self.step, fullgraph=True, dynamic=False, **opts)
            with trace_flags(*(TRACE_FLAGS if one else TRACE_FLAGS_BATCHED)):
                self._warm_and_capture()
        finally:
            for t, v in zip(self._state(), saved):
                t.copy_(v)

    def _warm_and_capture(self) -> None:
        """The compiled step's first calls (tracing, compiling) on a side stream, then its capture."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                self.compiled()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self.compiled()
        self.graph = g

    def _try_capture(self) -> bool:
        """`_capture`; if compiling or capturing raises, log and count it and run this loop's
        steps eagerly from now on (no runtime fallback exists inside a graph)."""
        try:
            self._capture()
            return True
        except Exception as exc:  # noqa: BLE001 - any failure of compile/capture: run eagerly
            self.graph = False
            telemetry.count_fallback(GRAPH_FALLBACK)
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            log.warning("lz.generate: compiling or capturing the decode step of %s raised %s (%s); "
                        "its steps run eagerly, without a CUDA graph", type(self.model).__name__,
                        type(exc).__name__, first)
            return False

    def decode(self, streamer) -> int:
        """Run the decode steps after the prefill's token; the number of new tokens to keep."""
        total = self.max_new
        done = 1
        graphed = (self.seq.is_cuda and not self.plan.stepwise and self.scores is None
                   and self.logits is None and self.graph is not False and self._graphable())
        if graphed and self.graph is None and done < total:   # (no step to run: no capture)
            graphed = self._try_capture()
        sent = 0
        pinned = flag = None
        if graphed:
            pinned = torch.empty(1, dtype=torch.bool, pin_memory=True)
            flag = torch.cuda.Event()
        while done < total:
            if graphed:
                n = min(CHECK_EVERY, total - done)
                for _ in range(n):
                    self.graph.replay()
                done += n
                pinned.copy_(self.unfinished.any().view(1), non_blocking=True)
                flag.record()
                flag.synchronize()
                stop = not bool(pinned[0])
            else:
                self.step(self.prompt_len + done)
                done += 1
                stop = not bool(self.unfinished.any())
            if streamer is not None:
                sent = self._stream(streamer, sent, done)
            if stop:
                break
        return self._kept(done)

    def _kept(self, done: int) -> int:
        at = int(self.done_at)
        return at + 1 if at >= 0 else done

    def _stream(self, streamer, sent: int, done: int) -> int:
        keep = self._kept(done)
        for j in range(sent, keep):
            streamer.put(self.seq[: self.rows, self.prompt_len + j].cpu())
        return keep
