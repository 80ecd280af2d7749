"""BART-style attention written inline (not through transformers' AttentionInterface) ->
`lz.attention`, for the families that keep their own copy of it: xglm, trocr, mvp, led's decoder,
fsmt (whose layout is (seq, batch, dim)).

Recognised by structure: `q_proj` / `k_proj` / `v_proj` / `out_proj` Linear layers, `num_heads` x
`head_dim` == `embed_dim`, a float `scaling` and `dropout`, a `layer_idx`, and a forward whose
parameters are one of the forms below (`_FORMS`) computing the scores itself (torch.bmm and
softmax, reading no names beyond those of these forwards: no AttentionInterface, no other math):

    (hidden_states, key_value_states, cache, attention_mask, [attn_prompt], [output_attentions], [**kwargs])
    (query, key, key_padding_mask, layer_state, attn_mask, output_attentions, **kwargs)     fsmt

The replacement runs self- and cross-attention with the additive float mask (fsmt: the causal mask
and the bool key padding mask), mvp's prompt keys/values, and the cache exactly as the module does
(`cache.update(k, v, layer_idx)`; an EncoderDecoderCache's self or cross part, the cross keys
computed once and reused once `is_updated`). q is projected unscaled and `scale=self.scaling` given
to lz.attention. Returned probabilities are None. Any other call (returned probabilities, also when
transformers records them through hooks, a bool mask, the deprecated `past_key_values=` name,
arguments it does not know) runs the module's own forward. Before swapping, both forwards run on a
probe (random hidden states and a padding mask) and must agree.
"""
from __future__ import annotations

import inspect
import sys

import torch
from torch import nn

from ... import ops
from ...patch import agree, observe, probe, probe_input
from . import attentions_recorded

DESCRIPTION = "inline BART-style attention"

_PROJ = ("q_proj", "k_proj", "v_proj", "out_proj")
_BART = ("hidden_states", "key_value_states", "cache", "attention_mask")
_FSMT = ("query", "key", "key_padding_mask", "layer_state", "attn_mask", "output_attentions", "kwargs")
# forward parameters (after self) -> form; "led" returns (output, probabilities, cache)
_FORMS = {
    (*_BART, "kwargs"): "xglm",                                 # returns its probabilities always
    (*_BART, "output_attentions", "kwargs"): "trocr",
    (*_BART, "attn_prompt", "output_attentions", "kwargs"): "mvp",
    (*_BART, "output_attentions"): "led",
    _FSMT: "fsmt",
}
# every global / attribute name those forwards read: a look-alike reading anything else (informer's
# ProbSparse attention: topk, randint, ...; a position bias) computes something else
_READS = frozenset((
    "torch nn functional bmm softmax dropout cat zeros full max min finfo dtype device float16 float32 "
    "size shape view reshape transpose permute contiguous expand unsqueeze masked_fill dim to list "
    "isinstance ValueError EncoderDecoderCache is_updated get self_attention_cache cross_attention_cache "
    "layers keys values update layer_idx q_proj k_proj v_proj out_proj num_heads head_dim embed_dim "
    "scaling training encoder_decoder_attention").split())


def _params(forward) -> tuple:
    try:
        return tuple(inspect.signature(forward).parameters)
    except (TypeError, ValueError):
        return ()


def _class_params(m: nn.Module) -> tuple:
    """The parameters (after self) of the forward of `m`'s class, and the names its code reads."""
    fn = inspect.unwrap(type(m).forward)
    return _params(fn)[1:], getattr(getattr(fn, "__code__", None), "co_names", ())


def recognised(m: nn.Module) -> bool:
    """Does `m` look like a BART-style attention module computing its scores inline?"""
    if not all(isinstance(getattr(m, n, None), nn.Linear) for n in _PROJ):
        return False
    h, d = getattr(m, "num_heads", None), getattr(m, "head_dim", None)
    if not (isinstance(h, int) and isinstance(d, int) and getattr(m, "embed_dim", None) == h * d
            and m.q_proj.out_features == m.k_proj.out_features == m.v_proj.out_features == h * d
            and m.out_proj.in_features == h * d):
        return False
    if not (isinstance(getattr(m, "scaling", None), float) and isinstance(getattr(m, "dropout", None), (int, float))
            and hasattr(m, "layer_idx")):
        return False
    params, names = _class_params(m)
    if not {"bmm", "softmax"} <= set(names) <= _READS:
        return False
    if params == _FSMT:
        return isinstance(getattr(m, "encoder_decoder_attention", None), bool)
    return params in _FORMS and hasattr(m, "is_decoder")


