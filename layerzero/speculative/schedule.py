"""How many tokens the draft proposes in each step of lz.speculative_generate (`draft_schedule`).

- "acceptance" (the default): k maximises the expected new tokens per unit of step time,
  (1 - a^(k+1)) / ((1 - a) (1 + c k)), from a running estimate of the per-token acceptance a and
  of c, a draft token's time over the rest of a step.
    a: each step's drafts up to and including the first rejection are Bernoulli trials (a row
    that accepted n of k gives n successes in n + [n < k] trials; a batch that keeps its worst
    row's count counts that count once); successes and trials are summed with a decay of
    DECAY per step, with one success and one failure as a prior.
    c: the host times every step (it waits for the step's counters anyway); each k's time is a
    running mean that skips its first WARM step (on CUDA: the eager step followed by the capture
    of its graph); once two values of k have times, a least-squares line a0 + b k through them gives
    c = b / a0; before that c is COST_PRIOR for a draft model, 0 for prompt lookup.
  k stays within 1..max_draft_tokens; ties go to the smaller k. A k that has not run yet costs
  more than its steps: on CUDA its first step runs eagerly and is captured (H200, the 1B target in
  fp32 at batch 8: one such step took a 0.6 s call to 5.4 s). So where the steps are graphed, once
  two values of k have run, the schedule moves to a new one only when it promises more than
  NEW_K_GAIN times the best k that has run; the curve is flat near its top, so little is given up.
- "heuristic" (transformers' schedule for assistants): k + 2 after a step where at least half of
  the active rows accepted all k drafts, else k - 1.
- "constant": k = num_draft_tokens.
"""
from __future__ import annotations

SCHEDULES = ("acceptance", "heuristic", "constant")
DECAY = 0.8
WARM = 1
COST_PRIOR = 0.1
NEW_K_GAIN = 1.1


def value(alpha: float, cost: float, k: int) -> float:
    """Expected new tokens per unit of step time with k drafts (module docstring)."""
    alpha = min(max(alpha, 0.0), 1.0)
    tokens = k + 1.0 if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)
    return tokens / (1.0 + cost * k)


def best_k(alpha: float, cost: float, kmax: int, among=None) -> int:
    """The k in 1..kmax (or in `among`) with the most expected tokens per step time."""
    best, top = 1, -1.0
    for k in sorted(among) if among is not None else range(1, kmax + 1):
        v = value(alpha, cost, k)
        if v > top + 1e-12:
            best, top = k, v
    return best


class Schedule:
    """`k`: the draft length of the next step; `update(...)` after each step."""

    def __init__(self, kind: str, k0: int, kmax: int, model_draft: bool, graphed: bool = False):
        self.kind, self.k, self.kmax = kind, k0, kmax
        self.new_k_gain = NEW_K_GAIN if graphed else 1.0      # a new k costs a capture
        self.succ, self.trials = 1.0, 2.0                 # the prior: one success, one failure
        self.cost_prior = COST_PRIOR if model_draft else 0.0
        self.times: dict[int, list] = {}                  # k -> [steps seen, mean seconds]

    @property
    def alpha(self) -> float:
        return self.succ / self.trials

    def measured_cost(self) -> float | None:
        """c from the measured step times (a least-squares line a0 + b k, c = b / a0); None before
        two values of k have times past their warm-up step."""
        pts = [(k, t) for k, (n, t) in self.times.items() if n > WARM]
        if len(pts) < 2:
            return None
        mk = sum(k for k, _ in pts) / len(pts)
        mt = sum(t for _, t in pts) / len(pts)
        var = sum((k - mk) ** 2 for k, _ in pts)
        b = max(sum((k - mk) * (t - mt) for k, t in pts) / var, 0.0)
        a0 = mt - b * mk
        return b / a0 if a0 > 0 else None

    def cost(self) -> float:
        c = self.measured_cost()
        return self.cost_prior if c is None else c

    def update(self, k: int, was_active: int, accepted: int, full: int, m: int, holes: bool,
               seconds: float) -> None:
        """A step of k drafts: `was_active` rows drafted, they accepted `accepted` in all, `full`
        of them all k; the batch kept m; `seconds` on the host."""
        if not k or self.kind == "constant":
            return
        if self.kind == "heuristic":
            self.k = min(self.kmax, self.k + 2) if 2 * full >= was_active else max(1, self.k - 1)
            return
        succ, trials = (accepted, accepted + was_active - full) if holes else (m, m + (m < k))
        self.succ = DECAY * self.succ + succ
        self.trials = DECAY * self.trials + trials
        n, mean = self.times.get(k, (0, 0.0))
        if n >= WARM:
            mean = seconds if n == WARM else 0.5 * mean + 0.5 * seconds
        self.times[k] = [n + 1, mean]
        self.k = self.pick()

    def pick(self) -> int:
        """best_k, held (graphed steps) to the values of k that have run unless a new one is
        clearly better."""
        alpha, cost = self.alpha, self.cost()
        best = best_k(alpha, cost, self.kmax)
        if best in self.times or len(self.times) < 2:     # (times: the k in 1..kmax that ran)
            return best
        known = best_k(alpha, cost, self.kmax, among=self.times)
        return best if value(alpha, cost, best) > self.new_k_gain * value(alpha, cost, known) else known
