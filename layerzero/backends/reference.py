"""The plain-PyTorch reference kernels (`reference.<op>`): always available, accept every valid
call, lowest priority — the last resort and the test oracle — except in calls traced by
torch.compile of ops inductor fuses (priorities.reference)."""
from __future__ import annotations

from .. import reference
from ..registry import register
from . import priorities

for _op in ("attention", "rms_norm", "layer_norm", "rope", "swiglu", "geglu", "sample", "paged_attention"):
    register(_op, f"reference.{_op}", getattr(reference, _op), priority=priorities.reference)
