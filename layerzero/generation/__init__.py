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
  stays with the model for the next call of the same size (`_LOOPS`, the last `KEEP` per model,
  kept on the model itself: `kept`, so that it goes with the model; lz.unpatch drops it), and is
  built again when the model's weights have moved since its capture (`kept.weights_key`:
  `param.data = ...`, `.to()`).
- checks for stopping every `CHECK_EVERY` tokens through an asynchronous copy (no host sync per
  token), then cuts the result where transformers' loop would have stopped.

With an empty `lz.PagedKVCache` passed the transformers way (`cache=` / `past_key_values=`, also
through `model.generate(..., custom_generate=lz.generate)`) the loop keeps K/V in it instead of
its static cache (`paged._PagedLoop`): the prefill runs eagerly (no padding kept, attention dense),
then, where steps are graphed, every row's pages for all its new tokens are reserved at once and
the cache switches to graph mode (device-only updates), so the decode step is compiled and
captured as above. The loop is kept per cache object (its graph names the cache's tensors); after
the call the cache holds the batch as transformers' loop would leave it, and the dict result
hands it back. Other cache objects the caller passes, and filled caches, raise.

Logits processors or stopping criteria it can't run inside the step (repetition penalty, stop
strings, user-supplied ones, ...) run eagerly between steps (`_Loop.stepwise`): same results, no
graph, logged once. Options it can't honour (beam search, assisted or contrastive decoding,
constrained decoding, encoder-decoder models, output_attentions / output_hidden_states, continuing
from a filled cache, ...) raise ValueError naming the option and pointing to `model.generate`.
On CPU the same step runs eagerly (no compile, no graph), which is what CI tests.

Modules: this one (the entry points, the batch and length buckets, the loops kept per model),
`plan` (what a call's step does, what it refuses), `loop` (the step, the prefill, the graphs),
`paged` (the loop over a caller's lz.PagedKVCache).

`return_dict_in_generate` gives transformers' `GenerateDecoderOnlyOutput` with `sequences`,
`scores` and `logits` as asked; its cache entry is None (the static cache is kept for the next
call, not handed out), or the caller's lz.PagedKVCache.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from typing import Any

import torch

from .loop import (CHECK_EVERY, COMPILE_OPTIONS, COMPILE_OPTIONS_BATCHED, GRAPH_FALLBACK,  # noqa: F401
                   PREFILL_BUCKET, PREFILL_FALLBACK, TRACE_FLAGS, TRACE_FLAGS_BATCHED, _Loop)
from .kept import PerModel, moved, weights_key
from .paged import _PagedLoop
from .plan import _Plan, _check_options, _paged_cache, _refuse, called_by_generate

log = logging.getLogger("layerzero")

LENGTH_BUCKET = 256     # static cache lengths are multiples of this (reuse across prompt lengths)
KEEP = 2                # captured loops kept per model
# Graphed (CUDA) steps run sibling projections as one product: q/k/v and gate/up (patching.siblings).
FUSE_SIBLINGS = True
_LOOPS = PerModel("_lz_generate_loops")     # model -> {key: loop}, kept on the model (kept.py)
_logged: set = set()


def generate(model, input_ids: torch.Tensor | None = None, logits_processor=None,
             stopping_criteria=None, generation_config=None, lz_patch: bool = True,
             lz_streamer=None, **kwargs):
    """`model.generate(input_ids, **kwargs)`'s results (greedy tokens identical, same stopping,
    padding and return types) from a static-cache decode loop, CUDA-graphed on GPUs. Also the
    `custom_generate` callable of `model.generate`. `lz_patch=False`: don't `lz.patch` an
    unpatched model. Unsupported options raise ValueError (see the module's docstring)."""
    caller = sys._getframe(1)
    if called_by_generate(caller):
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
    from ..patching import siblings
    from ..patching.record import records

    rec = records.get(model)
    if rec is None or getattr(rec, "siblings_fused", False):
        return
    rec.siblings_fused = True
    n = siblings.fuse(model, rec.report, rec.undo)
    if n:
        log.info("lz.generate fused %d groups of sibling projections of %s (lz.unpatch(model) undoes it)",
                 n, type(model).__name__)


def _run(model, input_ids, processors, criteria, cfg, streamer, prompt_streamed, lz_patch, model_kwargs):
    from ..patch import patch, report

    _check_options(model, cfg, model_kwargs)
    cache = _paged_cache(model_kwargs)      # the caller's empty lz.PagedKVCache, or None
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
    # a graphed prefill serves every prompt length of its bucket: left padding up to it (a
    # paged cache prefills eagerly: no padding)
    lead = -n % PREFILL_BUCKET if graphed and cache is None else 0
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
    if cache is not None and cache.max_batch_size is not None:   # fill rows only where they fit
        b = max(rows, min(b, cache.max_batch_size))
    if b > rows:  # rows repeating the first one fill the bucket; they are cut off at the end
        fill = (0,) * (b - rows)
        input_ids = torch.cat([input_ids, input_ids[fill, :]])
        mask = None if mask is None else torch.cat([mask, mask[fill, :]])
    loops = _LOOPS.setdefault(model, {})
    key = (b, max_len, device, plan.key(), cache)   # a paged loop's graph names the cache's tensors
    loop = loops.pop(key, None)
    weights = weights_key(model)
    if loop is not None and moved(loop.weights, weights, "lz.generate", model):
        loop = None                                      # its graphs read the old place
    if loop is None:
        loop = (_Loop(model, b, max_len, plan, device) if cache is None
                else _PagedLoop(model, b, max_len, plan, device, cache))
        while len(loops) >= KEEP:
            loops.pop(next(iter(loops)))
    else:  # same key, same step; the eager processors and criteria are this call's objects
        loop.plan.eager_processors, loop.plan.eager_criteria = plan.eager_processors, plan.eager_criteria
    loop.weights = weights
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
    if cache is not None:   # the caller's cache, holding the batch (transformers' field name varies)
        names = {f.name for f in dataclasses.fields(GenerateDecoderOnlyOutput)}
        out["cache" if "cache" in names else "past_key_values"] = cache
    if want_scores:
        out["scores"] = tuple(loop.scores[i, :rows].clone() for i in range(kept))
    if want_logits:
        out["logits"] = tuple(loop.logits[i, :rows].clone() for i in range(kept))
    return GenerateDecoderOnlyOutput(**out)
