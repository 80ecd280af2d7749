"""The draft-length schedules of lz.speculative_generate (`speculative.schedule`): the acceptance
schedule's estimate of the per-token acceptance rate (censored at the first rejection), its
step-time cost model (skipping each k's warm-up steps), the k it picks; the heuristic schedule."""
from __future__ import annotations

import random

import pytest

from layerzero.speculative import schedule as S


def _value(alpha, cost, k):
    return (1 - alpha ** (k + 1)) / (1 - alpha) / (1 + cost * k)


@pytest.mark.parametrize("alpha, cost", [(0.5, 0.1), (0.8, 0.126), (0.9, 0.05), (0.95, 0.0), (0.3, 0.4)])
def test_best_k_maximises_tokens_per_step_time(alpha, cost):
    k = S.best_k(alpha, cost, 8)
    assert all(_value(alpha, cost, k) >= _value(alpha, cost, j) - 1e-12 for j in range(1, 9))


def test_best_k_grows_with_acceptance_and_shrinks_with_draft_cost():
    assert S.best_k(1.0, 0.0, 8) == 8 and S.best_k(0.0, 0.1, 8) == 1
    assert [S.best_k(a, 0.05, 8) for a in (0.3, 0.6, 0.8, 0.9)] == sorted(S.best_k(a, 0.05, 8) for a in (0.3, 0.6, 0.8, 0.9))
    assert S.best_k(0.8, 0.5, 8) < S.best_k(0.8, 0.02, 8)


def _run(sched, alpha, a0, b, steps, rows=1, holes=True, warm_time=None, seed=0):
    """Steps with each row accepting a geometric prefix (per-token alpha) of k drafts and taking
    a0 + b k seconds (warm_time for a k's first WARM steps, when given)."""
    rng = random.Random(seed)
    seen = {}
    for _ in range(steps):
        k = sched.k
        ns = []
        for _ in range(rows):
            n = 0
            while n < k and rng.random() < alpha:
                n += 1
            ns.append(n)
        seen[k] = seen.get(k, 0) + 1
        t = warm_time if warm_time is not None and seen[k] <= S.WARM else a0 + b * k
        sched.update(k, rows, sum(ns), sum(n == k for n in ns), min(ns), holes, t)
    return sched


def test_the_acceptance_schedule_learns_the_rate_and_the_cost():
    sched = _run(S.Schedule("acceptance", 4, 8, True, graphed=True), alpha=0.85, a0=1.0, b=0.05, steps=200,
                 warm_time=50.0, seed=1)
    assert abs(sched.alpha - 0.85) < 0.1
    assert abs(sched.cost() - 0.05) < 1e-6          # the warm-up steps' 50 s left out
    assert sched.k == sched.pick()
    best = S.best_k(sched.alpha, sched.cost(), 8)       # the value of k it holds is within NEW_K_GAIN of the best
    assert S.value(sched.alpha, sched.cost(), sched.k) * S.NEW_K_GAIN >= S.value(sched.alpha, sched.cost(), best)
    cheap = _run(S.Schedule("acceptance", 4, 8, True), alpha=0.9, a0=1.0, b=0.01, steps=200, seed=2)
    dear = _run(S.Schedule("acceptance", 4, 8, True), alpha=0.9, a0=1.0, b=0.6, steps=200, seed=2)
    assert cheap.k > dear.k
    poor = _run(S.Schedule("acceptance", 4, 8, True), alpha=0.1, a0=1.0, b=0.1, steps=100, seed=3)
    assert poor.k == 1


def test_the_measured_cost_is_none_until_two_k_have_times():
    sched = S.Schedule("acceptance", 4, 8, True)
    assert sched.measured_cost() is None and sched.cost() == S.COST_PRIOR
    for _ in range(S.WARM + 3):     # one k only: no line yet
        sched.k = 4
        sched.update(4, 1, 4, 1, 4, True, 1.0 + 0.05 * 4)
    assert sched.measured_cost() is None
    for _ in range(S.WARM + 3):
        sched.update(2, 1, 2, 1, 2, True, 1.0 + 0.05 * 2)
    assert abs(sched.measured_cost() - 0.05) < 1e-9


def test_a_batch_that_keeps_its_worst_row_counts_what_it_kept():
    """Without holes the batch advances by its worst row: 8 rows at 0.8 per token advance like
    one row at a much lower rate, and the schedule sees that rate."""
    per_row = _run(S.Schedule("acceptance", 4, 8, True), alpha=0.8, a0=1, b=0.05, steps=300, rows=8, holes=True)
    worst = _run(S.Schedule("acceptance", 4, 8, True), alpha=0.8, a0=1, b=0.05, steps=300, rows=8, holes=False)
    assert abs(per_row.alpha - 0.8) < 0.1 and worst.alpha < 0.6
    assert worst.k < per_row.k


def test_before_two_k_have_times_the_cost_is_the_prior():
    sched = S.Schedule("acceptance", 4, 8, True)
    assert sched.cost() == S.COST_PRIOR
    assert S.Schedule("acceptance", 4, 8, False).cost() == 0.0     # prompt lookup: no draft forwards
    sched.update(0, 1, 0, 0, 0, True, 1.0)                          # a step without drafts changes nothing
    assert sched.k == 4 and sched.alpha == 0.5


def test_heuristic_and_constant():
    h = S.Schedule("heuristic", 4, 8, True)
    h.update(4, 2, 8, 1, 4, True, 0.1)
    assert h.k == 6                                   # half the rows took all: + 2
    h.update(6, 2, 3, 0, 1, True, 0.1)
    assert h.k == 5
    c = S.Schedule("constant", 3, 6, True)
    c.update(3, 1, 3, 1, 3, True, 0.1)
    assert c.k == 3


def test_a_new_k_only_when_clearly_better_than_the_ks_that_ran(monkeypatch):
    """Each k that has not run costs an eager step and a capture: after two values of k have run,
    the schedule keeps to them while a new k promises less than NEW_K_GAIN times their best."""
    gain = S.NEW_K_GAIN

    def visited(gain, seed):
        monkeypatch.setattr(S, "NEW_K_GAIN", gain)
        return _run(S.Schedule("acceptance", 4, 8, True, graphed=True), alpha=0.8, a0=1.0, b=0.05, steps=300,
                    seed=seed)

    for seed in range(4):
        free, held = visited(1.0, seed), visited(gain, seed)
        assert len(held.times) <= 3 < len(free.times)          # 3 values of k at most, not 6-8
        best = S.best_k(0.8, 0.05, 8)
        assert S.value(0.8, 0.05, held.k) * gain >= S.value(0.8, 0.05, best)
    # acceptance collapses: k = 1 is far better than the large k that ran, so it is taken
    _run(held, alpha=0.05, a0=1.0, b=0.05, steps=100, seed=5)
    assert held.k == 1
    # eager steps (no capture to pay for) take the best k at once
    assert S.Schedule("acceptance", 4, 8, True).new_k_gain == 1.0
