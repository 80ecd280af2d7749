"""The speculative decode loop: a column layout shared by the target's and the draft's caches, the
draft (a model, or n-gram lookup in the text so far), verification and the commit of a step.

Column layout. Both caches hold one entry per *column*; `tok`, `pos` and `mask` (B, cap) say, per
row, which token a column holds, its position id and whether it counts (1) or is left padding or
a hole (0). A step feeds the target columns L..L+k: the pending token y (already emitted, not yet
in the target's cache) and the k draft tokens. Row j accepts n_j of them; the batch then keeps m+1
of the k+1 columns (m: see `Loop.crop_to_min`), the caches drop the rest (`Cache.crop`: a
DynamicCache cuts its tensors, a StaticCache moves its write position back), and columns of a row
past its own n_j become holes (mask 0; transformers builds the 4-D mask from the 2-D one, and
position ids come from the count of real columns, so a hole shifts nothing).

Everything per step but the choice of m's value on the host (one sync: `Loop.step` returns it
with the counters the host needs) is tensor work on preallocated buffers.

Fixed addressing (`Loop.fixed`, on CUDA: `graphs.StepGraphs` captures each k's step as one CUDA
graph). The columns a step reads and writes are indexed from a device counter `Ld` (the host's `L`
follows it, for bounds only); every feed is a fixed number of columns (the draft's first forward
re-feeds column L-1 with the pending token at L: two columns, whatever the last step kept; one
column per further draft), the mask goes in at the caches' full length, and the caches are full
static ones that `seek` to the fed columns (no crop: rejected columns are overwritten later, and
the causal mask hides them until then). The draft sees the prompt in `prefill`.
"""
from __future__ import annotations

import torch

from .. import reference
from ..generation.loop import _forward_kwargs as forward_kwargs

NEG = float("-inf")


def sample_probs(probs: torch.Tensor) -> torch.Tensor:
    """One index per row of (..., V) probabilities, exactly distributed as them (the exponential
    race: argmax p_i / E_i with E_i ~ Exp(1)); no host sync, unlike torch.multinomial on some paths."""
    race = torch.empty_like(probs).exponential_(1).clamp_min_(1e-30)
    return (probs / race).argmax(-1)


def accept(scores: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor | None, greedy: bool):
    """Verify k drafts per row against the target.

    scores: (B, k+1, V) the target's processed logits at columns L..L+k (position i predicts the
    token after column L+i); drafts: (B, k) LongTensor; q: (B, k, V) the draft's probabilities the
    drafts were sampled from, or None for a deterministic draft (prompt lookup, or greedy).
    Returns (n, nxt): n (B,) the number of leading drafts accepted, nxt (B,) the token after them.

    Greedy: accept while the draft equals the target's argmax; nxt is the argmax after them.
    Sampling (Leviathan et al. 2023, Chen et al. 2023): draft x at position i is accepted with
    probability min(1, p_i(x) / q_i(x)); at the first rejection n, nxt ~ norm(max(0, p_n - q_n));
    when all k are accepted, nxt ~ p_k. With q = None the draft is a point mass: accept with
    probability p_i(x); the residual is p_n with x removed. Each emitted token is then distributed
    as the target's own sample given the tokens before it.
    """
    b, k1, _ = scores.shape
    k = k1 - 1
    if greedy:
        best = scores.argmax(-1)                                       # (B, k+1)
        n = (drafts == best[:, :k]).long().cumprod(1).sum(1) if k else best.new_zeros(b)
        return n, best.gather(1, n[:, None]).squeeze(1)
    p = scores.softmax(-1)                                             # (B, k+1, V)
    if k == 0:
        return p.new_zeros(b, dtype=torch.long), sample_probs(p[:, 0])
    p_d = p[:, :k].gather(2, drafts[..., None]).squeeze(2)             # (B, k)
    q_d = torch.ones_like(p_d) if q is None else q.gather(2, drafts[..., None]).squeeze(2)
    ok = torch.rand_like(p_d) * q_d < p_d                              # u < p/q, without dividing
    n = ok.long().cumprod(1).sum(1)                                    # (B,)
    idx = n[:, None, None].expand(-1, 1, p.shape[-1])
    p_n = p.gather(1, idx).squeeze(1)                                  # (B, V)
    if q is None:
        resid = p_n.scatter(1, drafts.gather(1, n.clamp(max=k - 1)[:, None]), 0.0)
    else:
        resid = (p_n - q.gather(1, idx.clamp(max=k - 1)).squeeze(1)).clamp_min(0.0)
    # all accepted: the bonus token comes from p_k; a residual with no mass is unreachable (a
    # rejection needs p(x) < q(x)) but is guarded against rounding
    use_p = (n == k) | (resid.sum(-1) <= 0)
    return n, sample_probs(torch.where(use_p[:, None], p_n, resid))


