"""lz.speculative_generate on tiny fp32 models built from configs (no downloads): greedy output is
the target's greedy output token for token (batch 1 and a left-padded batch of 3, DynamicCache
and StaticCache, a draft model and prompt lookup, called directly and through custom_generate);
sampled output is distributed as the target's samples (chi-square against the target's own
probabilities); caches roll back; mismatched vocabularies and unsupported options raise.

The draft is the target with seeded noise on its weights (so it agrees often, not always: steps
with rejections and steps that accept everything), or the target itself (everything accepted),
or an unrelated model with another seed and one layer (almost nothing accepted)."""
from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys

import pytest
import torch

import layerzero as lz

T = pytest.importorskip("transformers")

from layerzero.speculative import SpeculativeStats, check_pair, speculative_generate  # noqa: E402
from layerzero.speculative import graphs as spec_graphs  # noqa: E402
from layerzero.speculative import loop as spec_loop  # noqa: E402
from helpers import one_thread  # noqa: E402,F401  (autouse)
from test_generate import PROMPT, _batch  # noqa: E402
from test_transformers import SMALL, _build  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _noisy(model, scale=0.3, seed=5):
    """A draft: `model` with seeded Gaussian noise (scale x each tensor's std) on every weight."""
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    return draft


@functools.lru_cache(maxsize=None)
def _pair(family="llama"):
    """(target, draft), built once per family (the calls don't change them)."""
    target, *_ = _build(family)
    return target, _noisy(target)


def _eos_that_stops(target, ids, mask, gen):
    """EOS ids that stop rows 0 and 2 early, at different steps (read off a run without EOS)."""
    free = target.generate(ids, attention_mask=mask, eos_token_id=None, **gen)
    return [int(free[0, PROMPT + 2]), int(free[2, PROMPT + 5])]


def _greedy_case(target, rows: int, new: int):
    """(ids, mask, eos, generate kwargs, target.generate's tokens): batch 1, or a left-padded batch
    of 3 whose EOS ids stop two rows early; row 0's prompt ends in a repeated pair (prompt lookup
    finds matches)."""
    ids, mask = _batch(rows)
    ids[0, -4:] = torch.tensor([5, 9, 5, 9])
    gen = dict(max_new_tokens=new, do_sample=False, pad_token_id=0)
    eos = _eos_that_stops(target, ids, mask, gen) if rows == 3 else None
    return ids, mask, eos, gen, target.generate(ids, attention_mask=mask, eos_token_id=eos, **gen)


def _both_routes(target, draft, ids, **kw):
    """(direct call, target.generate(custom_generate=...)) results; `kw` may hold a callable
    `fresh` giving per-call keyword arguments (a new StaticCache for each call)."""
    fresh = kw.pop("fresh", dict)
    a = speculative_generate(target, draft, ids, **kw, **fresh())
    b = target.generate(ids, custom_generate=speculative_generate, draft_model=draft, **kw, **fresh())
    return a, b


# -- greedy: the target's own tokens -----------------------------------------------------------

