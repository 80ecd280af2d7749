"""openai-gpt attention written inline (transformers' openai `Attention`) -> `lz.attention`.

Recognised by structure: a transformers `Conv1D` `c_attn` producing query, key and value
(3 x `split_size`) and a `Conv1D` `c_proj`, `n_head` heads, a bool `scale` (divide the scores by
sqrt(head_dim)), a causal `bias` buffer, `attn_dropout` / `resid_dropout`, and the forward
(x, attention_mask, output_attentions). The module has no cache: queries and keys are the same
positions, so the buffer sliced [:S, :S] is plain causal (the check first compares it with
tril(ones)). It puts -1e4 (not -inf) on the future positions; the model's additive float mask
(padding) comes on top. The replacement runs `is_causal` plus that mask: the same result unless
every score a query may attend is below about -1e4 + 88, where exp of the original's -1e4
stops underflowing to 0, and on padding queries (every key they may attend is padding: the
original averages the future tokens there, the replacement the padding ones), rows the model's
outputs at real tokens never read.

The replacement runs calls with no mask or a 4-D additive float mask and returns the same
one-element list [output]; output_attentions, or any other mask, runs the module's own forward.
Before swapping, both forwards run on a probe and must agree, as for norms and MLPs.
"""
from __future__ import annotations

import math
import sys

import torch
from torch import nn

from ... import ops
from ...patch import agree, probe, probe_input
from . import forward_params

DESCRIPTION = "inline openai-gpt attention"

_PARAMS = ["x", "attention_mask", "output_attentions"]


def _conv1d():
    """transformers' Conv1D class, or None while transformers' pytorch_utils is not imported (then
    no module holds one)."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def recognised(m: nn.Module) -> bool:
    """Does `m` look like openai-gpt's Attention?"""
    conv = _conv1d()
    if conv is None or not all(isinstance(getattr(m, n, None), conv) for n in ("c_attn", "c_proj")):
        return False
    h, n = getattr(m, "n_head", None), getattr(m, "split_size", None)
    if not (isinstance(h, int) and isinstance(n, int) and h > 0 and n % h == 0
            and m.c_attn.weight.shape[-1] == 3 * n and m.c_proj.weight.shape[0] == n):
        return False
    if not isinstance(getattr(m, "scale", None), bool):
        return False
    if not all(isinstance(getattr(m, a, None), nn.Dropout) for a in ("attn_dropout", "resid_dropout")):
        return False
    bias = getattr(m, "bias", None)
    if not (isinstance(bias, torch.Tensor) and bias.dim() == 4):
        return False
    return forward_params(m) == _PARAMS


def _bias_is_causal(m) -> bool:
    n = m.bias.shape[-1]
    if m.bias.shape != (1, 1, n, n):
        return False
    return torch.equal(m.bias[0, 0], torch.tril(torch.ones_like(m.bias[0, 0])))


def make_forward(original):
    def forward(self, x, attention_mask=None, output_attentions=False):
        if (output_attentions or x.dim() != 3 or x.shape[1] > self.bias.shape[-1]
                or (attention_mask is not None
                    and (attention_mask.dim() != 4 or not attention_mask.is_floating_point()))):
            return original(x, attention_mask, output_attentions)
        b, s, _ = x.shape
        h, d = self.n_head, self.split_size // self.n_head
        q, k, v = (t.view(b, s, h, d) for t in self.c_attn(x).split(self.split_size, dim=2))
        out = ops.attention(q, k, v, attn_mask=attention_mask, is_causal=True,
                            scale=1.0 / math.sqrt(d) if self.scale else 1.0,
                            dropout_p=self.attn_dropout.p if self.training else 0.0, layout="bshd")
        return [self.resid_dropout(self.c_proj(out.reshape(b, s, h * d)))]
    forward.__name__ = "lz_inline_openai_gpt_attention_forward"
    return forward


def check(m: nn.Module, device) -> tuple[bool, str]:
    """The `bias` buffer is causal, and both forwards agree on a probe (padding on the right, so
    that every query has a key); (ok, why not)."""
    if not _bias_is_causal(m):
        return False, "its `bias` buffer is not causal (tril of ones)"
    dtype = m.c_attn.weight.dtype
    s = max(1, min(5, m.bias.shape[-1]))
    x = probe_input((2, s, m.c_attn.weight.shape[0]), None, dtype=dtype, device=device)
    mask = torch.zeros(2, 1, 1, s, dtype=dtype, device=device)
    mask[1, ..., s - s // 3:] = torch.finfo(dtype).min
    try:
        want, got = probe(m, make_forward, x, attention_mask=mask)
    except Exception as e:  # noqa: BLE001 - a module we can't call plainly is left alone
        return False, f"probe raised {type(e).__name__}: {e}"
    if not isinstance(want, list) or len(want) != 1 or not isinstance(want[0], torch.Tensor):
        return False, "its forward does not return [output]"
    ok, err = agree(got[0], want[0], dtype)
    return ok, "" if ok else f"differs on a probe (err {err:.2g})"


def details(m: nn.Module) -> dict:
    return {"op": "attention", "num_heads": m.n_head, "head_dim": m.split_size // m.n_head}
