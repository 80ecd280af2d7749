"""Speculative decoding with generate()'s results: `lz.speculative_generate`.

    out = lz.speculative_generate(target, draft, input_ids, max_new_tokens=128)
    out = target.generate(input_ids, max_new_tokens=128, custom_generate=lz.speculative_generate,
                          draft_model=draft)
    out = lz.speculative_generate(target, None, input_ids, prompt_lookup=3, max_new_tokens=128)
    stats = SpeculativeStats(); lz.speculative_generate(..., stats=stats); stats.acceptance_rate

transformers prepares the call (generation config, processors, stopping criteria, special tokens,
left-padding mask) and hands it over through its `custom_generate` protocol, as for `lz.generate`.
Each step the draft proposes k tokens (k forwards of the draft model, or n-gram matches in the
text so far); the target scores the pending token and the k drafts in one forward and accepts a
prefix of them per row:

- greedy (do_sample=False): drafts are accepted while they equal the target's argmax, so the
  output is the target's greedy output token for token;
- sampling: rejection sampling (Leviathan et al. 2023, Chen et al. 2023) on the distributions
  after transformers' processing (EOS blocked before min_new_tokens; temperature, top-k, top-p,
  min-p applied alike to the target's p and the draft's q): accept x with probability
  min(1, p(x)/q(x)); at the first rejection sample from norm(max(0, p - q)); when all k pass,
  a bonus token from p. Each new token is distributed as the target's own sample.

Rollback and batching (`loop.py`). The target's and the draft's caches share one column layout.
A step writes k+1 columns; every row keeps its accepted drafts plus one token. Rows accept
different counts, so the batch keeps the columns of its *best* active row and the columns past a
row's own tokens become holes: 0 in the 2-D attention mask (transformers' 4-D mask masks them,
and each column's position id counts only real columns, as left padding does). Both caches then
drop the columns past that (`Cache.crop`: a DynamicCache cuts its tensors, a StaticCache moves
its write position back; no copies). Holes cost attention over masked columns, never tokens.
Where attention counts columns rather than positions (sliding-window layers, models without
position_ids) holes would shift the window, so there the batch keeps its *worst* row's count
instead (no holes; rows that accepted more emit their next accepted draft, which is still an
exact sample, and lose the rest). Batch 1 never has holes. `SpeculativeStats.holes` says which.

Caches: a plain DynamicCache by default (one you pass is filled); `cache_implementation="static"`
gets full-length static layers sized for the prompt, the new tokens, k and (batches) holes; a
StaticCache you pass is used as it is, and its spare room bounds k (with exactly prompt +
max_new_tokens - 1 it decodes plainly); an lz.PagedKVCache you pass keeps the target's K/V in
pages (no holes: the batch keeps its worst row's count). The draft gets a cache of the same kind
(a DynamicCache for a paged target).

Adaptive k (`schedule`): by default ("acceptance") the k with the most expected new tokens per
unit of step time, from a running estimate of the per-token acceptance rate and the measured
step times; or transformers' schedule for assistants ("heuristic": k + 2 after a step where at
least half the active rows accepted all k drafts, else k - 1), or "constant"; within
1..max_draft_tokens; k also shrinks near max_new_tokens and when a static cache runs out of room.
EOS ends a row (tokens after it become pad_token_id, as generate() does); the call returns exactly
what generate() would: max_new_tokens new tokens unless every row ended earlier.

Per step, everything but one host read (the number of columns kept, with the counters that decide
the next k) is tensor work on preallocated buffers (`Loop.step`). On CUDA each step is one CUDA
graph per k (`graphs`: fixed addressing, full static caches, the models lz.patch-ed), kept with
the target for the next call of the same shape. Unsupported options (beam search, repetition
penalty and other processors that need a row's text, stop strings, assistant_model=, streamers
with batches, output_attentions, ...) raise ValueError naming the option.

Modules: `api` (entry point, host loop, statistics), `plan` (options, pair check), `caches`, `schedule`,
`loop` (the column layout, drafts, verification), `graphs` (the CUDA graphs).
"""
from .api import SpeculativeStats, check_pair, speculative_generate

__all__ = ["speculative_generate", "SpeculativeStats", "check_pair"]