@pytest.mark.parametrize("cache", ["dynamic", "cache_implementation=static", "StaticCache object"])
@pytest.mark.parametrize("rows", [1, 3])
def test_greedy_is_the_targets_greedy(rows, cache):
    """Batch 3: rows accept different counts (holes in the mask) and stop at their own EOS."""
    target, draft = _pair()
    ids, mask = _batch(rows)
    gen = dict(max_new_tokens=14, do_sample=False, pad_token_id=0)
    eos = _eos_that_stops(target, ids, mask, gen) if rows == 3 else None
    want = target.generate(ids, attention_mask=mask, eos_token_id=eos, **gen)
    if rows == 3:
        assert (want[:, PROMPT:] == 0).any(), "the EOS ids should stop some row early"
    if cache == "cache_implementation=static":
        gen["cache_implementation"] = "static"

    def fresh():   # a StaticCache object fills up: a new one per call
        if cache != "StaticCache object":
            return {}
        return {"cache": T.StaticCache(config=target.config, max_cache_len=PROMPT + 14 + 24)}

    stats = SpeculativeStats()
    got, via_generate = _both_routes(target, draft, ids, attention_mask=mask, eos_token_id=eos, fresh=fresh,
                                     stats=stats, **gen)
    assert torch.equal(got, want)
    assert torch.equal(via_generate, want)
    assert 0 < stats.acceptance_rate < 1, stats          # steps with rejections and with acceptances
    assert stats.holes and stats.rows == rows
    assert stats.target_forwards < 14                    # fewer target forwards than tokens
    assert len(stats.step_seconds) == len(stats.draft_lengths) == stats.target_forwards - 1   # one per step


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_greedy_with_a_paged_cache_is_the_targets_greedy(family):
    """An lz.PagedKVCache as the target's cache (a model with LayerZero's attention): batch 1 and a
    left-padded batch of 3 with EOS, a draft model and prompt lookup; the batch advances by its
    worst row (the cache keeps no holes) and crop takes the rejected columns back; afterwards the
    cache holds each row's real tokens (padding takes no page)."""
    from test_paged_cache import _check_groups, _model

    target = _model(family)
    draft = _noisy(target, scale=0.1)
    for rows in (1, 3):
        ids, mask, eos, gen, want = _greedy_case(target, rows, 12)
        for d, kw in ((draft, {}), (None, {"prompt_lookup": 2})):
            cache = lz.PagedKVCache(target.config, page_size=4)
            stats = SpeculativeStats()
            got = speculative_generate(target, d, ids, attention_mask=mask, eos_token_id=eos, cache=cache,
                                       stats=stats, **kw, **gen)
            assert torch.equal(got, want), (rows, kw)
            assert (stats.accepted > 0 or d is None) and (rows == 1 or stats.holes is False)
            _check_groups(cache)
            for g in cache.groups:
                assert g.alloc.lens == (mask.sum(1) + cache.get_seq_length() - PROMPT).tolist()
    in_graph = lz.PagedKVCache(target.config, page_size=4)
    lz.generate(target, ids[:1], attention_mask=mask[:1], max_new_tokens=2, do_sample=False, cache=in_graph)
    with pytest.raises(ValueError, match="holding"):
        speculative_generate(target, draft, ids[:1], cache=in_graph, max_new_tokens=4)


def test_a_static_cache_without_room_decodes_plainly_and_one_too_small_raises():
    """A StaticCache of exactly prompt + max_new_tokens - 1 leaves no room to draft: k stays 0,
    the tokens are still the target's; one token less can't hold the call."""
    target, draft = _pair()
    ids, mask = _batch(1)
    gen = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    want = target.generate(ids, attention_mask=mask, **gen)
    stats = SpeculativeStats()
    tight = T.StaticCache(config=target.config, max_cache_len=PROMPT + 10 - 1)
    got = speculative_generate(target, draft, ids, attention_mask=mask, cache=tight, stats=stats, **gen)
    assert torch.equal(got, want) and set(stats.draft_lengths) == {0}
    small = T.StaticCache(config=target.config, max_cache_len=PROMPT + 10 - 2)
    with pytest.raises(ValueError, match="StaticCache holds 15 tokens; this call needs at least 16"):
        speculative_generate(target, draft, ids, attention_mask=mask, cache=small, **gen)


@pytest.mark.parametrize("rows", [1, 3])
def test_prompt_lookup_greedy_is_the_targets_greedy(rows):
    """No draft model: n-gram matches in the prompt and the tokens so far (repetitive prompts, so
    matches exist and some are right)."""
    target, _ = _pair()
    ids, mask = _batch(rows)
    ids[0] = torch.tensor([5, 9, 17, 5, 9, 17, 5])
    if rows == 3:
        ids[1, 2:] = torch.tensor([40, 41, 40, 41, 40])
    gen = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    want = target.generate(ids, attention_mask=mask, **gen)
    for cache in ({}, {"cache_implementation": "static"}):
        stats = SpeculativeStats()
        got = speculative_generate(target, None, ids, attention_mask=mask, prompt_lookup=3, stats=stats, **gen, **cache)
        via_generate = target.generate(ids, attention_mask=mask, custom_generate=speculative_generate,
                                       prompt_lookup=3, **gen, **cache)
        assert torch.equal(got, want) and torch.equal(via_generate, want)
        assert stats.accepted > 0 and stats.draft_forwards == 0 and stats.target_forwards < 20


