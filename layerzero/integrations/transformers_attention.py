"""The attention function LayerZero registers with transformers as "layerzero" (and `lz.patch`
switches models to): `attention_forward` turns transformers' attention call (q/k/v in (B, H, S, D),
its mask, the module's attributes and kwargs) into `lz.attention`, and `paged_forward` a call over
a `lz.PagedKVCache` layer into `lz.paged_attention`. Nothing a call carries is dropped silently:
kwargs no kernel takes raise or are warned about once (`_unknown`).

Part of the transformers integration (`layerzero.integrations.transformers` registers it and
re-exports these names); imports only LayerZero's ops, the paged metadata key and `patching.swap.observe`.
"""
from __future__ import annotations

import logging
import warnings

import torch

from .. import ops, reference, telemetry
from ..paged.meta import META_KEY
from ..patching.swap import observe

log = logging.getLogger("layerzero")


# kwargs that carry nothing attention needs beyond q/k/v, the mask and the cache (continuous
# batching's read/write indices and logits rows are its cache's, applied before attention runs)
_INFORMATIONAL = frozenset({"position_ids", "output_hidden_states", "output_router_logits",
                            "num_items_in_batch", "use_cache", "cache_position", "return_dict",
                            "layer_idx", "past_key_values", "cache", "token_type_ids",
                            "max_length_q", "max_length_k", "position_embeddings",
                            "encoder_hidden_states", "encoder_attention_mask", "read_index",
                            "write_index", "logits_indices", "logits_processor_args"})
# transformers' continuous batching with a block table: the K/V are not in the cache yet, the
# flash-attn kernel is to write them (flash_attn_with_kvcache); no LayerZero kernel does that
_BLOCK_TABLE = ("block_table", "k_cache", "v_cache")
# what a paged call (lz.PagedKVCache) cannot combine with: the names transformers passes them by
_NOT_PAGED = ("position_bias", "cu_seq_lens_q", "cu_seq_lens_k", "seq_idx", "indices")
_warned: set = set()


def _unknown(kwargs: dict) -> None:
    names = tuple(sorted(k for k, v in kwargs.items() if k not in _INFORMATIONAL and v is not None))
    if names and names not in _warned:
        _warned.add(names)
        msg = (f"layerzero attention: transformers passed keyword arguments it does not know: "
               f"{', '.join(names)}; they are not applied")
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _segments(cu: torch.Tensor, n: int, device) -> torch.Tensor:
    """Sequence index of each of n packed positions, from cumulative lengths (0, l0, l0+l1, ...)."""
    bounds = cu[1:].to(device=device, dtype=torch.long).contiguous()
    return torch.searchsorted(bounds, torch.arange(n, device=device), right=True)


def _and_bool(mask, keep: torch.Tensor):
    """Restrict a mask (None, bool, or additive float) to the positions where `keep` is True."""
    if mask is None:
        return keep
    if mask.dtype == torch.bool:
        return mask & keep
    return torch.where(keep, mask, torch.full((), float("-inf"), dtype=mask.dtype, device=mask.device))


def _top_k_keys(indices: torch.Tensor, sk: int) -> torch.Tensor:
    """Bool (B, 1, Sq, Sk): True at the key positions `indices` (B, Sq, k) lists for each query
    (sparse attention's top-k selection, DeepSeek-V3.2 style); negative entries list nothing."""
    idx = indices.long()
    valid = (idx >= 0).to(torch.int32)
    hits = torch.zeros(*idx.shape[:-1], sk, dtype=torch.int32, device=idx.device)
    return (hits.scatter_add_(-1, idx.clamp(min=0), valid) > 0).unsqueeze(1)


def _with_token_sinks(query, key, value, mask, causal, align, window, sinks):
    """Per-query sinks (B or 1, H, Sq, 1): one more key, with value 0 and a score of 0 to which
    the mask adds the sink: softmax then gives it exp(sink) of the mass and it adds nothing to
    the output, as transformers' eager attention does with `cat([scores, sinks])`. Causality and
    the window move into the (float, per head) mask, which covers the extra key."""
    b, h, sq, _ = query.shape
    sk = key.shape[2]
    dt = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    neg = torch.full((), float("-inf"), dtype=dt, device=query.device)
    allowed = reference.attention_allowed(sq, sk, is_causal=causal, window=window, causal_align=align,
                                          device=query.device)
    add = torch.zeros((), dtype=dt, device=query.device)
    if allowed is not None:
        add = torch.where(allowed, add, neg)
    if mask is not None:
        add = torch.where(mask, add, neg) if mask.dtype == torch.bool else add + mask.to(dt)
    add = add.expand(b, h, sq, sk)
    add = torch.cat([add, sinks.to(dt).expand(b, h, sq, 1)], dim=-1)
    key = torch.nn.functional.pad(key, (0, 0, 0, 1))
    value = torch.nn.functional.pad(value, (0, 0, 0, 1))
    return key, value, add


