"""Recogniser: gated MLPs -> `lz.swiglu` / `lz.geglu`.

Recognised by structure: a module whose class name ends in MLP / FeedForward / FFN /
DenseActDense / Intermediate, with `gate_proj` + `up_proj` + `down_proj` (or a fused
`gate_up_proj` + `down_proj`) and a SiLU or GELU activation attribute (`activation_op` tells
which, on a probe). Checked by behaviour: the module's forward must be
`down(act(gate) * up)` on a probe; dropout between the projections keeps the module's forward.

Recogniser layer of `layerzero.patching`: imports the mechanics (swap, probes, record) only;
`layerzero.patch` and the integrations may import it.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from .. import ops, reference
from .probes import META, agree, param_device, probe, probe_input
from .record import Report
from .swap import observe, swap_forward, watch

_MLP_TAG = re.compile(r"(MLP|FeedForward|FFN|DenseActDense|Intermediate)$", re.IGNORECASE)
_ACT_ATTRS = ("act_fn", "activation_fn", "act", "activation")


def recognised(m: nn.Module) -> bool:
    """Is `m` tagged as an MLP by its class name? `patch_mlp` then decides."""
    return bool(_MLP_TAG.search(type(m).__name__))


def activation_op(act) -> tuple[str, dict] | None:
    """('swiglu', {}) for SiLU, ('geglu', {'approximate': ...}) for GELU; None otherwise."""
    if not callable(act):
        return None
    x = probe_input((257,), None) * 3
    try:
        with torch.no_grad():
            y = act(x)
    except Exception:
        return None
    F = torch.nn.functional
    for op, kw, ref in (("swiglu", {}, F.silu(x)), ("geglu", {"approximate": "none"}, F.gelu(x)),
                        ("geglu", {"approximate": "tanh"}, F.gelu(x, approximate="tanh"))):
        if isinstance(y, torch.Tensor) and y.shape == x.shape and (y - ref).abs().max().item() <= 1e-6:
            return op, kw
    return None


def _gated(op: str, kw: dict):
    if op == "swiglu":
        return ops.swiglu
    approximate = kw["approximate"]
    return lambda gate, up: ops.geglu(gate, up, approximate)


def _ref_gated(op: str, kw: dict):
    return reference.swiglu if op == "swiglu" else (lambda g, u: reference.geglu(g, u, kw["approximate"]))


def _mlp_forward(fused: bool, act_attr: str, gate_fn):
    def make(original):
        if fused:
            def forward(self, x):
                observe(self, x.shape)
                gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
                return self.down_proj(gate_fn(gate, up))
        else:
            def forward(self, x):
                observe(self, x.shape)
                return self.down_proj(gate_fn(self.gate_proj(x), self.up_proj(x)))
        forward.__name__ = "lz_gated_mlp_forward"
        forward.lz_gated = (fused, gate_fn)              # read by patching.residual
        return forward
    return make


def _in_features(lin) -> int | None:
    n = getattr(lin, "in_features", None)
    if n is None:
        w = getattr(lin, "weight", None)
        n = w.shape[-1] if isinstance(w, torch.Tensor) and w.dim() == 2 else None
    return n


def patch_mlp(name: str, m: nn.Module, report: Report, undo: list) -> None:
    """Swap `m`'s forward for `lz.swiglu` / `lz.geglu` between its projections when its probe
    agrees, or report why not."""
    cls = type(m).__name__
    fused = isinstance(getattr(m, "gate_up_proj", None), nn.Module)
    gated = fused or all(isinstance(getattr(m, a, None), nn.Module) for a in ("gate_proj", "up_proj"))
    if not gated or not isinstance(getattr(m, "down_proj", None), nn.Module):
        report.add(name, "mlp", "skipped", detail=f"{cls}: not a gated MLP (no gate/up/down projections)")
        return
    act_attr = next((a for a in _ACT_ATTRS if callable(getattr(m, a, None))), None)
    found = activation_op(getattr(m, act_attr)) if act_attr else None
    if found is None:
        what = (f"activation {type(getattr(m, act_attr)).__name__} is neither SiLU nor GELU" if act_attr
                else f"no activation attribute ({', '.join(_ACT_ATTRS)})")
        report.add(name, "mlp", "skipped", detail=f"{cls}: {what}")
        return
    if any(isinstance(c, nn.Dropout) and c.p > 0 for c in m.children()):
        report.add(name, "mlp", "skipped", detail=f"{cls}: has dropout between the projections")
        return
    op, kw = found
    first = m.gate_up_proj if fused else m.gate_proj
    n_in, device = _in_features(first), param_device(m)
    if n_in is None or device is None:
        report.add(name, "mlp", "skipped", detail=f"{cls}: {'input size unknown' if device else META}")
        return
    dtype = next(m.parameters()).dtype
    x = probe_input((2, 3, n_in), None, dtype=dtype, device=device)
    try:
        got, want = probe(m, _mlp_forward(fused, act_attr, _ref_gated(op, kw)), x)
    except Exception as e:
        report.add(name, "mlp", "skipped", detail=f"{cls}: probe raised {type(e).__name__}: {e}")
        return
    ok, err = agree(got, want, dtype)
    if not ok:
        report.add(name, "mlp", "skipped", detail=f"{cls}: forward is not down({act_attr}(gate) * up) "
                   f"(probe error {err:.2g})")
        return
    swap_forward(m, _mlp_forward(fused, act_attr, _gated(op, kw)), undo)
    watch(m, undo)
    inter = (first.weight.shape[0] // (2 if fused else 1)) if isinstance(getattr(first, "weight", None), torch.Tensor) else 0
    detail = f"{cls}: {'fused gate_up' if fused else 'gate/up'} + {act_attr} -> {op}" + (
        f"(approximate={kw['approximate']!r})" if kw else "")
    report.add(name, "mlp", "patched", op, detail, {"op": op, "head_dim": inter} if inter else {"op": op})