class Runner:
    """A model with its cache, fed `width` columns of the layout from column `start`."""

    def __init__(self, model, cache):
        self.model, self.cache = model, cache
        self.cache_kw, self.takes_pos, self.takes_cp, self.takes_keep = forward_kwargs(model)
        self.forwards = 0

    def __call__(self, loop: "Loop", start, width: int, keep: int, seek: bool = True) -> torch.Tensor:
        """Float32 logits (B, keep, V) of the last `keep` columns fed. `start`: an int, or under
        fixed addressing a 0-d device tensor (full-length mask; the static cache seeks to it,
        unless `seek` is False: the cache's last forward ended there)."""
        if isinstance(start, torch.Tensor):
            cols = start + loop.ar[:width]
            if seek:
                self.seek(start)
            ids, pos, mask = loop.tok.index_select(1, cols), loop.pos.index_select(1, cols), loop.mask[:, :loop.cap]
        else:
            cols = torch.arange(start, start + width, device=loop.tok.device)
            end = start + width
            ids, pos, mask = loop.tok[:, start:end], loop.pos[:, start:end], loop.mask[:, :end]
        kw = {self.cache_kw: self.cache, "attention_mask": mask, "use_cache": True}
        if self.takes_pos:
            kw["position_ids"] = pos
        if self.takes_cp:
            kw["cache_position"] = cols
        if self.takes_keep:
            kw["logits_to_keep"] = keep
        self.forwards += 1
        return self.model(input_ids=ids, **kw).logits[:, -keep:].float()

    def seek(self, start: torch.Tensor) -> None:
        """The next update of every static layer writes at column `start` (transformers' layers
        that count their length in a device tensor; older ones write at cache_position)."""
        for layer in self.cache.layers:
            n = getattr(layer, "cumulative_length", None)
            if isinstance(n, torch.Tensor) and getattr(layer, "is_initialized", True):
                n.copy_(start)

    def crop(self, drop: int) -> None:
        if drop:
            self.cache.crop(-drop)


class ModelDraft:
    """Draft tokens from a draft model. Its cache lags the target's: it holds columns [0, seen);
    each step feeds [seen, L] (the catch-up: the pending token, and the k-th draft of the last step
    when the batch kept all of them), then one column per further draft."""

    def __init__(self, runner: Runner):
        self.run = runner
        self.seen = 0

    def prefill(self, loop: "Loop") -> None:
        """Fixed addressing: the prompt but its last column (re-fed by the first step)."""
        if loop.prompt_len > 1:
            self.run(loop, 0, loop.prompt_len - 1, 1)
        self.seen = loop.prompt_len - 1

    def propose(self, loop: "Loop", k: int):
        drafts, qs = [], []
        start = self.seen
        for i in range(k):
            if loop.fixed:   # two columns first (L-1 and the pending token), then one per draft
                at, width = (loop.Ld - 1, 2) if i == 0 else (loop.Ld + i, 1)
            else:
                at, width = start, loop.L + i + 1 - start
                start = loop.L + i + 1
            # (fixed: the draft's later forwards continue where its first one ended: no seek)
            scores = loop.process(self.run(loop, at, width, 1, seek=i == 0), loop.count[:, None] + i)[:, 0]
            if loop.plan.greedy:
                d = scores.argmax(-1)
            else:
                q = scores.softmax(-1)
                d = sample_probs(q)
                qs.append(q)
            loop.put_column(loop.col(i + 1), d, i + 1)
            drafts.append(d)
        self.seen = loop.L + k
        return torch.stack(drafts, 1), (torch.stack(qs, 1) if qs else None)

    def rollback(self, columns: int) -> None:
        if self.seen > columns:
            self.run.crop(self.seen - columns)
            self.seen = columns