def test_a_draft_equal_to_the_target_accepts_everything_and_k_grows():
    target, _ = _pair()
    ids, mask = _batch(1)
    gen = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)
    want = target.generate(ids, attention_mask=mask, **gen)
    stats = SpeculativeStats()
    got = speculative_generate(target, copy.deepcopy(target), ids, attention_mask=mask, stats=stats,
                               draft_schedule="heuristic", **gen)
    assert torch.equal(got, want)
    assert stats.acceptance_rate == 1.0
    assert stats.draft_lengths[:3] == [4, 6, 8]          # heuristic: +2 per step, up to 2 * 4
    assert stats.tokens_per_target_forward > 4
    assert stats.tokens_per_target_forward == stats.new_tokens / stats.target_forwards == 24 / stats.target_forwards
    stats = SpeculativeStats()
    speculative_generate(target, copy.deepcopy(target), ids, attention_mask=mask, stats=stats,
                         draft_schedule="constant", num_draft_tokens=3, **gen)
    assert set(stats.draft_lengths[:-1]) == {3}          # the last step only has room for fewer


def test_an_unrelated_draft_is_rejected_and_k_shrinks():
    """Another seed, one layer: (almost) nothing is accepted, k falls to 1, the tokens are right."""
    target, _ = _pair()
    cfg = T.LlamaConfig(num_key_value_heads=2, **{**SMALL, "num_hidden_layers": 1})
    torch.manual_seed(7)
    draft = T.LlamaForCausalLM._from_config(cfg).eval()
    ids, mask = _batch(3)
    gen = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    want = target.generate(ids, attention_mask=mask, **gen)
    stats = SpeculativeStats()
    got = speculative_generate(target, draft, ids, attention_mask=mask, stats=stats, draft_schedule="heuristic", **gen)
    assert torch.equal(got, want)
    assert stats.draft_lengths[:4] == [4, 3, 2, 1] and stats.acceptance_rate < 0.2


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gpt2", "qwen3"])
def test_other_families_left_padded_batch_with_eos(family):
    """Sliding windows (mistral, gemma2: the batch advances by its worst row, no holes), softcap
    (gemma2), learned positions (gpt2), q/k norms (qwen3)."""
    target, draft = _pair(family)
    ids, mask = _batch(3)
    gen = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    eos = _eos_that_stops(target, ids, mask, gen)
    want = target.generate(ids, attention_mask=mask, eos_token_id=eos, **gen)
    stats = SpeculativeStats()
    got, via_generate = _both_routes(target, draft, ids, attention_mask=mask, eos_token_id=eos, stats=stats, **gen)
    assert torch.equal(got, want) and torch.equal(via_generate, want)
    assert stats.holes == (family not in ("mistral", "gemma2"))


@pytest.mark.parametrize("family, drafter", [("llama", "model"), ("llama", "lookup"), ("mistral", "model"),
                                             ("gemma2", "model"), ("qwen3", "lookup")])
