"""Selection: lock -> allow/deny -> supports() -> score -> pick.

`select` is a pure function of the call description, the registered kernels, the policy and the
scoped preferences; it keeps every kernel's status and reasons for `explain` and for the error
raised when nothing qualifies.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from . import registry
from .call import CallSpec
from .policy import Policy


@dataclass
class Candidate:
    kernel: str
    status: str                  # "chosen" | "eligible" | "rejected" | "unavailable" | "denied"
    reasons: list[str] = field(default_factory=list)
    score: int | None = None


@dataclass
class Decision:
    spec: CallSpec
    chosen: str | None
    order: tuple                 # eligible Kernels, best first: the runtime fallback chain
    candidates: list[Candidate]
    error: str | None = None     # why nothing can run (chosen is None)
    note: str = ""               # lock / preference that decided

    def __str__(self) -> str:
        s = self.spec
        brief = s.brief()
        head = (f"{s.op} on {s.device}" + (f" sm{s.sm}" if s.sm else "") + f", {str(s.dtype)[6:]}"
                + (f": {brief}" if brief else ""))
        lines = [head + (f" — {self.note}" if self.note else "")]
        w = max([len(c.kernel) for c in self.candidates] + [6])
        lines.append(f"  {'kernel':<{w}}  {'status':<11}  {'score':>5}  reasons")
        rank = {"chosen": 0, "eligible": 1, "denied": 2, "rejected": 3, "unavailable": 4}
        for c in sorted(self.candidates, key=lambda c: (rank[c.status], -(c.score or 0))):
            score = "" if c.score is None else str(c.score)
            lines.append(f"  {c.kernel:<{w}}  {c.status:<11}  {score:>5}  {'; '.join(c.reasons)}")
        lines.append(f"chosen: {self.chosen}" if self.chosen else f"error: {self.error}")
        return "\n".join(lines)


def _preferred(kernels, prefs, op):
    """The kernel ids the innermost applicable `use` preference allows, or None."""
    for target, pref_op in reversed(prefs):
        if pref_op is not None and pref_op != op:
            continue
        ids = {k.id for k in kernels if (k.id == target if "." in target else k.backend == target)}
        if ids:
            return target, ids
    return None, None


def select(spec: CallSpec, kernels: Iterable[registry.Kernel], policy: Policy,
           prefs: tuple = ()) -> Decision:
    """Choose the kernel for `spec` among `kernels` (all registered for spec.op)."""
    cands: list[Candidate] = []
    eligible: list[tuple[int, int, object]] = []
    for k in kernels:
        why = registry.unavailable_reason(k)
        if why:
            cands.append(Candidate(k.id, "unavailable", [why]))
            continue
        denial = policy.denial(k, spec)
        reasons = k.reasons(spec)
        if reasons:
            cands.append(Candidate(k.id, "rejected", reasons))
        elif denial:
            cands.append(Candidate(k.id, "denied", [denial]))
        else:
            base = k.priority(spec) if callable(k.priority) else k.priority
            score = base + policy.boost(k, spec)
            cands.append(Candidate(k.id, "eligible", [], score))
            eligible.append((-score, k.order, k))
    eligible.sort(key=lambda t: t[:2])
    order = tuple(k for _, _, k in eligible)
    by_id = {c.kernel: c for c in cands}

    note, error = "", None
    rule = policy.lock_for(spec)
    if rule is not None:
        c = by_id.get(rule.kernel)
        note = f"locked to {rule.kernel}"
        if c is not None and c.status == "denied":   # an explicit lock overrides allow/deny
            c.status, c.reasons, c.score = "eligible", [], 0
        if c is None or c.status != "eligible":
            error = (f"{spec.op} is locked to {rule.kernel}, which can't run this call: "
                     f"{'; '.join(c.reasons) if c else 'not registered for this op'}")
            order = ()
        else:
            order = (registry.get(rule.kernel),)
    else:
        target, ids = _preferred(kernels, prefs, spec.op)
        if ids is not None:
            note = f"lz.use({target!r})"
            order = tuple(k for k in order if k.id in ids)
            if not order:
                error = (f"lz.use({target!r}) is in force but none of its kernels can run this "
                         f"{spec.op} call: {_reasons_of(cands, ids)}")
    if error is None and not order:
        error = f"no kernel can run this {spec.op} call: {_reasons_of(cands)}"
    chosen = order[0].id if order else None
    if chosen:
        by_id[chosen].status = "chosen"
    return Decision(spec, chosen, order, cands, error, note)


def _reasons_of(cands, ids=None) -> str:
    return "; ".join(f"{c.kernel} ({c.status}): {', '.join(c.reasons) or 'not preferred'}"
                     for c in cands if ids is None or c.kernel in ids)
