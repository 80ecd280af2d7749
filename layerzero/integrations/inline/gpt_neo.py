"""GPT-Neo self-attention written inline (transformers' `GPTNeoSelfAttention`) -> `lz.attention`.

Recognised by structure: `q_proj` / `k_proj` / `v_proj` / `out_proj` Linear projections into
`num_heads` x `head_dim`, an `attention_type` of "global" or "local", a bool causal `bias`
buffer, `attn_dropout` / `resid_dropout`, and the forward (hidden_states, attention_mask,
layer_past, use_cache, output_attentions, **kwargs). GPT-Neo does not scale the scores
(scale=1.0; it computes them in fp32, as LayerZero's kernels accumulate them). Its `bias` buffer
is causal, cut to the previous `config.window_size` positions on the "local" layers, and sliced
at the bottom-right ([Sk-Sq:Sk, :Sk]): `is_causal` with causal_align="bottom_right", and
window=(window_size - 1, 0) on local layers (the check first compares the buffer with that
pattern). The model's additive float mask (padding, causality) comes on top.

The replacement runs calls with no mask or a 4-D additive float mask, with or without a cache
(`layer_past.update(k, v, layer_id)` as the module's own forward does), and returns the same
(output, None) pair without the probabilities. output_attentions or any other mask runs the
module's own forward; a local layer over a cache that does not just grow (static, sliding) runs
the module's own attention math after the same update; the flash-attention-2 subclass is not
recognised. A padding query (every key it may attend is padding) may get another value than the
original's average of masked values: rows the outputs at real tokens never read. Before
swapping, both forwards run on a probe and must agree, as for norms and MLPs.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from ... import ops
from ...patch import probe_input
from . import probe_tuple

DESCRIPTION = "inline GPT-Neo self-attention"

_PROJ = ("q_proj", "k_proj", "v_proj", "out_proj")
_PARAMS = ["hidden_states", "attention_mask", "layer_past", "use_cache", "output_attentions"]


def recognised(m: nn.Module) -> bool:
    """Does `m` look like GPT-Neo's (eager) self-attention?"""
    if not all(isinstance(getattr(m, n, None), nn.Linear) for n in _PROJ):
        return False
    if hasattr(m, "_flash_attn_uses_top_left_mask"):  # GPTNeoFlashAttention2: flash's own masks
        return False
    h, d = getattr(m, "num_heads", None), getattr(m, "head_dim", None)
    if not (isinstance(h, int) and isinstance(d, int)
            and all(getattr(m, n).out_features == h * d for n in _PROJ[:3])
            and m.out_proj.in_features == h * d):
        return False
    if getattr(m, "attention_type", None) not in ("global", "local"):
        return False
    if not isinstance(getattr(m, "layer_id", None), int):
        return False
    if not all(isinstance(getattr(m, n, None), nn.Dropout) for n in ("attn_dropout", "resid_dropout")):
        return False
    bias = getattr(m, "bias", None)
    if not (isinstance(bias, torch.Tensor) and bias.dtype == torch.bool and bias.dim() == 4):
        return False
    if m.attention_type == "local" and _window_size(m) is None:
        return False
    try:
        params = list(inspect.signature(type(m).forward).parameters.values())
    except (TypeError, ValueError):
        return False
    rest = params[1 + len(_PARAMS):]
    return ([p.name for p in params[1:1 + len(_PARAMS)]] == _PARAMS
            and all(p.kind is inspect.Parameter.VAR_KEYWORD for p in rest))


def _window_size(m):
    w = getattr(getattr(m, "config", None), "window_size", None)
    return w if isinstance(w, int) and not isinstance(w, bool) and w >= 1 else None


def _window(m):
    """lz.attention's window for the module's layer type (None: plain causal)."""
    return (m.config.window_size - 1, 0) if m.attention_type == "local" else None


def _bias_as_expected(m) -> bool:
    """Is the `bias` buffer the causal (and, local, windowed) pattern the replacement runs?"""
    n = m.bias.shape[-1]
    if m.bias.shape != (1, 1, n, n):
        return False
    i = torch.arange(n, device=m.bias.device)
    allowed = i[None, :] <= i[:, None]
    if m.attention_type == "local":
        allowed &= i[None, :] >= i[:, None] - (m.config.window_size - 1)
    return torch.equal(m.bias[0, 0], allowed)


def _held(cache, layer_id):
    """How many keys a cache that just grows (dynamic) held before this call; None for any other
    cache (static, sliding: its keys need not be the positions so far, and the local window of the
    `bias` buffer, taken at its bottom-right, can then leave a real token no key, where the
    original averages masked values)."""
    if cache is None:
        return 0
    try:
        n = cache.get_seq_length(layer_id)
    except Exception:  # noqa: BLE001 - not a transformers Cache: not known to just grow
        return None
    return n if type(n) is int else None


def make_forward(original):
    def forward(self, hidden_states, attention_mask=None, layer_past=None, use_cache=False,
                output_attentions=False, **kwargs):   # kwargs: the module's forward ignores them too
        if (output_attentions or hidden_states.dim() != 3
                or (attention_mask is not None
                    and (attention_mask.dim() != 4 or not attention_mask.is_floating_point()))):
            return original(hidden_states, attention_mask, layer_past, use_cache, output_attentions, **kwargs)
        b, s, _ = hidden_states.shape
        h, d = self.num_heads, self.head_dim
        q, k, v = (getattr(self, n)(hidden_states).view(b, s, h, d).transpose(1, 2) for n in _PROJ[:3])
        held = _held(layer_past, self.layer_id)
        if layer_past is not None:
            k, v = layer_past.update(k, v, self.layer_id)
        sk = k.shape[-2]
        if sk > self.bias.shape[-1] or (self.attention_type == "local" and (held is None or sk != held + s)):
            # past the buffer, or a local layer over a cache that does not just grow: the module's
            # own math (and error)
            out = self._attn(q, k, v, attention_mask)[0]
        else:
            out = ops.attention(q, k, v, attn_mask=attention_mask, is_causal=True, scale=1.0,
                                dropout_p=self.attn_dropout.p if self.training else 0.0,
                                window=_window(self), causal_align="bottom_right")
        out = self.out_proj(out.transpose(1, 2).reshape(b, s, h * d))
        return self.resid_dropout(out), None
    forward.__name__ = "lz_inline_gpt_neo_attention_forward"
    return forward


def check(m: nn.Module, device) -> tuple[bool, str]:
    """The `bias` buffer is the pattern run, and both forwards agree on a probe; (ok, why not).
    The probe is long enough to cross a local layer's window (within the buffer); its padding is
    on the right, so that every query has a key."""
    if not _bias_as_expected(m):
        return False, f"its causal `bias` buffer is not the {m.attention_type} pattern"
    dtype = m.q_proj.weight.dtype
    s = 5 if m.attention_type == "global" else m.config.window_size + 3
    s = max(1, min(s, m.bias.shape[-1]))
    x = probe_input((2, s, m.q_proj.in_features), None, dtype=dtype, device=device)
    mask = torch.zeros(2, 1, 1, s, dtype=dtype, device=device)
    mask[1, ..., s - s // 3:] = torch.finfo(dtype).min
    return probe_tuple(m, make_forward, 2, "(output, probabilities)", dtype, x, attention_mask=mask)


def details(m: nn.Module) -> dict:
    out = {"op": "attention", "num_heads": m.num_heads, "head_dim": m.head_dim}
    if m.attention_type == "local":
        out["window"] = m.config.window_size
    return out