def test_fixed_addressing_of_the_graphed_steps_gives_the_targets_greedy(family, drafter, monkeypatch):
    """The code CUDA graphs replay (columns from a device counter, fixed-width feeds, full-length
    masks, static caches that seek instead of cropping), run eagerly on the CPU: batch 1 and a
    left-padded batch of 3 with EOS, k adapting (a new step shape per k). The same steps as the
    eager loop's: same acceptances, same k per step."""
    target, draft = _pair(family)
    if drafter == "lookup":
        draft = None
    addresses = []
    real_step = spec_graphs.StepGraphs.step

    def step(self, k):     # what a graph reads must stay where it was captured: no buffer moves
        addresses.append(_buffers(self.loop))
        return real_step(self, k)

    monkeypatch.setattr(spec_graphs.StepGraphs, "step", step)
    for rows in (1, 3):
        ids, mask, eos, gen, want = _greedy_case(target, rows, 14)
        runs = []
        for fixed in (False, True):
            addresses.clear()
            monkeypatch.setattr(spec_graphs, "FIXED_ON_CPU", fixed)
            stats = SpeculativeStats()
            got = speculative_generate(target, draft, ids, attention_mask=mask, eos_token_id=eos, stats=stats,
                                       draft_schedule="heuristic", **({"prompt_lookup": 2} if draft is None else {}),
                                       **gen)
            assert torch.equal(got, want), (family, drafter, rows, fixed)
            assert fixed == bool(addresses) and all(a == addresses[0] for a in addresses), (family, drafter, rows)
            runs.append(stats)
        prefill = int(draft is not None)      # fixed addressing feeds the draft the prompt first
        assert runs[1].draft_forwards == runs[0].draft_forwards + prefill
        runs[1].draft_forwards -= prefill
        assert runs[0] == runs[1]
        assert len(set(runs[1].draft_lengths)) > 1, runs[1].draft_lengths


def _buffers(loop) -> dict:
    """Where each tensor of the loop and of its draft (its lookup candidates) lives."""
    found = {}
    for owner, obj in (("loop", loop), ("draft", loop.draft)):
        for name, value in vars(obj).items():
            if isinstance(value, torch.Tensor):
                found[f"{owner}.{name}"] = (value.data_ptr(), tuple(value.shape))
    return found


def test_a_graphed_loop_is_kept_for_the_next_call_of_its_shape(monkeypatch):
    """The loop, its static caches and (on CUDA) graphs stay with the target: a second call with
    other prompts of the same shape reuses them from a clean state (tokens and statistics as a
    fresh loop's); another draft, length or EOS gets its own loop."""
    monkeypatch.setattr(spec_graphs, "FIXED_ON_CPU", True)
    target, draft = _pair()
    spec_graphs._KEPT.pop(target)
    built = []
    real = spec_graphs.StepGraphs.__init__

    def spy(self, *a, **kw):
        built.append(self)
        real(self, *a, **kw)

    monkeypatch.setattr(spec_graphs.StepGraphs, "__init__", spy)
    gen = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    ids, mask = _batch(3)
    first = []
    for shift in (0, 7, 0):
        prompt = (ids + shift) % 100 + 1
        want = target.generate(prompt, attention_mask=mask, eos_token_id=None, **gen)
        stats = SpeculativeStats()
        got = speculative_generate(target, draft, prompt, attention_mask=mask, eos_token_id=None, stats=stats,
                                   draft_schedule="heuristic", **gen)
        assert torch.equal(got, want), shift
        first.append(stats)
    assert len(built) == 1                                # one loop served the three calls
    assert first[0] == first[2]                           # the same prompts: the same steps, counted from 0
    speculative_generate(target, _noisy(target), ids, attention_mask=mask, eos_token_id=None, **gen)
    speculative_generate(target, draft, ids, attention_mask=mask, eos_token_id=[3], **gen)
    speculative_generate(target, draft, ids[:, 1:], attention_mask=mask[:, 1:], eos_token_id=None, **gen)
    assert len(built) == 4
    # the acceptance schedule's estimates go with the kept loop into the next call
    kept = spec_graphs.kept(target, draft, next(k for k in spec_graphs._KEPT[target] if k[1] == PROMPT - 1))
    learnt = kept.schedule
    assert learnt is not None and learnt.trials > 2
    speculative_generate(target, draft, ids[:, 1:], attention_mask=mask[:, 1:], eos_token_id=None, **gen)
    assert kept.schedule is learnt and len(built) == 4
    # weights that moved (lz.unpatch of fused siblings, param.data = ...): the graphs would read the
    # old place; the loop is built again
    with torch.no_grad():
        w = draft.model.layers[0].mlp.down_proj.weight
        w.data = w.data.clone()
    got = speculative_generate(target, draft, ids[:, 1:], attention_mask=mask[:, 1:], eos_token_id=None, **gen)
    assert len(built) == 5 and built[-1] is not kept
    assert torch.equal(got, target.generate(ids[:, 1:], attention_mask=mask[:, 1:], eos_token_id=None, **gen))
    # kept on the target (two: KEEP), holding the draft, and freed with them
    import gc
    import weakref

    own_t, own_d = copy.deepcopy(target), copy.deepcopy(draft)
    speculative_generate(own_t, own_d, ids, attention_mask=mask, eos_token_id=None, **gen)
    built.clear()
    assert len(spec_graphs._KEPT[own_t]) == 1 and len(spec_graphs._KEPT[target]) == spec_graphs.KEEP
    dead = [weakref.ref(own_t), weakref.ref(own_d)]
    del own_t, own_d
    gc.collect()
    assert [r() for r in dead] == [None, None]