class LookupDraft:
    """Draft tokens by prompt lookup: the longest suffix of a row's text so far (prompt and new
    tokens, n tokens down to 1) that also occurs earlier proposes the tokens that followed its
    latest earlier occurrence. A row without a match proposes its last token (it is verified like
    any draft: a wrong guess costs nothing but the column)."""

    def __init__(self, ngram: int):
        self.ngram = ngram
        self.drafts = None      # (B, kmax) the candidates `propose` reads (one buffer: graphs read it)

    def available(self, loop: "Loop", k: int) -> int:
        """Find each row's k candidates (kept for `propose`); the most any row has from a match
        (the host reads it: a step with no match anywhere verifies the pending token alone)."""
        drafts, found = self.candidates(loop, k)
        if self.drafts is None or self.drafts.shape[0] != drafts.shape[0]:
            # kmax wide from the start: a graph captured for a smaller k keeps reading this buffer
            # (one allocated again for a larger k would leave it reading freed memory)
            self.drafts = torch.zeros(drafts.shape[0], loop.kmax, dtype=drafts.dtype, device=drafts.device)
        self.drafts[:, :k].copy_(drafts)
        return int(found.max())

    def candidates(self, loop: "Loop", k: int):
        """(drafts (B, k), how many of each row's drafts come from a match (B,))."""
        hist = loop.seq                                   # (B, S): prompt, then new tokens
        b, s = hist.shape
        length = loop.prompt_len + loop.count             # (B,) tokens so far
        first = loop.prompt_len - loop.prompt_valid       # (B,) first non-padding index
        cont = torch.full((b,), -1, dtype=torch.long, device=hist.device)
        for size in range(min(self.ngram, s - 1), 0, -1):
            idx = (length[:, None] - size + torch.arange(size, device=hist.device)).clamp(min=0)
            suffix = hist.gather(1, idx)                  # (B, size)
            win = hist.unfold(1, size, 1)                 # (B, S - size + 1, size): window at i
            at = torch.arange(win.shape[1], device=hist.device)[None]
            hit = ((win == suffix[:, None]).all(-1) & (at >= first[:, None])
                   & (at + size < length[:, None]) & (length[:, None] - size >= first[:, None]))
            latest = torch.where(hit, at + size, -1).amax(1)   # where the continuation starts
            cont = torch.where(cont < 0, latest, cont)         # longer n-grams win
        j = torch.arange(k, device=hist.device)[None]
        src = cont[:, None] + j
        valid = (cont[:, None] >= 0) & (src < length[:, None])
        last = hist.gather(1, (length - 1)[:, None])
        drafts = torch.where(valid, hist.gather(1, src.clamp(0, s - 1)), last)
        return drafts, valid.long().sum(1)

    def propose(self, loop: "Loop", k: int):
        drafts = self.drafts[:, :k]
        for i in range(k):
            loop.put_column(loop.col(i + 1), drafts[:, i], i + 1)
        return drafts, None

    def rollback(self, columns: int) -> None:
        pass


