"""LUKE-style word + entity self-attention written inline (not through transformers'
AttentionInterface) -> `lz.attention`.

LUKE attends over the words and the entities concatenated, with BERT's `query` / `key` / `value`
projections into `num_attention_heads` x `attention_head_size`. With entity-aware attention
(`use_entity_aware_attention` and entities given) the query depends on the pair of kinds: words
use `query` towards words and `w2e_query` towards entities, entities `e2w_query` and `e2e_query`.
One `lz.attention` call gives that too: each query is [towards-words query, towards-entities
query] (2 d per head) and each key is [key, 0] for a word and [0, key] for an entity, so the dot
product picks the right pair exactly; the values are unchanged.

Recognised by structure: those projections, `use_entity_aware_attention` (bool), a Dropout, and a
forward `(word_hidden_states, entity_hidden_states, attention_mask, output_attentions)` returning
(word context, entity context or None). The replacement runs only the plain call: a float additive
mask or none, no returned probabilities; any other call runs the module's own forward. Before
swapping, both forwards run on probes (words only, and words with entities) and must agree.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ... import ops
from ...patch import agree, probe, probe_input
from . import forward_params

DESCRIPTION = "inline LUKE-style word/entity self-attention"

_PROJ = ("query", "key", "value")
_AWARE = ("w2e_query", "e2w_query", "e2e_query")
_PARAMS = ["word_hidden_states", "entity_hidden_states", "attention_mask", "output_attentions"]


def recognised(m: nn.Module) -> bool:
    """Does `m` look like LUKE's self-attention?"""
    aware = getattr(m, "use_entity_aware_attention", None)
    if not isinstance(aware, bool):
        return False
    names = (*_PROJ, *_AWARE) if aware else _PROJ
    if not all(isinstance(getattr(m, n, None), nn.Linear) for n in names):
        return False
    h, d = getattr(m, "num_attention_heads", None), getattr(m, "attention_head_size", None)
    if not (isinstance(h, int) and isinstance(d, int)
            and all(getattr(m, n).out_features == h * d for n in names)):
        return False
    if not isinstance(getattr(m, "dropout", None), nn.Dropout):
        return False
    return forward_params(m) == _PARAMS


def _aware_qk(m, words, entities, k, heads):
    """Entity-aware queries and keys: [towards-words, towards-entities] halves per head."""
    qw = torch.cat([heads(m.query(words)), heads(m.w2e_query(words))], -1)
    qe = torch.cat([heads(m.e2w_query(entities)), heads(m.e2e_query(entities))], -1)
    nw = words.shape[1]
    zw, ze = torch.zeros_like(k[:, :nw]), torch.zeros_like(k[:, nw:])
    keys = torch.cat([torch.cat([k[:, :nw], zw], -1), torch.cat([ze, k[:, nw:]], -1)], 1)
    return torch.cat([qw, qe], 1), keys


def make_forward(original):
    def forward(self, word_hidden_states, entity_hidden_states, attention_mask=None, output_attentions=False):
        if (output_attentions or word_hidden_states.dim() != 3
                or (entity_hidden_states is not None and entity_hidden_states.dim() != 3)
                or (attention_mask is not None
                    and not (attention_mask.is_floating_point() and attention_mask.dim() == 4))):
            return original(word_hidden_states, entity_hidden_states, attention_mask, output_attentions)
        words, entities = word_hidden_states, entity_hidden_states
        b, nw, _ = words.shape
        d = self.attention_head_size
        both = words if entities is None else torch.cat([words, entities], dim=1)

        def heads(x):
            return x.view(*x.shape[:-1], self.num_attention_heads, d)
        k, v = heads(self.key(both)), heads(self.value(both))
        if self.use_entity_aware_attention and entities is not None:
            q, k = _aware_qk(self, words, entities, k, heads)
        else:
            q = heads(self.query(both))
        out = ops.attention(q, k, v, attn_mask=attention_mask, scale=1.0 / math.sqrt(d),
                            dropout_p=self.dropout.p if self.training else 0.0, layout="bshd")
        out = out.reshape(b, out.shape[1], -1)
        return out[:, :nw], (None if entities is None else out[:, nw:])
    forward.__name__ = "lz_inline_luke_attention_forward"
    return forward


def check(m: nn.Module, device) -> tuple[bool, str]:
    """Run the module's forward and the replacement on probes (words only; words and entities);
    (agree, why not)."""
    hidden, dtype = m.query.in_features, m.query.weight.dtype
    x = probe_input((2, 7, hidden), None, dtype=dtype, device=device)
    words, entities = x[:, :5], x[:, 5:].flip(1) * 0.5
    for ents in (None, entities):
        n = 5 if ents is None else 7
        mask = torch.zeros(2, 1, 1, n, dtype=dtype, device=device)
        mask[1, ..., :2] = torch.finfo(dtype).min
        try:
            want, got = probe(m, make_forward, words, entity_hidden_states=ents, attention_mask=mask)
        except Exception as e:  # noqa: BLE001 - a module we can't call plainly is left alone
            return False, f"probe raised {type(e).__name__}: {e}"
        if not isinstance(want, tuple) or len(want) != 2:
            return False, "its forward does not return (word context, entity context)"
        for a, b in zip(got, want):
            if a is None and b is None:
                continue
            ok, err = agree(a, b, dtype)
            if not ok:
                return False, f"differs on a probe (err {err:.2g})"
    return True, ""


def details(m: nn.Module) -> dict:
    return {"op": "attention", "num_heads": m.num_attention_heads, "head_dim": m.attention_head_size,
            "entity_aware": m.use_entity_aware_attention}