def test_fixed_addressing_samples_from_the_target_distribution(monkeypatch):
    """Rejection sampling through the graphed steps' code (first-token marginal, chi-square)."""
    monkeypatch.setattr(spec_graphs, "FIXED_ON_CPU", True)
    target = _small("llama", 0, 2)
    draft = _noisy(target, scale=0.5)
    joint, _ = _probs(target, _warpers({}))
    torch.manual_seed(321)
    stats = SpeculativeStats()
    out = speculative_generate(target, draft, torch.tensor([SPEC_PROMPT]).expand(N, -1), max_new_tokens=4,
                               do_sample=True, num_draft_tokens=2, draft_schedule="constant", pad_token_id=0,
                               eos_token_id=None, stats=stats)
    assert 0.1 < stats.acceptance_rate < 0.8, stats
    x0, x1, x2 = out[:, len(SPEC_PROMPT):len(SPEC_PROMPT) + 3].unbind(1)
    counts = torch.zeros(V, V, V).index_put_((x0, x1, x2), torch.ones(N), accumulate=True)
    assert _chi2_pvalue(counts.sum((0, 2)), N * joint.sum((0, 2))) > 1e-3
    assert _chi2_pvalue(counts, N * joint) > 1e-3


def test_return_dict_scores_logits_min_new_tokens_and_max_length():
    target, draft = _pair("qwen2")
    ids, mask = _batch()
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    eos = _eos_that_stops(target, ids, mask, gen)
    for extra in ({"min_new_tokens": 5}, {"max_length": PROMPT + 6, "max_new_tokens": None},
                  {"min_length": PROMPT + 4}, {}):
        kw = {**gen, **extra, "eos_token_id": eos, "return_dict_in_generate": True,
              "output_scores": True, "output_logits": True}
        want = target.generate(ids, attention_mask=mask, **kw)
        got = speculative_generate(target, draft, ids, attention_mask=mask, **kw)
        assert type(got) is type(want)
        assert torch.equal(got.sequences, want.sequences), extra
        assert len(got.scores) == len(want.scores) == len(got.logits) == len(want.logits)
        for a, b in zip(got.scores + got.logits, want.scores + want.logits):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("max_new", [1, 2, 3, 9])
def test_max_new_tokens_is_exact_when_everything_is_accepted(max_new):
    target, _ = _pair()
    ids, mask = _batch()
    gen = dict(max_new_tokens=max_new, do_sample=False, pad_token_id=0, eos_token_id=None)
    want = target.generate(ids, attention_mask=mask, **gen)
    got = speculative_generate(target, copy.deepcopy(target), ids, attention_mask=mask, **gen)
    assert got.shape == (3, PROMPT + max_new) and torch.equal(got, want)


class Recorder(T.generation.streamers.BaseStreamer):
    def __init__(self):
        self.tokens, self.ended = [], False

    def put(self, value):
        self.tokens += value.flatten().tolist()

    def end(self):
        self.ended = True