class Loop:
    """The state of one speculative_generate call (see the module docstring for the layout).

    Host-side ints: L (columns in the target's cache), prompt_len. Per-row tensors: count (new
    tokens so far, the pending one included), npos (position id of the pending token), length (new
    tokens kept when a row ended at EOS, else -1), unfinished. `seq` (B, P + max_new + slack)
    holds the prompt and each row's new tokens back to back (no holes): the output and the text
    prompt lookup searches.
    """

    def __init__(self, target: Runner, draft, plan, input_ids, attention_mask, *, max_new: int,
                 cap: int, kmax: int, crop_to_min: bool, want_scores: bool, want_logits: bool,
                 fixed: bool = False):
        self.target, self.draft, self.plan = target, draft, plan
        self.max_new, self.crop_to_min, self.fixed, self.cap = max_new, crop_to_min, fixed, cap
        b, n = input_ids.shape
        dev = input_ids.device
        z = dict(device=dev, dtype=torch.long)
        self.prompt_len = n
        self.Ld = torch.full((), n, **z)     # L on the device (fixed addressing)
        self.kmax = kmax
        self.ar = torch.arange(kmax + 2, **z)
        # columns [0, cap) reach the caches; one more holds the last pending token (never fed)
        self.tok = torch.zeros(b, cap + 1, **z)
        self.pos = torch.zeros(b, cap + 1, **z)
        self.mask = torch.zeros(b, cap + 1, **z)
        self.width = n + max_new + kmax + 2                 # the last column: a bin for overflow writes
        self.seq = torch.zeros(b, self.width, **z)
        self.prompt_valid = torch.zeros(b, **z)
        self.npos = torch.zeros(b, **z)
        self.count = torch.zeros(b, **z)
        self.length = torch.full((b,), -1, **z)
        self.unfinished = torch.ones(b, dtype=torch.bool, device=dev)
        self.reset(input_ids, attention_mask)
        self.scores = self.logits = None
        self.want_scores, self.want_logits = want_scores, want_logits
        self.eos = None if plan.eos is None else plan.eos.to(dev)
        self.min_eos = None                                 # (1, 1, V) bool, built on first use
        self.scores_len = self.width - n                    # new-token slots of scores/logits

    def reset(self, input_ids: torch.Tensor, attention_mask) -> None:
        """The state of a new call with prompts of this loop's shape, in the same tensors (a
        graphed loop is kept for the next call of its shape: its graphs name them)."""
        n = self.prompt_len
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        for t in (self.tok, self.pos, self.mask, self.seq, self.count):
            t.zero_()
        self.tok[:, :n] = input_ids
        self.mask[:, :n] = mask
        pos = mask.cumsum(-1) - 1
        self.pos[:, :n] = pos.masked_fill(mask == 0, 1)
        self.seq[:, :n] = input_ids
        self.prompt_valid.copy_(mask.sum(-1))
        self.npos.copy_(self.prompt_valid)
        self.length.fill_(-1)
        self.unfinished.fill_(True)
        self.Ld.fill_(n)
        self.L = n

    # -- per-step tensor work -------------------------------------------------------------------
    def process(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """transformers' processing of (B, n, V) logits: EOS blocked before min_new_tokens (index:
        (B, n) the new-token index each position predicts), then, when sampling, its warpers
        (temperature, top-k, top-p, min-p: `reference.filter_logits`)."""
        p = self.plan
        if p.min_new > 0:
            if self.min_eos is None:
                cols = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
                cols[p.min_eos.to(logits.device)] = True
                self.min_eos = cols.view(1, 1, -1)
            logits = logits.masked_fill((index < p.min_new).unsqueeze(-1) & self.min_eos, NEG)
        if not p.greedy:
            logits = reference.filter_logits(logits, p.temperature, p.top_k, p.top_p, p.min_p)
        return logits

    def col(self, offset: int):
        """Column L + offset: an int, or under fixed addressing a 0-d device tensor."""
        return (self.Ld if self.fixed else self.L) + offset

    def put_column(self, col, tokens: torch.Tensor, offset: int) -> None:
        """Column `col` (`self.col(...)`) holds `tokens` (B,) at position npos + offset, unmasked."""
        if isinstance(col, torch.Tensor):
            at = col.view(1)
            self.tok.index_copy_(1, at, tokens[:, None])
            self.pos.index_copy_(1, at, (self.npos + offset)[:, None])
            self.mask.index_fill_(1, at, 1)
            return
        self.tok[:, col] = tokens
        self.pos[:, col] = self.npos + offset
        self.mask[:, col] = 1

    def _emit(self, emitted: torch.Tensor, n_eff: torch.Tensor, active: torch.Tensor,
              logits: torch.Tensor, scores: torch.Tensor) -> None:
        """Append emitted[:, :n_eff+1] to the active rows' text; note EOS; store scores/logits."""
        j = torch.arange(emitted.shape[1], device=emitted.device)[None]
        at = (self.prompt_len + self.count[:, None] + j).clamp(max=self.width - 1)
        self.seq.scatter_(1, at, emitted)
        if self.scores is not None or self.logits is not None:
            t = (self.count[:, None] + j).clamp(max=self.scores_len - 1)[..., None]
            if self.scores is not None:
                self.scores.scatter_(1, t.expand_as(scores), scores)
            if self.logits is not None:
                self.logits.scatter_(1, t.expand_as(logits), logits)
        if self.eos is not None:
            hit = torch.isin(emitted, self.eos) & (j <= n_eff[:, None]) & active[:, None]
            first = hit.long().argmax(1)
            ended = hit.any(1)
            self.length.copy_(torch.where(ended & (self.length < 0), self.count + first + 1, self.length))
            self.unfinished &= ~ended
        self.count += torch.where(active, n_eff + 1, 0)

    def prefill(self) -> None:
        """The prompt through the target; the first new token (pending at column L)."""
        n = self.prompt_len
        logits = self.target(self, 0, n, 1)                               # (B, 1, V)
        if self.fixed and isinstance(self.draft, ModelDraft):
            self.draft.prefill(self)
        scores = self.process(logits, self.count[:, None])
        if self.want_scores or self.want_logits:
            b, _, v = logits.shape
            if self.want_scores:
                self.scores = logits.new_zeros(b, self.scores_len, v)
            if self.want_logits:
                self.logits = logits.new_zeros(b, self.scores_len, v)
        y = scores[:, 0].argmax(-1) if self.plan.greedy else sample_probs(scores[:, 0].softmax(-1))
        active = torch.ones_like(self.unfinished)
        self._emit(y[:, None], torch.zeros_like(y), active, logits, scores)
        self.put_column(n, y, 0)

    def step(self, k: int) -> torch.Tensor:
        """Draft k tokens, verify them in one target forward, keep what the batch keeps. Returns
        (on the device) [m, rows active before the step, drafts they accepted, rows of them that
        accepted all k, rows still active, most new tokens an active row still needs]: the host
        reads it once, then calls `commit(m)`."""
        L = self.col(0)
        active = self.unfinished & (self.count < self.max_new)
        if k:
            drafts, q = self.draft.propose(self, k)
        else:
            drafts, q = self.tok.new_zeros(self.tok.shape[0], 0), None
        logits = self.target(self, L, k + 1, k + 1)                       # (B, k+1, V)
        index = self.count[:, None] + torch.arange(k + 1, device=logits.device)
        scores = self.process(logits, index)
        n, nxt = accept(scores, drafts, q, self.plan.greedy)
        # m: the drafts the batch keeps. The most any active row accepted (rows that accepted fewer
        # get holes), or with crop_to_min the fewest (no holes; rows that accepted more emit their
        # next accepted draft instead of their own correction: a prefix of exact samples is exact).
        if self.crop_to_min:
            m = torch.where(active, n, k).min()
        else:
            m = torch.where(active, n, 0).max()
        n_eff = torch.minimum(n, m)
        if self.crop_to_min:   # rows done already keep m + 1 columns too: no holes at all
            n_eff = torch.where(active, n_eff, m)
        slot = n_eff[:, None]
        cand = torch.cat([drafts, nxt[:, None]], 1)                       # (B, k+1)
        emitted = cand.scatter(1, slot, torch.where((n <= m)[:, None], nxt[:, None], cand.gather(1, slot)))
        self._emit(emitted, n_eff, active, logits, scores)
        cols = torch.arange(k + 1, device=logits.device)[None]
        kept = (cols <= slot).long()                                      # holes past a row's own tokens
        if self.fixed:
            self.mask.index_copy_(1, L + self.ar[:k + 1], kept)
        else:
            self.mask[:, L:L + k + 1] = kept
        self.npos += n_eff + 1
        nxt_col = (L + m + 1).view(1, 1).expand(self.tok.shape[0], 1)
        self.tok.scatter_(1, nxt_col, emitted.gather(1, slot))
        self.pos.scatter_(1, nxt_col, self.npos[:, None])
        self.mask.scatter_(1, nxt_col, torch.ones_like(slot))
        still = self.unfinished & (self.count < self.max_new)
        need = torch.where(still, self.max_new - self.count, 0)
        act = active.long()
        if self.fixed:
            self.Ld += m + 1
        return torch.stack([m, act.sum(), (n * act).sum(),
                            ((n == k).long() * act).sum(), still.long().sum(), need.max()])

    def commit(self, k: int, m: int) -> None:
        """Host side of a step: both caches drop the columns past L + m (under fixed addressing
        the step moved `Ld` and the next feeds seek: nothing to drop)."""
        self.L += m + 1
        if not self.fixed:
            self.target.crop(k - m)
            self.draft.rollback(self.L)

    def kept(self) -> torch.Tensor:
        """New tokens each row keeps: up to its EOS, at most max_new."""
        return torch.where(self.length >= 0, self.length, self.count).clamp(max=self.max_new)
