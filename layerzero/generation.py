"""lz.generate: transformers' `generate()` results from a decode loop built for the GPU.

    out = lz.generate(model, input_ids, max_new_tokens=128)            # or:
    out = model.generate(input_ids, max_new_tokens=128, custom_generate=lz.generate)

transformers prepares the call as for its own loop (generation config, logits processors,
stopping criteria, left-padding mask, streamer) and hands it to `generate` (its `custom_generate`
protocol); a direct call goes through `model.generate` the same way. The loop then:

- patches the model with `lz.patch` if it is not patched (`lz_patch=False` leaves it as it is);
- keeps K/V in a static cache (`StaticCache`, every layer full length: sliding windows come from
  the mask), sized to the prompt plus the new tokens rounded up to `LENGTH_BUCKET`;
- runs the prefill with the kernels LayerZero picks for the prompt's shapes; on CUDA (when the
  decode step is graphed too) the prompt is left-padded to a multiple of `PREFILL_BUCKET` and
  the prefill, with the first token's choice, is captured eagerly as a CUDA graph per padded
  length and replayed (time to first token at 128 tokens on the H200: 4 ms instead of 20, most
  of which was Python); a capture that fails is logged and counted, and that length prefills
  eagerly;
- runs each decode step as one function `_Loop.step`: the forward of one token per row, the
  logits processors transformers' generation config implies (min length, temperature, top-k,
  top-p, min-p), the next token through `lz.sample`, padding of finished rows, EOS and the step
  count. Everything it touches is a preallocated tensor, so on CUDA the step is compiled once
  (`torch.compile(fullgraph=True)`: every kernel decision is made while tracing), captured as a
  CUDA graph per batch size and prompt+new length bucket, and replayed once per token. The graph
  stays with the model for the next call of the same size (`_LOOPS`, the last `KEEP` per model).
- checks for stopping every `CHECK_EVERY` tokens through an asynchronous copy (no host sync per
  token), then cuts the result where transformers' loop would have stopped.

Logits processors or stopping criteria it can't run inside the step (repetition penalty, stop
strings, user-supplied ones, ...) run eagerly between steps (`_Loop.stepwise`): same results, no
graph, logged once. Options it can't honour (beam search, assisted or contrastive decoding,
constrained decoding, encoder-decoder models, output_attentions / output_hidden_states, continuing
from a filled cache, ...) raise ValueError naming the option and pointing to `model.generate`.
On CPU the same step runs eagerly (no compile, no graph), which is what CI tests.

`return_dict_in_generate` gives transformers' `GenerateDecoderOnlyOutput` with `sequences`,
`scores` and `logits` as asked; its cache entry is None (the static cache is kept for the next
call, not handed out).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import weakref
from typing import Any

import torch

from . import ops, reference, telemetry
from .compiled import trace_flags

log = logging.getLogger("layerzero")

LENGTH_BUCKET = 256     # static cache lengths are multiples of this (reuse across prompt lengths)
PREFILL_BUCKET = 64     # graphed prefills: prompts left-padded to a multiple of this (one graph each)
CHECK_EVERY = 16        # graph replays between two looks at the stop flag
KEEP = 2                # captured loops kept per model
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
# Graphed (CUDA) steps run sibling projections as one product: q/k/v and gate/up (patching.siblings).
FUSE_SIBLINGS = True
_LOOPS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_logged: set = set()

# transformers' processors and criteria the step runs itself (by class name)
_WARPERS = {"TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper"}
_MIN_LENGTH = {"MinLengthLogitsProcessor", "MinNewTokensLengthLogitsProcessor"}
# Processors that need more than the logits and the tokens so far: options model.generate has.
_REFUSED_PROCESSORS = {
    "PrefixConstrainedLogitsProcessor": "prefix_allowed_tokens_fn (constrained decoding)",
    "UnbatchedClassifierFreeGuidanceLogitsProcessor": "negative_prompt_ids / guidance_scale",
    "ClassifierFreeGuidanceLogitsProcessor": "guidance_scale (classifier-free guidance)",
    "HammingDiversityLogitsProcessor": "diversity_penalty (group beam search)",
}
# generation-config options of other decoding methods (set when not None/False/0/1)
_REFUSED_OPTIONS = {"num_beam_groups": "group beam search", "penalty_alpha": "contrastive search",
                    "dola_layers": "DoLa decoding", "constraints": "constrained beam search",
                    "force_words_ids": "constrained beam search",
                    "prompt_lookup_num_tokens": "prompt lookup decoding",
                    "assistant_early_exit": "self-speculative decoding",
                    "output_attentions": "returning attentions",
                    "output_hidden_states": "returning hidden states"}
# model kwargs transformers prepares that the loop replaces with its own
_OWN_KWARGS = {"attention_mask", "position_ids", "use_cache", "logits_to_keep", "cache",
               "past_key_values", "cache_position", "return_dict", "output_attentions",
               "output_hidden_states"}


def _refuse(what: str) -> ValueError:
    return ValueError(f"lz.generate does not support {what}; use model.generate for it")


def generate(model, input_ids: torch.Tensor | None = None, logits_processor=None,
             stopping_criteria=None, generation_config=None, lz_patch: bool = True,
             lz_streamer=None, **kwargs):
    """`model.generate(input_ids, **kwargs)`'s results (greedy tokens identical, same stopping,
    padding and return types) from a static-cache decode loop, CUDA-graphed on GPUs. Also the
    `custom_generate` callable of `model.generate`. `lz_patch=False`: don't `lz.patch` an
    unpatched model. Unsupported options raise ValueError (see the module's docstring)."""
    caller = sys._getframe(1)
    if (caller.f_code.co_name == "generate"
            and caller.f_globals.get("__name__") == "transformers.generation.utils"):
        # transformers calls us with everything prepared (its custom_generate protocol)
        outer = caller.f_locals
        if outer.get("assistant_model") is not None:
            raise _refuse("assistant_model (assisted decoding)")
        if outer.get("synced_gpus"):
            raise _refuse("synced_gpus")
        streamer, prompt_streamed = lz_streamer, False
        if streamer is None:  # model.generate(streamer=...) keeps it to itself: it put the prompt
            streamer, prompt_streamed = outer.get("streamer"), True
        return _run(model, input_ids, logits_processor, stopping_criteria, generation_config,
                    streamer, prompt_streamed, lz_patch, kwargs)
    if not hasattr(model, "generate") or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers model with generate(), got {type(model).__name__}")
    if kwargs.get("custom_generate") is not None:
        raise ValueError("custom_generate: lz.generate is the decoding method; leave it out")
    streamer = kwargs.pop("streamer", None)
    if streamer is not None:
        kwargs["lz_streamer"] = streamer   # model.generate passes a streamer on only this way
    return model.generate(input_ids, logits_processor=logits_processor,
                          stopping_criteria=stopping_criteria, generation_config=generation_config,
                          custom_generate=generate, lz_patch=lz_patch, **kwargs)


class _Plan:
    """What the step does, read off transformers' prepared processors and criteria."""

    def __init__(self, cfg, processors, criteria, prompt_len: int, device):
        self.greedy = not cfg.do_sample
        self.temperature, self.top_k, self.top_p, self.min_p = 1.0, None, None, None
        self.min_new = 0
        self.eos = None
        self.max_new = None
        self.eager_processors, self.eager_criteria = [], []
        inline = True
        for p in processors or ():
            name = type(p).__name__
            if name in _REFUSED_PROCESSORS:
                raise _refuse(_REFUSED_PROCESSORS[name])
            if name in _MIN_LENGTH:
                n = (p.min_length - prompt_len if name == "MinLengthLogitsProcessor"
                     else p.min_new_tokens + p.prompt_length_to_skip - prompt_len)
                self.min_new = max(self.min_new, n)
                self._min_eos = torch.as_tensor(p.eos_token_id, device=device).view(-1)
            elif name in _WARPERS and self._warper(p):
                pass
            else:
                inline = False
        for c in criteria or ():
            name = type(c).__name__
            if name == "MaxLengthCriteria":
                self.max_new = c.max_length - prompt_len
            elif name == "EosTokenCriteria":
                self.eos = torch.as_tensor(c.eos_token_id, device=device).view(-1)
            else:
                self.eager_criteria.append(c)
        if self.max_new is None:
            raise ValueError("generation has no max_length / max_new_tokens: lz.generate needs a bound")
        self.has_eos_criteria = any(hasattr(c, "eos_token_id") for c in criteria or ())
        if not inline:  # run transformers' processors as they are, eagerly, between steps
            self.eager_processors = list(processors)
            self.temperature, self.top_k, self.top_p, self.min_p, self.min_new = 1.0, None, None, None, 0

    def _warper(self, p) -> bool:
        """Take a warper into lz.sample's arguments; False when it has settings lz.sample lacks."""
        if getattr(p, "min_tokens_to_keep", 1) != 1 or getattr(p, "filter_value", -float("inf")) != -float("inf"):
            return False
        name = type(p).__name__
        if name == "TemperatureLogitsWarper":
            self.temperature = float(p.temperature)
        elif name == "TopKLogitsWarper":
            self.top_k = int(p.top_k)
        elif name == "TopPLogitsWarper":
            self.top_p = float(p.top_p)
        else:
            self.min_p = float(p.min_p)
        return True

    @property
    def stepwise(self) -> bool:
        return bool(self.eager_processors or self.eager_criteria)

    def key(self) -> tuple:
        eos = None if self.eos is None else tuple(self.eos.tolist())
        return (self.greedy, self.temperature, self.top_k, self.top_p, self.min_p, self.min_new,
                eos, self.has_eos_criteria, self.stepwise)


def _check_options(model, cfg, model_kwargs: dict) -> None:
    if model.config.is_encoder_decoder:
        raise _refuse("encoder-decoder models")
    if cfg.num_beams != 1:
        raise _refuse(f"num_beams={cfg.num_beams} (beam search)")
    for name, what in _REFUSED_OPTIONS.items():
        v = getattr(cfg, name, None)
        off = v is None or v is False or (name == "num_beam_groups" and v == 1) or (
            name == "penalty_alpha" and v == 0)
        if not off:
            raise _refuse(f"{name}={v!r} ({what})")
    if cfg.cache_implementation not in (None, "static", "dynamic"):
        raise _refuse(f"cache_implementation={cfg.cache_implementation!r}")
    extra = sorted(k for k, v in model_kwargs.items() if k not in _OWN_KWARGS and v is not None)
    if extra:
        raise _refuse(f"the model input(s) {', '.join(extra)} (lz.generate takes input_ids and "
                      "attention_mask)")
    for k in ("cache", "past_key_values"):
        c = model_kwargs.get(k)
        if c is not None and c.get_seq_length() != 0:
            raise _refuse(f"{k}= holding {int(c.get_seq_length())} tokens (continuing from a cache)")


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


class _Loop:
    """The buffers, cache and (on CUDA) the captured step of one (batch, length bucket, plan)."""

    def __init__(self, model, batch: int, max_len: int, plan: _Plan, device):
        self.model, self.plan = model, plan
        self.max_new = self.rows = 0            # this call's, set by prefill
        self.cache_kw, self.takes_pos, self.takes_cp, self.takes_keep = _forward_kwargs(model)
        self.cache = _static_cache(model, max_len)
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
        for layer in self.cache.layers:
            layer.reset()
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
            for layer in self.cache.layers:
                layer.reset()

    def _capture(self) -> None:
        """Compile the step (every kernel decision made while tracing), warm it up on a side
        stream and capture it as a CUDA graph; the loop's state is put back afterwards (also when
        this raises)."""
        saved = [t.clone() for t in self._state()]
        one = self.tok.shape[0] == 1
        try:
            if self.compiled is None:
                opts = COMPILE_OPTIONS if one else COMPILE_OPTIONS_BATCHED
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
                   and self.logits is None and self.graph is not False)
        if graphed and self.graph is None:
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