def test_streamer_gets_transformers_tokens():
    """Batch 1: the prompt, then each step's kept tokens (transformers puts one per step)."""
    target, draft = _pair()
    ids, mask = _batch(1)
    gen = dict(max_new_tokens=9, do_sample=False, pad_token_id=0, eos_token_id=None)
    want = Recorder()
    target.generate(ids, attention_mask=mask, streamer=want, **gen)
    direct, routed = Recorder(), Recorder()
    speculative_generate(target, draft, ids, attention_mask=mask, streamer=direct, **gen)
    target.generate(ids, attention_mask=mask, streamer=routed, custom_generate=speculative_generate,
                    draft_model=draft, **gen)
    for got in (direct, routed):
        assert got.tokens == want.tokens and got.ended


# -- sampling: the target's distribution -------------------------------------------------------

V = 8          # a vocabulary small enough to count every (x0, x1, x2)
N = 4000       # rows sampled at once (one call)
SPEC_PROMPT = [3, 5, 1, 6]


def _small(family, seed, layers):
    """A vocab-8 model; its output layer scaled x10 so the distributions are neither flat nor peaked
    (the draft: its copy with noise, accepted about a third to half of the time)."""
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=V, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = (T.MistralConfig(sliding_window=4, **common) if family == "mistral" else T.LlamaConfig(**common))
    cls = T.MistralForCausalLM if family == "mistral" else T.LlamaForCausalLM
    torch.manual_seed(seed)
    model = cls._from_config(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    return model


def _warpers(kw):
    ws = T.LogitsProcessorList()
    if kw.get("temperature", 1.0) != 1.0:
        ws.append(T.TemperatureLogitsWarper(kw["temperature"]))
    if "top_k" in kw:
        ws.append(T.TopKLogitsWarper(kw["top_k"]))
    if "top_p" in kw:
        ws.append(T.TopPLogitsWarper(kw["top_p"]))
    return ws


def _probs(model, warp):
    """P[x0, x1, x2]: the model's sampling probabilities of the first three new tokens after the
    prompt (one forward of every prompt + x0 + x1, transformers' warpers on the logits)."""
    x = torch.cartesian_prod(torch.arange(V), torch.arange(V))                  # (V*V, 2)
    ids = torch.cat([torch.tensor([SPEC_PROMPT]).expand(V * V, -1), x], 1)
    with torch.no_grad():
        logits = model(ids).logits[:, -3:].float()                              # (V*V, 3, V)
    p = torch.stack([warp(ids, logits[:, i]).softmax(-1) for i in range(3)], 1)
    p0 = p[0, 0]                                                                 # (V,)
    p1 = p[::V, 1]                                                               # (x0, x1)
    p2 = p[:, 2].view(V, V, V)                                                   # (x0, x1, x2)
    return p0[:, None, None] * p1[:, :, None] * p2, p2


def _chi2_pvalue(counts, expected):
    """Pearson's chi-square p-value; cells expecting < 5 are pooled into one."""
    counts, expected = counts.double().flatten(), expected.double().flatten()
    big = expected >= 5
    o = torch.cat([counts[big], counts[~big].sum().view(1)])
    e = torch.cat([expected[big], expected[~big].sum().view(1)])
    if e[-1] < 5:
        o, e = o[:-1], e[:-1]
    stat = ((o - e) ** 2 / e).sum()
    df = len(o) - 1
    assert df >= 3, "too few cells for a meaningful test"
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


@pytest.mark.parametrize("family, warp, drafter", [
    ("llama", {}, "model"),
    ("llama", {"temperature": 0.7, "top_k": 6, "top_p": 0.9}, "model"),
    ("mistral", {"temperature": 0.7, "top_k": 6, "top_p": 0.9}, "model"),   # sliding window: no holes
    ("llama", {}, "lookup"),                                                # a point-mass draft
])
def test_rejection_sampling_reproduces_the_target_distribution(family, warp, drafter, monkeypatch):
    """N rows of one prompt, 4 new tokens, k = 2: x0 comes from the prefill, x1 and x2 from the
    first verify (accepted drafts, or a residual sample after a rejection) or, after a rejection,
    from the next step with both caches rolled back. Counts of x1, of (x0, x1, x2), and of x2 in
    the rows whose first verify rejected x1's draft (expected: the sum over those rows of the
    target's p(x2 | their x0, x1)) are tested against the target's own probabilities; for the draft
    model, the x1 counts must also be far from what the draft's own distribution would give (the
    test's power). Prompt lookup proposes the tokens after an earlier match of the last token(s)."""
    target = _small(family, 0, 2)
    draft = _noisy(target, scale=0.5) if drafter == "model" else None
    ws = _warpers(warp)
    joint, p2 = _probs(target, ws)
    first = {}
    real_accept = spec_loop.accept

    def spy(scores, drafts, q, greedy):
        n, nxt = real_accept(scores, drafts, q, greedy)
        first.setdefault("n", n.clone())
        return n, nxt

    monkeypatch.setattr(spec_loop, "accept", spy)
    torch.manual_seed(123)
    stats = SpeculativeStats()
    lookup = {"prompt_lookup": 2} if drafter == "lookup" else {}
    out = speculative_generate(target, draft, torch.tensor([SPEC_PROMPT]).expand(N, -1), max_new_tokens=4,
                               do_sample=True, num_draft_tokens=2, draft_schedule="constant", pad_token_id=0,
                               eos_token_id=None, stats=stats, **lookup, **warp)
    assert stats.holes == (family == "llama") and stats.draft_lengths[0] == 2
    assert 0.1 < stats.acceptance_rate < 0.8, stats
    x0, x1, x2 = out[:, len(SPEC_PROMPT):len(SPEC_PROMPT) + 3].unbind(1)
    counts = torch.zeros(V, V, V).index_put_((x0, x1, x2), torch.ones(N), accumulate=True)
    assert _chi2_pvalue(counts.sum((0, 2)), N * joint.sum((0, 2))) > 1e-3          # x1
    assert _chi2_pvalue(counts, N * joint) > 1e-3                                  # (x0, x1, x2)
    rejected = first["n"] == 0
    assert rejected.sum() > 500
    after = torch.bincount(x2[rejected], minlength=V)
    assert _chi2_pvalue(after, p2[x0[rejected], x1[rejected]].sum(0)) > 1e-3
    if draft is not None:   # what sampling from the draft would give is far off: the test has power
        draft_joint, _ = _probs(draft, ws)
        assert _chi2_pvalue(counts.sum((0, 2)), N * draft_joint.sum((0, 2))) < 1e-6


# -- what it refuses -----------------------------------------------------------------------------

def test_mismatched_vocabularies_raise():
    target, _ = _pair()
    ids, mask = _batch(1)
    smaller = T.LlamaForCausalLM._from_config(T.LlamaConfig(num_key_value_heads=2, **{**SMALL, "vocab_size": 96}))
    other_eos = _noisy(target)
    other_eos.generation_config.eos_token_id = 3
    for draft, says in ((smaller, "vocab size \\(logits\\): target 128, draft 96"),
                        (other_eos, "eos_token_id: target 2, draft 3")):
        with pytest.raises(ValueError, match="share the vocabulary.*" + says):
            check_pair(target, draft)
        for call in (lambda: speculative_generate(target, draft, ids, max_new_tokens=3),
                     lambda: target.generate(ids, max_new_tokens=3, custom_generate=speculative_generate,
                                             draft_model=draft)):
            with pytest.raises(ValueError, match=says):
                call()


@pytest.mark.parametrize("option, says", [
    ({"num_beams": 2}, "num_beams=2"),
    ({"repetition_penalty": 1.3}, "repetition_penalty"),
    ({"no_repeat_ngram_size": 2}, "no_repeat_ngram_size"),
    ({"do_sample": True, "typical_p": 0.5}, "typical_p"),
    ({"max_time": 5.0}, "max_time"),
    ({"output_attentions": True, "return_dict_in_generate": True}, "output_attentions"),
    ({"cache_implementation": "offloaded"}, "cache_implementation='offloaded'"),
    ({"prompt_lookup_num_tokens": 3}, "prompt_lookup_num_tokens"),
    ({"assistant_model": "draft"}, "assistant_model"),
    ({"num_draft_tokens": 0}, "num_draft_tokens=0"),
    ({"draft_schedule": "fast"}, "draft_schedule='fast'"),
    ({"prompt_lookup": 3}, "either a draft model or prompt_lookup"),
])
def test_options_it_cannot_honour_raise(option, says):
    target, draft = _pair()
    ids, mask = _batch()
    option = dict(option)
    if option.get("assistant_model") == "draft":
        option["assistant_model"] = draft
    for call in (lambda: speculative_generate(target, draft, ids, attention_mask=mask, max_new_tokens=3, **option),
                 lambda: target.generate(ids, attention_mask=mask, max_new_tokens=3,
                                         custom_generate=speculative_generate, draft_model=draft, **option)):
        with pytest.raises(ValueError) as e:
            call()
        assert says in str(e.value)


def test_keyword_forms_of_the_draft_and_input_ids():
    """speculative_generate(target, draft=..., input_ids=...) and generate(custom_generate=...,
    draft=...) are the same calls as the positional / draft_model= forms."""
    target, draft = _pair()
    ids, mask = _batch()
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=mask)
    want = target.generate(ids, **gen)
    assert torch.equal(speculative_generate(target, draft=draft, input_ids=ids, **gen), want)
    assert torch.equal(target.generate(ids, custom_generate=speculative_generate, draft=draft, **gen), want)
    with pytest.raises(ValueError, match="pass the draft once"):
        target.generate(ids, custom_generate=speculative_generate, draft=draft, draft_model=draft, **gen)