def _bind(names: tuple, args: tuple, kwargs: dict) -> tuple[dict, dict] | None:
    """(named arguments, extra keywords) of a call, or None when it does not bind plainly."""
    named = [n for n in names if n != "kwargs"]
    if len(args) > len(named) or any(k in named[:len(args)] for k in kwargs):
        return None
    call = dict(zip(named, args))
    extra = {}
    for k, v in kwargs.items():
        (call if k in named else extra)[k] = v
    if (extra and "kwargs" not in names) or "past_key_values" in extra:
        return None                 # the forward's own error, or its deprecated-name handling
    return call, extra


def _enc_dec(cache) -> bool:
    cls = getattr(sys.modules.get("transformers.cache_utils"), "EncoderDecoderCache", None)
    return cls is not None and isinstance(cache, cls)


def _float_mask(mask, like: torch.Tensor, dims: int) -> bool:
    return mask is None or (isinstance(mask, torch.Tensor) and mask.dtype == like.dtype and mask.dim() <= dims)


def _keys_values(self, states, cache, cross: bool, update_kwargs, seq_first: bool = False):
    """Keys and values (B, H, Sk, D) of `states` ((B, Sk, E), or (Sk, B, E) `seq_first`), through
    the cache as the module's forward does: an EncoderDecoderCache's cross part is written once and
    reused once `is_updated`."""
    curr, is_updated = cache, False
    if cache is not None and _enc_dec(cache):
        is_updated = cache.is_updated.get(self.layer_idx)
        curr = cache.cross_attention_cache if cross else cache.self_attention_cache
    if cross and cache is not None and is_updated:
        layer = curr.layers[self.layer_idx]
        return layer.keys, layer.values
    b, h, d = states.shape[1 if seq_first else 0], self.num_heads, self.head_dim
    k, v = self.k_proj(states), self.v_proj(states)
    if seq_first:
        k, v = (t.view(-1, b, h, d).permute(1, 2, 0, 3) for t in (k, v))
    else:
        k, v = (t.view(b, -1, h, d).transpose(1, 2) for t in (k, v))
    if cache is not None:
        k, v = (curr.update(k, v, self.layer_idx) if update_kwargs is None
                else curr.update(k, v, self.layer_idx, kwargs=update_kwargs))
        if cross and _enc_dec(cache):
            cache.is_updated[self.layer_idx] = True
    return k, v


def _attend(self, q, k, v, mask):
    observe(self, (q.shape[0], q.shape[2], k.shape[2]))
    return ops.attention(q, k, v, attn_mask=mask, scale=self.scaling,
                         dropout_p=self.dropout if self.training else 0.0)