def _output_attentions_of(module) -> bool:
    """`module.config.output_attentions`, read from the config's own fields where transformers 5
    keeps it (`_output_attentions`, behind a property): through the property, every read goes via
    the config class's `__getattribute__`, some hundreds of instructions a layer for dynamo to
    trace in a compiled forward (scripts/trace_cost.py). Other configs: the attribute."""
    config = getattr(module, "config", None)
    if config is None:
        return False
    fields = vars(config)
    if "_output_attentions" in fields:
        return fields["_output_attentions"]
    return getattr(config, "output_attentions", False)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention call -> `lz.attention`. Returns (out (B, Sq, Hq, Dv), weights | None).

    query (B, Hq, Sq, D), key/value (B, Hkv, Sk, D) after the cache update, not repeated for GQA.
    attention_mask: None, bool (B, 1, Sq, Sk) (True = attend) or additive float. With None
    (transformers' SDPA convention): Sq == 1 attends every key; Sq == Sk is causal; Sq < Sk is a
    prefill into an empty static cache: causal top-left, and K/V past Sq are dropped.

    kwargs honoured: is_causal (else `module.is_causal`), sliding_window (inside the mask when
    transformers builds one; a window when it does not), softcap, s_aux (else `module.sinks`),
    position_bias (T5: added to the scores, combined with the mask and causality), packed
    sequences (cu_seq_lens_q/k, seq_idx: block-diagonal mask), output_attentions (weights are
    computed by `reference.attention` and returned). dropout is applied as given (transformers
    passes 0.0 in eval).
    """
    paged = kwargs.pop(META_KEY, None)
    if any(kwargs.get(n) is not None for n in _BLOCK_TABLE):
        raise ValueError("layerzero attention: transformers passed a paged block table (block_table, "
                         "k_cache, v_cache: continuous batching's flash-attn path, where the kernel "
                         "writes the new K/V into the cache itself); LayerZero's attention does not "
                         "take it. Use generate() with lz.PagedKVCache, or continuous batching "
                         "without a block table (its cache then hands over K/V)")
    if paged is not None:
        return paged_forward(module, query, key, value, paged, dropout, scaling, kwargs)
    is_causal = kwargs.pop("is_causal", None)
    sliding_window = kwargs.pop("sliding_window", None)
    softcap = kwargs.pop("softcap", None)
    sinks = kwargs.pop("s_aux", None)
    position_bias = kwargs.pop("position_bias", None)
    output_attentions = kwargs.pop("output_attentions", None)
    cu_q, cu_k = kwargs.pop("cu_seq_lens_q", None), kwargs.pop("cu_seq_lens_k", None)
    seq_idx = kwargs.pop("seq_idx", None)
    indices = kwargs.pop("indices", None)
    token_sinks = kwargs.pop("sinks", None)
    if kwargs:
        _unknown(kwargs)
    if sinks is None and isinstance(getattr(module, "sinks", None), torch.Tensor):
        sinks = module.sinks
    if output_attentions is None:
        output_attentions = _output_attentions_of(module)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)

    sq, sk = query.shape[2], key.shape[2]
    mask = attention_mask
    if mask is not None and mask.shape[-1] > sk:  # a mask sized for more keys than the cache holds
        mask = mask[..., :sk]
    causal = bool(is_causal) and sq > 1 and mask is None
    if causal and sk > sq:  # prefill into an empty static cache: keys past Sq are not written yet
        key, value, sk = key[:, :, :sq], value[:, :, :sq], sq
        if position_bias is not None:
            position_bias = position_bias[..., :sq]
    align = "top_left" if sq == sk else "bottom_right"  # Sq < Sk without mask: decode, queries last
    observe(module, (query.shape[0], sq, sk))
    window = None
    if sliding_window is not None and mask is None and sk > sliding_window:
        window = (sliding_window - 1, sliding_window - 1)  # transformers' (and flash-attn's) convention

    if cu_q is not None or cu_k is not None:  # packed sequences (batch 1): block-diagonal
        seg_q = _segments(cu_q if cu_q is not None else cu_k, sq, query.device)
        seg_k = _segments(cu_k if cu_k is not None else cu_q, sk, query.device)
        mask = _and_bool(mask, (seg_q[:, None] == seg_k[None, :])[None, None])
    elif seq_idx is not None and sq == sk:
        mask = _and_bool(mask, (seq_idx[:, None, :, None] == seq_idx[:, None, None, :]))
    if indices is not None:
        mask = _and_bool(mask, _top_k_keys(indices, sk))
    if position_bias is not None:  # additive (B or 1, H, Sq, Sk)
        if mask is None:
            mask = position_bias
        elif mask.dtype == torch.bool:
            mask = torch.where(mask, position_bias, torch.full((), float("-inf"), dtype=position_bias.dtype,
                                                               device=position_bias.device))
        else:
            mask = position_bias + mask

    if token_sinks is not None and token_sinks.dim() == 1 and sinks is None:
        sinks, token_sinks = token_sinks, None      # one sink per head: lz.attention's own
    if token_sinks is not None:
        key, value, mask = _with_token_sinks(query, key, value, mask, causal, align, window, token_sinks)
        causal, window, align = False, None, "top_left"
    if output_attentions:  # no fused kernel returns the probabilities: the reference computes both
        out, weights = reference.attention(query, key, value, mask, causal, scaling, dropout, window,
                                           softcap, None, sinks, "bhsd", align, return_weights=True)
        telemetry.count_call(("attention", "reference.attention", False))
        if token_sinks is not None:
            weights = weights[..., :-1]     # the sink key's share is not a key's weight
        return out.transpose(1, 2).contiguous(), weights
    out = ops.attention(query, key, value, attn_mask=mask, is_causal=causal, scale=scaling,
                        dropout_p=dropout, window=window, softcap=softcap, sinks=sinks,
                        causal_align=align)          # (B, Hq, Sq, Dv)
    return out.transpose(1, 2).contiguous(), None


def paged_forward(module, query, k_pages, v_pages, meta, dropout, scaling, kwargs):
    """transformers' attention call over a `lz.PagedKVCache` layer: key/value are its page pools
    (pages, page_size, Hkv, D), `meta` the step's page table and lengths -> `lz.paged_attention`.
    Returns (out (B, Sq, Hq, Dv), None). The 4-D mask transformers built is not read: the
    metadata holds causality and each row's real keys (the mask's key axis is the padded batch,
    not the pages); sliding_window, softcap, s_aux / module.sinks and is_causal apply as in
    `attention_forward`. Packed sequences, position biases, top-k indices, per-token sinks,
    attention weights and dropout raise: no paged kernel takes them."""
    is_causal = kwargs.pop("is_causal", None)
    sliding_window = kwargs.pop("sliding_window", None)
    softcap = kwargs.pop("softcap", None)
    sinks = kwargs.pop("s_aux", None)
    output_attentions = kwargs.pop("output_attentions", None)
    if output_attentions is None:
        output_attentions = _output_attentions_of(module)
    given = [n for n in _NOT_PAGED if kwargs.pop(n, None) is not None]
    token_sinks = kwargs.pop("sinks", None)
    if token_sinks is not None and token_sinks.dim() == 1 and sinks is None:
        sinks = token_sinks                      # one sink per head: lz.paged_attention's own
    elif token_sinks is not None:
        given.append("per-query sinks")
    if output_attentions:
        given.append("output_attentions=True")
    if dropout:
        given.append(f"dropout={dropout} (training mode: call model.eval())")
    if given:
        raise ValueError(f"layerzero attention over a lz.PagedKVCache: {', '.join(given)} cannot be "
                         f"applied to paged K/V; use transformers' DynamicCache for such calls")
    if kwargs:
        _unknown(kwargs)
    meta.consume(sliding_window)
    if sinks is None and isinstance(getattr(module, "sinks", None), torch.Tensor):
        sinks = module.sinks
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    window = None if sliding_window is None else (sliding_window - 1, -1)   # a query sees W keys
    out = ops.paged_attention(query, k_pages, v_pages, meta.page_table, meta.seq_lens, scale=scaling,
                              is_causal=bool(is_causal), window=window, softcap=softcap, sinks=sinks)
    return out.transpose(1, 2).contiguous(), None       # (B, Hq, Sq, Dv) -> (B, Sq, Hq, Dv)
