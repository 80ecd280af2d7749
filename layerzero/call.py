"""The small, hashable description of one op call: the key of every decision.

Selection, policies and (later) measured timings see a call only through a `CallSpec`; kernels'
`supports(spec)` read its fields. Fields that don't apply to an op (`FIELDS`) keep their defaults
and are left out of its repr and `as_dict()`.
"""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch


class CallSpec(NamedTuple):
    op: str
    device: str                  # "cpu", "cuda", ...
    sm: int                      # CUDA compute capability x10 (90 = H100); 0 elsewhere
    dtype: torch.dtype
    batch: int = 1               # rows for norms / MLPs / sampling
    num_heads: int = 0
    num_kv_heads: int = 0
    seq_len_q: int = 0
    seq_len_k: int = 0
    head_dim: int = 0            # attention/rope: head_dim; norms/MLP: hidden size; sample: vocab
    head_dim_v: int = 0
    layout: str = "bhsd"
    causal: bool = False
    causal_align: str = "top_left"
    mask: str = "none"           # "none" | "bool" | "float"
    window: tuple[int, int] | None = None
    softcap: bool = False
    alibi: bool = False
    sinks: bool = False
    dropout: bool = False
    grad: bool = False           # autograd will need a backward
    flags: frozenset = frozenset()  # op-specific: residual, offset, bias, interleaved, partial, ...
    page_size: int = 0           # paged_attention: keys per page (0 for every other op)

    def shown(self) -> tuple[str, ...]:
        """The fields that describe this call: op, device, sm, dtype, the fields of its op
        (`FIELDS`), and any other that is not at its default."""
        own = FIELDS.get(self.op, self._fields)
        return self._fields[:4] + tuple(f for f in self._fields[4:]
                                        if f in own or getattr(self, f) != self._field_defaults[f])

    def as_dict(self) -> dict:
        """The fields of `shown()`, JSON-ready: dtype as a string, flags as a sorted list."""
        d = {f: getattr(self, f) for f in self.shown()}
        d["dtype"] = str(self.dtype).replace("torch.", "")
        if "flags" in d:
            d["flags"] = sorted(self.flags)
        return d

    def brief(self) -> str:
        """The fields of `shown()` beyond op, device, sm and dtype that are not at their
        defaults, as "name=value, ..." (flags as "flags=a,b")."""
        return ", ".join(f"{f}={','.join(sorted(v)) if f == 'flags' else v}"
                         for f, v in ((f, getattr(self, f)) for f in self.shown()[4:])
                         if v != self._field_defaults[f])

    def __repr__(self) -> str:
        return f"CallSpec({', '.join(f'{f}={getattr(self, f)!r}' for f in self.shown())})"


# The fields each op's calls fill in (beyond op, device, sm, dtype); the rest keep their defaults.
# For norms and gated MLPs head_dim is the hidden size, for sample the vocabulary size.
_ROWS = ("batch", "head_dim", "grad", "flags")
_ATTENTION = tuple(f for f in CallSpec._fields[4:] if f not in ("flags", "page_size"))
FIELDS = {"attention": _ATTENTION,
          # seq_len_k: the keys a page-table row can address (max_pages x page_size), not the
          # rows' lengths, which are tensor values and never read by selection
          "paged_attention": ("batch", "num_heads", "num_kv_heads", "seq_len_q", "seq_len_k",
                              "head_dim", "head_dim_v", "layout", "causal", "causal_align", "window",
                              "softcap", "sinks", "grad", "page_size"),
          "rope": ("batch", "num_heads", "num_kv_heads", "seq_len_q", "seq_len_k", "head_dim",
                   "layout", "grad", "flags"),
          "rms_norm": _ROWS, "layer_norm": _ROWS, "swiglu": _ROWS, "geglu": _ROWS,
          "sample": ("batch", "head_dim", "flags")}


def sdpa_native(spec: CallSpec) -> bool:
    """The attention call needs nothing SDPA lacks an argument for: no mask, window, softcap,
    ALiBi or sinks, and a causal alignment that doesn't matter or is top-left (any layout)."""
    return (spec.mask == "none" and spec.window is None and not (spec.softcap or spec.alibi or spec.sinks)
            and (not spec.causal or spec.causal_align == "top_left" or spec.seq_len_q == spec.seq_len_k))


def sdpa_expressible(spec: CallSpec) -> bool:
    """An attention call F.scaled_dot_product_attention takes as it is: SDPA-native and already
    in its (B, H, S, D) layout."""
    return spec.layout == "bhsd" and sdpa_native(spec)


@lru_cache(maxsize=64)
def device_sm(device: torch.device) -> int:
    """Compute capability x10 of a CUDA device, 0 for other devices."""
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)
