"""lz.speculative_generate: the entry point, the statistics and the host side of the loop (k per
step, cache sizes, the kept graphed loops, the result); the option checks are in `plan`, the
caches in `caches`."""
from __future__ import annotations

import dataclasses
import sys
import time

import torch

from ..generation.plan import called_by_generate
from . import graphs
from .caches import _callers_cache, _full_static_cache, _target_cache
from .loop import Loop, LookupDraft, ModelDraft, Runner
from .plan import _check_options, _layer_types, _Plan, _refuse, check_pair
from .schedule import SCHEDULES, Schedule


@dataclasses.dataclass
class SpeculativeStats:
    """What one `speculative_generate(..., stats=SpeculativeStats())` call did; the call fills it.

    rows: batch size. new_tokens: new tokens kept, summed over rows (each up to its EOS or
    max_new_tokens). target_forwards: the prefill plus one verify per step. draft_forwards:
    forwards of the draft model (0 for prompt lookup). drafted / accepted: draft tokens proposed to
    rows still generating, and how many of them the target accepted. draft_lengths: k of each
    step (the adaptive schedule's trace). holes: True when a batch advanced by its best row
    (rows that accepted fewer got masked columns), False when it advanced by its worst row.
    step_seconds: the host's seconds of each step (launch or replay, and the read of its counters).
    draft_cost: a draft token's time over the rest of a step (the verify, acceptance and
    bookkeeping), as the "acceptance" schedule measured it from the host's step times (this call's
    and, for a kept graphed loop, the calls' before); None where it was not measured (other
    schedules, or fewer than two values of k timed).
    """
    rows: int = 0
    new_tokens: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    drafted: int = 0
    accepted: int = 0
    draft_lengths: list = dataclasses.field(default_factory=list)
    holes: bool = True
    step_seconds: list = dataclasses.field(default_factory=list, compare=False)   # timings: not what
    draft_cost: float | None = dataclasses.field(default=None, compare=False)    # happened (==)

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
                         draft_schedule: str = "acceptance", prompt_lookup: int | None = None,
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
    draft_schedule (`schedule`): "acceptance" (k with the most expected tokens per step time, from
    the running acceptance rate and the step times measured), "heuristic" (k + 2 after a step
    where at least half the rows accepted all k, else k - 1) or "constant"; k stays within
    1..max_draft_tokens (default 2 * num_draft_tokens).
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
    from ..paged.cache import PagedKVCache

    given = _callers_cache(model_kwargs)
    key = None
    if graphed and cfg.cache_implementation in (None, "static") and given is None:
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
    holes = (rows > 1 and "sliding_attention" not in types and all(r.takes_pos for r in models)
             and not isinstance(given, PagedKVCache))
    crop_to_min = rows > 1 and not holes
    # columns: plain decoding needs prompt + max_new - 1; each step adds at most kmax + 1 columns
    need = n + max_new - 1
    roomy = n + max_new + kmax + (max_new if holes else 0)
    cache, cap = _target_cache(target, cfg, given, need, roomy, graphed)
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
    steps = graphs.StepGraphs(loop, models) if fixed else None
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
    sched = Schedule(schedule, k0, kmax, isinstance(drafter, ModelDraft),
                     graphed=steps is not None and not steps.failed)
    if steps is not None:   # a kept loop keeps what its schedule learnt (rate, step times) too
        old = getattr(steps, "schedule", None)
        if old is not None and (old.kind, old.kmax) == (schedule, kmax) and schedule == "acceptance":
            sched = old
        steps.schedule = sched
    active, need_max = rows, max_new - 1
    if plan.eos is not None:
        active = int(loop.unfinished.sum())
    while active and need_max > 0:
        t0 = time.perf_counter()
        k = max(0, min(sched.k, need_max - 1, cap - loop.L - need_max))
        if k and isinstance(drafter, LookupDraft):
            k = min(k, drafter.available(loop, k))
        out = loop.step(k) if steps is None else steps.step(k)
        m, was_active, accepted, full, active, need_max = out.tolist()
        seconds = time.perf_counter() - t0
        sched.update(k, was_active, accepted, full, m, not loop.crop_to_min, seconds)
        stats.step_seconds.append(seconds)
        loop.commit(k, m)
        stats.draft_lengths.append(k)
        stats.drafted += k * was_active
        stats.accepted += accepted
        if streamer is not None:
            sent = _stream(streamer, loop, sent)
    if streamer is not None:
        streamer.end()
    kept = loop.kept()
    stats.draft_cost = sched.measured_cost()
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
