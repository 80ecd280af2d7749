"""lz.speculative_generate: the entry point, its option checks, the draft/target pair check, the
statistics and the host side of the loop (k per step, cache sizes, the result)."""
from __future__ import annotations

import dataclasses
import sys

import torch

from ..generation.plan import (_MIN_LENGTH, _REFUSED_OPTIONS, _REFUSED_PROCESSORS, _WARPERS, Warpers,
                               called_by_generate, refused_setting)
from . import graphs
from .loop import Loop, LookupDraft, ModelDraft, Runner

SCHEDULES = ("heuristic", "constant")
# transformers' processors / criteria this loop can't run, by the option that adds them
_PROCESSOR_OPTIONS = {
    "RepetitionPenaltyLogitsProcessor": "repetition_penalty",
    "EncoderRepetitionPenaltyLogitsProcessor": "encoder_repetition_penalty",
    "NoRepeatNGramLogitsProcessor": "no_repeat_ngram_size",
    "EncoderNoRepeatNGramLogitsProcessor": "encoder_no_repeat_ngram_size",
    "NoBadWordsLogitsProcessor": "bad_words_ids", "SequenceBiasLogitsProcessor": "sequence_bias",
    "ForcedBOSTokenLogitsProcessor": "forced_bos_token_id",
    "ForcedEOSTokenLogitsProcessor": "forced_eos_token_id",
    "SuppressTokensLogitsProcessor": "suppress_tokens",
    "SuppressTokensAtBeginLogitsProcessor": "begin_suppress_tokens",
    "InfNanRemoveLogitsProcessor": "remove_invalid_values", "LogitNormalization": "renormalize_logits",
    "ExponentialDecayLengthPenalty": "exponential_decay_length_penalty",
    "TypicalLogitsWarper": "typical_p", "EpsilonLogitsWarper": "epsilon_cutoff",
    "EtaLogitsWarper": "eta_cutoff", "TopHLogitsWarper": "top_h",
    "SynthIDTextWatermarkLogitsProcessor": "watermarking_config",
    "WatermarkLogitsProcessor": "watermarking_config",
}
_CRITERIA_OPTIONS = {"StopStringCriteria": "stop_strings", "MaxTimeCriteria": "max_time"}
_OPTIONS = {**_REFUSED_OPTIONS,
            "prompt_lookup_num_tokens": "transformers' prompt lookup; pass prompt_lookup=n instead"}
# model kwargs transformers prepares that the loop replaces with its own
_OWN_KWARGS = {"attention_mask", "position_ids", "use_cache", "logits_to_keep", "cache",
               "past_key_values", "cache_position", "return_dict"}


def _refuse(what: str) -> ValueError:
    return ValueError(f"lz.speculative_generate does not support {what}; use model.generate for it")