def test_a_draft_or_prompt_lookup_is_needed_and_batched_streaming_raises():
    target, draft = _pair()
    ids, mask = _batch()
    with pytest.raises(ValueError, match="needs a draft model .* or prompt_lookup=n"):
        speculative_generate(target, None, ids, attention_mask=mask, max_new_tokens=3)
    with pytest.raises(ValueError, match="streamer with a batch of 3 rows"):
        speculative_generate(target, draft, ids, attention_mask=mask, max_new_tokens=3,
                             streamer=Recorder())
    with pytest.raises(TypeError, match="draft is a model"):
        speculative_generate(target, ids, max_new_tokens=3)


# -- the benchmark (which trains a tiny pair with scripts/train_draft_pair.py --tiny) -------------

def test_benchmark_tiny_smoke(tmp_path):
    """benchmarks/speculative.py --tiny: trains a tiny pair (the training script's CPU path), runs
    every variant on it and the alpha sweep on the tiny llama, fp32, and checks that speculative
    greedy tokens equal plain greedy's (it exits non-zero otherwise)."""
    out = tmp_path / "spec.json"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "speculative.py"), "--tiny",
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {(r["variant"], r["batch"]) for r in res["pair"]["rows"]} == {
        ("plain", 1), ("assisted", 1), ("lz-eager", 1), ("lz", 1), ("lz-lookup", 1)}
    assert [r.get("alpha") for r in res["1b"]["rows"]] == [None, 0.5, 0.8, 0.95]
    assert all(r["same"] == r["batch"] for r in res["pair"]["rows"] + res["1b"]["rows"] if "same" in r)
    assert set(res["goals"]) == {"pair_vs_assisted_b1", "1b_alpha0.8_b1", "1b_draft_cost"}
    alpha8 = res["1b"]["rows"][2]
    assert set(alpha8["loop_cost"]["step_s"]) == {"1", "8"} and alpha8["loop_cost"]["draft_cost"] > 0
    assert res["pair"]["meta"]["tiny"] is True and res["pair"]["meta"]["target"]["steps"] == 30