def _bart_forward(original, names: tuple, form: str):
    def forward(self, *args, **kwargs):
        bound = _bind(names, args, kwargs)
        if bound is None:
            return original(*args, **kwargs)
        call, extra = bound
        x, kv = call.get("hidden_states"), call.get("key_value_states")
        cache, mask, prompt = call.get("cache"), call.get("attention_mask"), call.get("attn_prompt")
        if (call.get("output_attentions") or extra.get("output_attentions") or attentions_recorded()
                or not isinstance(x, torch.Tensor) or x.dim() != 3
                or not (kv is None or isinstance(kv, torch.Tensor) and kv.dim() == 3 and len(kv) == len(x))
                or not _float_mask(mask, x, 4)):
            return original(*args, **kwargs)
        b, sq, _ = x.shape
        q = self.q_proj(x).view(b, sq, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = _keys_values(self, x if kv is None else kv, cache, kv is not None,
                            None if form == "led" else extra)
        if prompt is not None:      # mvp: prompt keys/values first, always attended
            k = torch.cat([prompt[0].expand(b, -1, -1, -1), k], dim=2)
            v = torch.cat([prompt[1].expand(b, -1, -1, -1), v], dim=2)
            if mask is not None:
                mask = torch.cat([mask.new_zeros(b, 1, sq, prompt[0].size(1)), mask], dim=-1)
        if mask is not None and mask.size() != (b, 1, sq, k.shape[2]):
            raise ValueError(f"Attention mask should be of size {(b, 1, sq, k.shape[2])}, but is {mask.size()}")
        out = _attend(self, q, k, v, mask).transpose(1, 2).reshape(b, sq, self.embed_dim)
        out = self.out_proj(out)
        return (out, None, cache) if form == "led" else (out, None)
    forward.__name__ = "lz_inline_bart_attention_forward"
    return forward


def _fsmt_forward(original, names: tuple):
    """fsmt: (seq, batch, dim) in and out; cross-attention is the module's kind
    (`encoder_decoder_attention`), not an argument; bool key padding mask (True = padding)."""
    def forward(self, *args, **kwargs):
        bound = _bind(names, args, kwargs)
        if bound is None:
            return original(*args, **kwargs)
        call, extra = bound
        x, key, cache = call.get("query"), call.get("key"), call.get("layer_state")
        pad, mask, cross = call.get("key_padding_mask"), call.get("attn_mask"), self.encoder_decoder_attention
        if isinstance(pad, torch.Tensor) and pad.dim() == 0:
            pad = None
        if (call.get("output_attentions") or attentions_recorded()
                or not isinstance(x, torch.Tensor) or x.dim() != 3
                or cross and not (isinstance(key, torch.Tensor) and key.dim() == 3 and key.shape[1] == x.shape[1])
                or cross and cache is not None and not _enc_dec(cache)
                or not (pad is None or isinstance(pad, torch.Tensor) and pad.dtype == torch.bool and pad.dim() == 2)
                or not _float_mask(mask, x, 4)):
            return original(*args, **kwargs)
        sq, b, e = x.shape
        q = self.q_proj(x).view(sq, b, self.num_heads, self.head_dim).permute(1, 2, 0, 3)
        k, v = _keys_values(self, key if cross else x, cache, cross, extra, seq_first=True)
        assert pad is None or pad.size()[:2] == (b, k.shape[2])
        if pad is not None:         # the scores of padding keys are set to the dtype's minimum
            base = mask if mask is not None else x.new_zeros(())
            mask = torch.where(pad[:, None, None, :], torch.finfo(x.dtype).min, base)
        out = _attend(self, q, k, v, mask).permute(2, 0, 1, 3).reshape(sq, b, e)
        return self.out_proj(out), None
    forward.__name__ = "lz_inline_fsmt_attention_forward"
    return forward


def make_forward(original):
    names = _params(original)
    form = _FORMS.get(names)
    if form is None:                # not a form reproduced: the module's own forward
        return lambda self, *args, **kwargs: original(*args, **kwargs)
    return _fsmt_forward(original, names) if form == "fsmt" else _bart_forward(original, names, form)


def check(m: nn.Module, device) -> tuple[bool, str]:
    """Run the module's forward and the replacement on a probe; (agree, why not)."""
    e, kdim = m.q_proj.in_features, m.k_proj.in_features
    dtype = m.q_proj.weight.dtype
    x = probe_input((2, 5, e), None, dtype=dtype, device=device)
    fsmt = _class_params(m)[0] == _FSMT
    try:
        if fsmt:
            pad = torch.zeros(2, 5, dtype=torch.bool, device=device)
            pad[1, :2] = True
            want, got = probe(m, make_forward, x.transpose(0, 1), key=x.transpose(0, 1), key_padding_mask=pad)
        else:
            mask = torch.zeros(2, 1, 5, 5, dtype=dtype, device=device)
            mask[1, ..., :2] = torch.finfo(dtype).min
            kv = None if kdim == e else probe_input((2, 5, kdim), None, dtype=dtype, device=device)
            want, got = probe(m, make_forward, x, key_value_states=kv, attention_mask=mask)
    except Exception as exc:  # noqa: BLE001 - a module we can't call plainly is left alone
        return False, f"probe raised {type(exc).__name__}: {exc}"
    if (not isinstance(want, tuple) or not isinstance(got, tuple) or len(want) != len(got)
            or not isinstance(want[0], torch.Tensor)):
        return False, "its forward does not return (output, probabilities, ...)"
    if any(w is not g for w, g in zip(want[1:], got[1:]) if not isinstance(w, torch.Tensor)):
        return False, "its forward returns more than (output, probabilities)"
    ok, err = agree(got[0], want[0], dtype)
    return ok, "" if ok else f"differs on a probe (err {err:.2g})"


def details(m: nn.Module) -> dict:
    return {"op": "attention", "num_heads": m.num_heads, "head_dim": m.head_dim}