@dataclasses.dataclass
class SpeculativeStats:
    """What one `speculative_generate(..., stats=SpeculativeStats())` call did; the call fills it.

    rows: batch size. new_tokens: new tokens kept, summed over rows (each up to its EOS or
    max_new_tokens). target_forwards: the prefill plus one verify per step. draft_forwards:
    forwards of the draft model (0 for prompt lookup). drafted / accepted: draft tokens proposed to
    rows still generating, and how many of them the target accepted. draft_lengths: k of each
    step (the adaptive schedule's trace). holes: True when a batch advanced by its best row
    (rows that accepted fewer got masked columns), False when it advanced by its worst row.
    """
    rows: int = 0
    new_tokens: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    drafted: int = 0
    accepted: int = 0
    draft_lengths: list = dataclasses.field(default_factory=list)
    holes: bool = True

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted: the chance the target accepts a draft token."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        """New tokens a row gets per target forward (plain decoding: 1.0)."""
        return self.new_tokens / (self.rows * self.target_forwards) if self.target_forwards else 0.0


def speculative_generate(target, draft=None, input_ids=None, /, logits_processor=None,
                         stopping_criteria=None, generation_config=None, *, draft_model=None,
                         num_draft_tokens: int = 4, max_draft_tokens: int | None = None,
                         draft_schedule: str = "heuristic", prompt_lookup: int | None = None,
                         stats: SpeculativeStats | None = None, lz_patch: bool = True, **kwargs):
    """`target.generate(input_ids, **kwargs)`'s results from speculative decoding with `draft`.

        out = lz.speculative_generate(target, draft, input_ids, max_new_tokens=64)
        out = target.generate(input_ids, max_new_tokens=64, custom_generate=lz.speculative_generate,
                              draft_model=draft)
        out = lz.speculative_generate(target, None, input_ids, prompt_lookup=3, max_new_tokens=64)

    Greedy output is the target's greedy output; sampled output (do_sample, temperature, top_k,
    top_p, min_p) is distributed as the target's samples. Returns a LongTensor (B, prompt + new)
    or, with return_dict_in_generate, a GenerateDecoderOnlyOutput (sequences, scores, logits).
    Every generate() keyword passes through (attention_mask, max_new_tokens, pad_token_id,
    eos_token_id, min_new_tokens, cache_implementation, ...); options it can't honour raise
    ValueError naming them.

    draft: a causal LM sharing the target's vocabulary (`check_pair`), or None with
    `prompt_lookup=n`: draft from the text so far (n-gram matches, n down to 1). Through
    `custom_generate`, pass it as `draft_model=` (or `draft=`). num_draft_tokens: k of the first step;
    draft_schedule "heuristic" (k + 2 after a step where at least half the rows accepted all k,
    else k - 1, within 1..max_draft_tokens, default 2 * num_draft_tokens) or "constant".
    stats: a SpeculativeStats the call fills (acceptance rate, tokens per target forward).

    The target's K/V: a DynamicCache, a StaticCache, or an lz.PagedKVCache passed as `cache=`
    (the target must run LayerZero's attention; the batch then advances by its worst row).
    On CUDA (no scores or logits asked for, no cache of the caller's but a StaticCache) both
    models keep K/V in full static caches and each step (the draft's k forwards, the target's
    verify, acceptance, the bookkeeping) is one CUDA graph per k, replayed (`graphs`); the
    models are patched with `lz.patch` first unless `lz_patch=False` (an unpatched model's eager
    attention may not capture: that is logged and counted, and its steps run eagerly).
    """
    caller = sys._getframe(1)
    if called_by_generate(caller):
        outer = caller.f_locals   # transformers' custom_generate protocol: draft is input_ids here
        if "draft" in kwargs:     # generate(..., draft=d): a keyword, so here (positional-only above)
            if draft_model is not None:
                raise ValueError("pass the draft once: draft_model= or draft=")
            draft_model = kwargs.pop("draft")
        if outer.get("assistant_model") is not None:
            raise _refuse("assistant_model (transformers' assisted decoding); pass the draft as draft_model=")
        if outer.get("synced_gpus"):
            raise _refuse("synced_gpus")
        spec = dict(num_draft_tokens=num_draft_tokens, max_draft_tokens=max_draft_tokens,
                    draft_schedule=draft_schedule, prompt_lookup=prompt_lookup, lz_patch=lz_patch)
        return _run(target, draft_model, draft, logits_processor, stopping_criteria, generation_config,
                    outer.get("streamer"), spec, stats, kwargs)
    draft = kwargs.pop("draft", draft)                 # given as keywords: the same arguments
    input_ids = kwargs.pop("input_ids", input_ids)
    if not hasattr(target, "generate") or not hasattr(target, "config"):
        raise TypeError(f"target must be a transformers model with generate(), got {type(target).__name__}")
    if isinstance(draft, torch.Tensor):
        raise TypeError("speculative_generate(target, draft, input_ids, ...): draft is a model "
                        "(or None with prompt_lookup=n), got a tensor")
    if draft_model is not None:
        raise TypeError("draft_model= is for target.generate(custom_generate=...); pass the draft "
                        "as speculative_generate's second argument")
    if kwargs.get("custom_generate") is not None:
        raise ValueError("custom_generate: speculative_generate is the decoding method; leave it out")
    return target.generate(input_ids, logits_processor=logits_processor,
                           stopping_criteria=stopping_criteria, generation_config=generation_config,
                           custom_generate=speculative_generate, draft_model=draft,
                           num_draft_tokens=num_draft_tokens, max_draft_tokens=max_draft_tokens,
                           draft_schedule=draft_schedule, prompt_lookup=prompt_lookup, stats=stats,
                           lz_patch=lz_patch, **kwargs)


def _special_ids(model, name: str):
    v = getattr(getattr(model, "generation_config", None), name, None)
    if v is None:
        v = getattr(model.config.get_text_config(decoder=True), name, None)
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    return tuple(sorted(set(v))) if isinstance(v, (list, tuple)) else v


def _vocab(model) -> int:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    w = getattr(out, "weight", None)
    return int(w.shape[0]) if w is not None else int(model.config.get_text_config(decoder=True).vocab_size)


def check_pair(target, draft) -> None:
    """Raise ValueError unless `draft` can draft for `target`: a decoder-only model on the same
    device with the same number of logits (output embedding rows), config vocab_size and special
    token ids (bos, eos, pad: generation config, else model config). Without a tokenizer this is
    what can be checked; the message lists every difference."""
    if getattr(draft.config, "is_encoder_decoder", False):
        raise ValueError("the draft is an encoder-decoder model; speculative_generate needs a causal LM")
    diffs = []
    tv, dv = _vocab(target), _vocab(draft)
    if tv != dv:
        diffs.append(f"vocab size (logits): target {tv}, draft {dv}")
    tc = target.config.get_text_config(decoder=True).vocab_size
    dc = draft.config.get_text_config(decoder=True).vocab_size
    if tc != dc:
        diffs.append(f"config.vocab_size: target {tc}, draft {dc}")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        t, d = _special_ids(target, name), _special_ids(draft, name)
        if t != d:
            diffs.append(f"{name}: target {t}, draft {d}")
    if diffs:
        raise ValueError("draft and target must share the vocabulary; they differ in " + "; ".join(diffs))
    td, dd = next(target.parameters()).device, next(draft.parameters()).device
    if td != dd:
        raise ValueError(f"draft on {dd}, target on {td}: put both on one device")


class _Plan(Warpers):
    """What each position's logits go through, read off transformers' prepared processors and
    criteria; anything else raises ValueError naming the option."""

    def __init__(self, cfg, processors, criteria, prompt_len: int):
        self.greedy = not cfg.do_sample
        self.temperature, self.top_k, self.top_p, self.min_p = 1.0, None, None, None
        self.min_new, self.min_eos, self.eos, self.max_new = 0, None, None, None
        for p in processors or ():
            name = type(p).__name__
            if name in _REFUSED_PROCESSORS:
                raise _refuse(_REFUSED_PROCESSORS[name])
            if name in _MIN_LENGTH:
                n = (p.min_length - prompt_len if name == "MinLengthLogitsProcessor"
                     else p.min_new_tokens + p.prompt_length_to_skip - prompt_len)
                if n > 0:
                    self.min_new = max(self.min_new, n)
                    self.min_eos = torch.as_tensor(p.eos_token_id).view(-1)
            elif name in _WARPERS and self._warper(p):
                pass
            else:
                opt = _PROCESSOR_OPTIONS.get(name)
                raise _refuse(f"{opt} (its logits processor {name})" if opt else f"the logits processor {name}")
        for c in criteria or ():
            name = type(c).__name__
            if name == "MaxLengthCriteria":
                self.max_new = c.max_length - prompt_len
            elif name == "EosTokenCriteria":
                self.eos = torch.as_tensor(c.eos_token_id).view(-1)
            else:
                opt = _CRITERIA_OPTIONS.get(name)
                raise _refuse(f"{opt} (its stopping criterion {name})" if opt else f"the stopping criterion {name}")
        if self.max_new is None:
            raise ValueError("generation has no max_length / max_new_tokens: speculative_generate needs a bound")

    def key(self) -> tuple:
        """What the steps do, as a key (a kept graphed loop serves calls of equal keys)."""
        ids = [None if t is None else tuple(t.tolist()) for t in (self.min_eos, self.eos)]
        return (self.greedy, self.temperature, self.top_k, self.top_p, self.min_p, self.min_new, *ids, self.max_new)


def _check_options(model, cfg, model_kwargs: dict) -> None:
    why = refused_setting(model, cfg, _OPTIONS)
    if why:
        raise _refuse(why)
    if cfg.cache_implementation not in (None, "static", "dynamic"):
        raise _refuse(f"cache_implementation={cfg.cache_implementation!r} (it takes 'dynamic' or 'static')")
    extra = sorted(k for k, v in model_kwargs.items() if k not in _OWN_KWARGS and v is not None)
    if extra:
        raise _refuse(f"the model input(s) {', '.join(extra)} (it takes input_ids and attention_mask)")


def _layer_types(model) -> list[str]:
    cfg = model.config.get_text_config(decoder=True)
    types = getattr(cfg, "layer_types", None)
    if types is None:
        kind = "sliding_attention" if getattr(cfg, "sliding_window", None) is not None else "full_attention"
        types = [kind] * cfg.num_hidden_layers
    odd = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
    if odd:
        raise _refuse(f"layer type(s) {', '.join(odd)} (only full and sliding-window attention layers)")
    return list(types)


def _full_static_cache(model, max_len: int):
    """A StaticCache with one full-length StaticLayer per decoder layer (sliding windows come from
    the mask), which rolls back by moving its write position (`crop`)."""
    from transformers.cache_utils import Cache, StaticCache, StaticLayer

    cache = StaticCache.__new__(StaticCache)
    Cache.__init__(cache, layers=[StaticLayer(max_cache_len=max_len) for _ in _layer_types(model)])
    return cache


def _callers_cache(model_kwargs: dict):
    """The cache the caller passed (cache= / past_key_values=), or None; transformers' own empty
    cache for its loop doesn't count (it marks the caller's `_is_user_defined`)."""
    given = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    return given if getattr(given, "_is_user_defined", False) else None


def _target_cache(model, cfg, model_kwargs, need: int, roomy: int, fixed: bool):
    """(cache, capacity in columns) for the target. A StaticCache passed in is used as it is (its
    capacity bounds k near the end), so are a DynamicCache and an lz.PagedKVCache (no bound);
    cache_implementation="static", or none asked for where the steps are graphed (`fixed`), gets
    a full-layer StaticCache of `roomy` columns; otherwise a plain DynamicCache (one full layer
    per decoder layer)."""
    from transformers.cache_utils import DynamicCache, StaticCache, StaticLayer

    from ..paged.cache import PagedKVCache

    given = _callers_cache(model_kwargs)
    if isinstance(given, PagedKVCache) and given.graph_mode:
        raise ValueError("this lz.PagedKVCache is in graph mode (pages reserved by an earlier decode "
                         "loop); call cache.reset() before lz.speculative_generate")
    if given is not None and given.get_seq_length() != 0:
        raise _refuse(f"a cache holding {int(given.get_seq_length())} tokens (continuing from a cache)")
    if isinstance(given, (DynamicCache, PagedKVCache)):
        return given, None
    if isinstance(given, StaticCache) and cfg.cache_implementation != "static":
        odd = sorted({type(layer).__name__ for layer in given.layers if type(layer) is not StaticLayer})
        if odd:
            raise _refuse(f"a StaticCache with {', '.join(odd)} layers (they can't roll back); pass "
                          "cache_implementation='static' for one that can")
        cap = int(given.get_max_length())
        if cap < need:
            raise ValueError(f"the StaticCache holds {cap} tokens; this call needs at least {need} "
                             "(prompt + max_new_tokens - 1) and uses more, when it has room, to draft")
        return given, cap
    if given is not None and not isinstance(given, StaticCache):
        raise _refuse(f"a cache of type {type(given).__name__} (DynamicCache, StaticCache or lz.PagedKVCache)")
    if cfg.cache_implementation == "static" or (fixed and given is None and cfg.cache_implementation is None):
        return _full_static_cache(model, roomy), roomy
    return DynamicCache(), None


def _run(target, draft, input_ids, processors, criteria, cfg, streamer, spec: dict, stats, model_kwargs):
    _check_options(target, cfg, model_kwargs)
    if input_ids is None or input_ids.dim() != 2:
        raise _refuse("inputs without 2-D input_ids (inputs_embeds or other modalities)")
    k0, kmax = spec["num_draft_tokens"], spec["max_draft_tokens"]
    lookup, schedule, lz_patch = spec["prompt_lookup"], spec["draft_schedule"], spec["lz_patch"]
    if not isinstance(k0, int) or k0 < 1:
        raise ValueError(f"num_draft_tokens={k0!r}: must be an int >= 1")
    kmax = 2 * k0 if kmax is None else kmax
    if not isinstance(kmax, int) or kmax < k0:
        raise ValueError(f"max_draft_tokens={kmax!r}: must be an int >= num_draft_tokens ({k0})")
    if schedule not in SCHEDULES:
        raise ValueError(f"draft_schedule={schedule!r}; valid: {', '.join(SCHEDULES)}")
    if draft is None and lookup is None:
        raise ValueError("speculative_generate needs a draft model (draft_model= through "
                         "generate) or prompt_lookup=n")
    if draft is not None and lookup is not None:
        raise ValueError("pass either a draft model or prompt_lookup=n, not both")
    if lookup is not None and (not isinstance(lookup, int) or lookup < 1):
        raise ValueError(f"prompt_lookup={lookup!r}: must be an int >= 1 (the longest n-gram matched)")
    rows, n = input_ids.shape
    if streamer is not None and rows > 1:
        raise _refuse(f"a streamer with a batch of {rows} rows")
    plan = _Plan(cfg, processors, criteria, n)
    types = _layer_types(target)
    if draft is not None:
        check_pair(target, draft)
        types += _layer_types(draft)
    max_new = plan.max_new
    stats = stats if stats is not None else SpeculativeStats()
    stats.__dict__.update(dataclasses.asdict(SpeculativeStats(rows=rows)))    # this call's, from zero
    if max_new <= 0:
        return input_ids
    want_scores = bool(cfg.return_dict_in_generate and cfg.output_scores)
    want_logits = bool(cfg.return_dict_in_generate and cfg.output_logits)
    graphed = graphs.wanted(input_ids.device) and not (want_scores or want_logits)
    if graphed and lz_patch and input_ids.is_cuda:
        graphs.prepare(target, draft)
    # a graphed loop of this shape and these settings from an earlier call (its own caches only)
    key = None
    if graphed and cfg.cache_implementation in (None, "static") and _callers_cache(model_kwargs) is None:
        key = (rows, n, max_new, kmax, lookup, plan.key())
        steps = graphs.kept(target, draft, key)
        if steps is not None:
            steps.restart(input_ids, model_kwargs.get("attention_mask"))
            return _decode(steps.loop, steps, plan, cfg, input_ids, k0, kmax, schedule, stats, streamer,
                           model_kwargs, want_scores, want_logits)
    # Batches advance by their best row and leave holes, unless a model's attention counts columns
    # rather than positions (sliding windows, no position_ids) or the cache keeps no holes (an
    # lz.PagedKVCache): then by their worst row.
    runner = Runner(target, None)
    models = [runner] + ([Runner(draft, None)] if draft is not None else [])
    # (a PagedKVCache keeps each row's real tokens only: no holes)
    paged = type(_callers_cache(model_kwargs)).__name__ == "PagedKVCache"
    holes = rows > 1 and "sliding_attention" not in types and all(r.takes_pos for r in models) and not paged
    crop_to_min = rows > 1 and not holes
    # columns: plain decoding needs prompt + max_new - 1; each step adds at most kmax + 1 columns
    need = n + max_new - 1
    roomy = n + max_new + kmax + (max_new if holes else 0)
    cache, cap = _target_cache(target, cfg, model_kwargs, need, roomy, graphed)
    static = cap is not None
    fixed = static and graphed
    if not static:
        cap = n + max_new * (kmax + 1) + 1    # never binds: the steps are at most max_new - 1
    runner.cache = cache
    if draft is not None:
        from transformers.cache_utils import DynamicCache

        models[1].cache = _full_static_cache(draft, cap) if static else DynamicCache()
        drafter = ModelDraft(models[1])
    else:
        drafter = LookupDraft(lookup)
    loop = Loop(runner, drafter, plan, input_ids, model_kwargs.get("attention_mask"), max_new=max_new,
                cap=cap, kmax=kmax, crop_to_min=crop_to_min, want_scores=want_scores,
                want_logits=want_logits, fixed=fixed)
    steps = graphs.StepGraphs(loop, models) if graphed and fixed else None
    if steps is not None and key is not None:
        graphs.keep(target, draft, key, steps)
    return _decode(loop, steps, plan, cfg, input_ids, k0, kmax, schedule, stats, streamer, model_kwargs,
                   want_scores, want_logits)


def _decode(loop: Loop, steps, plan, cfg, input_ids, k0: int, kmax: int, schedule: str, stats, streamer,
            model_kwargs, want_scores: bool, want_logits: bool):
    """The host side of the loop after its set-up: prefill, steps with k from the schedule,
    statistics, the result."""
    rows, n = input_ids.shape
    max_new, cap, drafter = plan.max_new, loop.cap, loop.draft
    runner, models = loop.target, [loop.target] + ([drafter.run] if isinstance(drafter, ModelDraft) else [])
    stats.holes = not loop.crop_to_min
    sent = 0
    loop.prefill()
    if streamer is not None:
        sent = _stream(streamer, loop, sent)
    k_sched = k0
    active, need_max = rows, max_new - 1
    if plan.eos is not None:
        active = int(loop.unfinished.sum())
    while active and need_max > 0:
        k = max(0, min(k_sched, need_max - 1, cap - loop.L - need_max))
        if k and isinstance(drafter, LookupDraft):
            k = min(k, drafter.available(loop, k))
        out = loop.step(k) if steps is None else steps.step(k)
        m, was_active, accepted, full, active, need_max = out.tolist()
        loop.commit(k, m)
        stats.draft_lengths.append(k)
        stats.drafted += k * was_active
        stats.accepted += accepted
        if k and schedule == "heuristic":
            k_sched = min(kmax, k_sched + 2) if 2 * full >= was_active else max(1, k_sched - 1)
        if streamer is not None:
            sent = _stream(streamer, loop, sent)
    if streamer is not None:
        streamer.end()
    kept = loop.kept()
    stats.new_tokens = int(kept.sum())
    stats.target_forwards = runner.forwards
    stats.draft_forwards = models[1].forwards if len(models) > 1 else 0
    t = int(kept.max())
    new = loop.seq[:, n:n + t].clone()
    if plan.eos is not None and cfg._pad_token_tensor is not None:
        new.masked_fill_(torch.arange(t, device=new.device)[None] >= kept[:, None], int(cfg._pad_token_tensor))
    sequences = torch.cat([input_ids, new], 1)
    if not cfg.return_dict_in_generate:
        return sequences
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    if (want_scores or want_logits) and t:
        _pad_scores(loop, sequences, model_kwargs.get("attention_mask"), kept, t)
    out = {"sequences": sequences}
    if want_scores:
        out["scores"] = tuple(loop.scores[:, i].clone() for i in range(t))
    if want_logits:
        out["logits"] = tuple(loop.logits[:, i].clone() for i in range(t))
    return GenerateDecoderOnlyOutput(**out)


def _pad_scores(loop: Loop, sequences, prompt_mask, kept, t: int) -> None:
    """Scores/logits of rows that ended at EOS before the longest row, past their EOS: generate()
    keeps feeding such a row pad tokens (unmasked) and reports the target's outputs on them; one
    uncached forward over those rows' final sequences gives the same values."""
    short = (kept < t).nonzero()[:, 0]
    if not len(short):
        return
    n = loop.prompt_len
    ids = sequences[short]
    mask = torch.ones_like(ids)
    if prompt_mask is not None:
        mask[:, :n] = prompt_mask[short]
    run = loop.target
    kw = {"attention_mask": mask, "use_cache": False}
    if run.takes_pos:
        kw["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    logits = run.model(input_ids=ids, **kw).logits[:, n - 1:n + t - 1].float()     # (R, t, V)
    index = torch.arange(t, device=ids.device).expand(len(short), t)
    after = (index >= kept[short, None]).unsqueeze(-1)                             # past the EOS
    if loop.logits is not None:
        loop.logits[short, :t] = torch.where(after, logits, loop.logits[short, :t])
    if loop.scores is not None:
        scores = loop.process(logits, index)
        loop.scores[short, :t] = torch.where(after, scores, loop.scores[short, :t])


def _stream(streamer, loop: Loop, sent: int) -> int:
    """Put the tokens kept since the last put (batch 1), as transformers' assisted decoding does."""
    kept = int(loop.kept()[0])
    if kept > sent:
        streamer.put(loop.seq[:, loop.prompt_len + sent: loop.prompt_len + kept].cpu())
    return max(kept, sent)
