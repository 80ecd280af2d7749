"""Recogniser: norms -> `lz.rms_norm` / `lz.layer_norm`.

Recognised by structure: a leaf module with a 1-D `weight`, an `eps` / `variance_epsilon` /
`epsilon` attribute and an "RMSNorm" / "LayerNorm" class tag (or `nn.LayerNorm` / `nn.RMSNorm`).
Checked by behaviour: the probe decides between `rms_norm` with offset 0 or 1 (Gemma's `1 + w`)
and `layer_norm`; a module matching none keeps its forward.

Recogniser layer of `layerzero.patching`: imports the mechanics (swap, probes, record) only;
`layerzero.patch` and the integrations may import it.
"""
from __future__ import annotations

import inspect
import re

import torch
from torch import nn

from .. import ops, reference
from .probes import META, agree, param_device, probe, probe_input
from .record import Report
from .swap import observe, swap_forward, watch

_NORM_TAG = re.compile(r"(RMSNorm|LayerNorm|RmsNorm)", re.IGNORECASE)
_EPS_ATTRS = ("variance_epsilon", "eps", "epsilon")


def _eps_attr(m) -> str | None:
    for a in _EPS_ATTRS:
        v = getattr(m, a, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return a
    return None


def _is_candidate(m: nn.Module) -> bool:
    if isinstance(m, nn.LayerNorm) or (hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm)):
        return True
    return bool(_NORM_TAG.search(type(m).__name__) or getattr(m, "kernel_layer_name", None) == "RMSNorm")


def recognised(m: nn.Module) -> bool:
    """Is `m` shaped like a norm (a class tag, and no children)? `patch_norm` then decides."""
    return _is_candidate(m) and not list(m.children())


def _norm_forward(op: str, eps_attr: str, offset: float, fns=None):
    """make(original) -> forward running `op` (fns: (rms_norm, layer_norm), default lz's ops)."""
    rms, ln = fns or (ops.rms_norm, ops.layer_norm)

    def make(original):
        # A call with more than the hidden states (a gated norm's `gate`, mamba2 / bamba / zamba2)
        # is not a plain norm: the module's own forward runs it.
        if op == "rms_norm":
            def forward(self, x, *more, **kw):
                w = self.weight
                if more or kw or (w is not None and w.dtype != x.dtype):  # mixed dtypes: keep
                    return original(x, *more, **kw)                      # the module's promotion
                observe(self, x.shape)
                return rms(x, w, getattr(self, eps_attr), offset=offset)
        else:
            def forward(self, x, *more, **kw):
                w, b = self.weight, getattr(self, "bias", None)
                if more or kw or (w is not None and w.dtype != x.dtype) or (b is not None and b.dtype != x.dtype):
                    return original(x, *more, **kw)
                observe(self, x.shape)
                return ln(x, w, b, getattr(self, eps_attr))
        forward.__name__ = f"lz_{op}_forward"
        forward.lz_norm = (op, eps_attr, offset)        # read by patching.residual
        return forward
    return make


_REF_NORMS = (lambda x, w, eps, offset: reference.rms_norm(x, w, eps, None, offset),
              lambda x, w, b, eps: reference.layer_norm(x, w, b, eps))


def _more_params(forward) -> list[str]:
    """The parameters of a norm's forward beyond self and the hidden states (a gated norm's
    `gate`)."""
    try:
        params = list(inspect.signature(forward).parameters.values())[2:]
    except (TypeError, ValueError):
        return []
    return [p.name for p in params]


def patch_norm(name: str, m: nn.Module, report: Report, undo: list) -> None:
    """Swap `m`'s forward for the LayerZero norm its probe agrees with, or report why not."""
    w = getattr(m, "weight", None)
    b = getattr(m, "bias", None)
    eps_attr = _eps_attr(m)
    hidden = w.shape[0] if isinstance(w, torch.Tensor) and w.dim() == 1 else None
    if hidden is None and isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
        hidden = m.normalized_shape[0]
    why = None
    if eps_attr is None:
        why = "no numeric eps / variance_epsilon attribute"
    elif hidden is None:
        why = "no 1-D weight (normalised shape unknown)"
    device = param_device(m) if why is None else None
    if why is None and device is None and w is not None:
        why = META
    if why is not None:
        report.add(name, "norm", "skipped", detail=f"{type(m).__name__}: {why}")
        return
    dtype = w.dtype if isinstance(w, torch.Tensor) else torch.float32
    x = probe_input((2, 3, hidden), None, dtype=dtype, device=device or "cpu")
    tries = [("rms_norm", 0.0), ("rms_norm", 1.0)] if b is None else []
    tries.append(("layer_norm", 0.0))
    errs = []
    for op, offset in tries:
        try:
            got, want = probe(m, _norm_forward(op, eps_attr, offset, _REF_NORMS), x)
        except Exception as e:
            report.add(name, "norm", "skipped", detail=f"{type(m).__name__}: probe raised {type(e).__name__}: {e}")
            return
        ok, err = agree(got, want, dtype)
        if ok:
            swap_forward(m, _norm_forward(op, eps_attr, offset), undo)
            watch(m, undo)
            eps = getattr(m, eps_attr)
            what = f"{op}(offset={offset:g})" if op == "rms_norm" else op
            more = _more_params(type(m).forward)
            also = f"; calls passing {', '.join(more)} run its own forward" if more else ""
            report.add(name, "norm", "patched", op, f"{type(m).__name__} -> {what}, eps={eps:g}{also}",
                       {"op": op, "head_dim": hidden})
            return
        errs.append(f"{op}{'(+1)' if offset else ''} err {err:.2g}")
    report.add(name, "norm", "skipped",
               detail=f"{type(m).__name__}: forward matches no LayerZero norm ({'; '.join(errs)})")