def batch_bucket(rows: int) -> int:
    """The batch size a loop (and its CUDA graph) is built for: 1, 2, 4, 8, 16, 32, 64, then
    multiples of 64."""
    if rows <= 64:
        return 1 << (rows - 1).bit_length()
    return -(-rows // 64) * 64


def _buckets(device, plan: _Plan) -> bool:
    """Round the batch up to `batch_bucket`? Only where the step becomes a CUDA graph (one graph
    serves every batch size of its bucket); eager steps run the batch as it is."""
    return device.type == "cuda" and not plan.stepwise


def _fuse_siblings(model) -> None:
    """Sibling projections (q/k/v, gate/up) of a patched model as one product each
    (`patching.siblings`), once per model; recorded in its patch report, undone by lz.unpatch."""
    from .patching import siblings
    from .patching.record import records

    rec = records.get(model)
    if rec is None or getattr(rec, "siblings_fused", False):
        return
    rec.siblings_fused = True
    n = siblings.fuse(model, rec.report, rec.undo)
    if n:
        log.info("lz.generate fused %d groups of sibling projections of %s (lz.unpatch(model) undoes it)",
                 n, type(model).__name__)


def _run(model, input_ids, processors, criteria, cfg, streamer, prompt_streamed, lz_patch, model_kwargs):
    from .patch import patch, report

    _check_options(model, cfg, model_kwargs)
    if input_ids is None or input_ids.dim() != 2:
        raise _refuse("inputs without 2-D input_ids (inputs_embeds or other modalities)")
    device = input_ids.device
    rows, n = input_ids.shape
    plan = _Plan(cfg, processors, criteria, n, device)   # raises on what it refuses: before patching
    if lz_patch and report(model) is None:
        patch(model)
        if id(model) not in _logged:
            _logged.add(id(model))
            log.info("lz.generate patched %s with lz.patch (lz.unpatch(model) undoes it)",
                     type(model).__name__)
    if plan.stepwise and ("stepwise", id(model)) not in _logged:
        _logged.add(("stepwise", id(model)))
        names = [type(x).__name__ for x in plan.eager_processors + plan.eager_criteria]
        log.info("lz.generate: %s run between steps, eagerly (no CUDA graph)", ", ".join(names))
    max_new = plan.max_new
    if max_new <= 0:
        return input_ids
    want_scores = bool(cfg.return_dict_in_generate and cfg.output_scores)
    want_logits = bool(cfg.return_dict_in_generate and cfg.output_logits)
    graphed = _buckets(device, plan) and not (want_scores or want_logits)
    if graphed and FUSE_SIBLINGS:
        _fuse_siblings(model)
    # a graphed prefill serves every prompt length of its bucket: left padding up to it
    lead = -n % PREFILL_BUCKET if graphed else 0
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None) or 1 << 30
    need = n + lead + max_new
    max_len = -(-need // LENGTH_BUCKET) * LENGTH_BUCKET
    max_len = max(need, min(max_len, limit))
    pad = cfg._pad_token_tensor
    mask = model_kwargs.get("attention_mask")
    if streamer is not None and not prompt_streamed:
        streamer.put(input_ids.cpu())
    if lead:
        mask = torch.ones_like(input_ids) if mask is None else mask
        input_ids = torch.nn.functional.pad(input_ids, (lead, 0), value=0 if pad is None else int(pad))
        mask = torch.nn.functional.pad(mask, (lead, 0), value=0)
    b = batch_bucket(rows) if _buckets(device, plan) else rows
    if b > rows:  # rows repeating the first one fill the bucket; they are cut off at the end
        fill = (0,) * (b - rows)
        input_ids = torch.cat([input_ids, input_ids[fill, :]])
        mask = None if mask is None else torch.cat([mask, mask[fill, :]])
    loops = _LOOPS.setdefault(model, {})
    key = (b, max_len, device, plan.key())
    loop = loops.pop(key, None)
    if loop is None:
        loop = _Loop(model, b, max_len, plan, device)
        while len(loops) >= KEEP:
            loops.pop(next(iter(loops)))
    else:  # same key, same step; the eager processors and criteria are this call's objects
        loop.plan.eager_processors, loop.plan.eager_criteria = plan.eager_processors, plan.eager_criteria
    loops[key] = loop
    if pad is not None:
        loop.pad.fill_(int(pad))
    decode_ctx = getattr(model, "_optimize_model_for_decode", contextlib.nullcontext)
    with torch.no_grad():
        loop.prefill(input_ids, mask, max_new, rows, want_scores, want_logits, graphed)
        with decode_ctx():
            kept = loop.decode(streamer)
    if streamer is not None:
        streamer.end()
    sequences = loop.seq[:rows, lead: lead + n + kept].clone()
    if not cfg.return_dict_in_generate:
        return sequences
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    out: dict[str, Any] = {"sequences": sequences}
    if want_scores:
        out["scores"] = tuple(loop.scores[i, :rows].clone() for i in range(kept))
    if want_logits:
        out["logits"] = tuple(loop.logits[i, :rows].clone() for i in range(kept))
    return GenerateDecoderOnlyOutput(**out)
