"""The caches of lz.speculative_generate: the target's (the caller's DynamicCache, StaticCache or
lz.PagedKVCache, or one of its own) and full-length static ones that roll back by moving their
write position."""
from __future__ import annotations

from .plan import _layer_types, _refuse


def _full_static_cache(model, max_len: int):
    """A StaticCache with one full-length StaticLayer per decoder layer (sliding windows come from
    the mask), which rolls back by moving its write position (`crop`)."""
    from transformers.cache_utils import Cache, StaticCache, StaticLayer

    cache = StaticCache.__new__(StaticCache)
    Cache.__init__(cache, layers=[StaticLayer(max_cache_len=max_len) for _ in _layer_types(model)])
    return cache


def _callers_cache(model_kwargs: dict):
    """The cache the caller passed (cache= / past_key_values=), or None; transformers' own empty
    cache for its loop doesn't count (it marks the caller's `_is_user_defined`)."""
    given = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    return given if getattr(given, "_is_user_defined", False) else None


def _target_cache(model, cfg, given, need: int, roomy: int, fixed: bool):
    """(cache, capacity in columns) for the target. A StaticCache passed in is used as it is (its
    capacity bounds k near the end), so are a DynamicCache and an lz.PagedKVCache (no bound);
    cache_implementation="static", or none asked for where the steps are graphed (`fixed`), gets
    a full-layer StaticCache of `roomy` columns; otherwise a plain DynamicCache (one full layer
    per decoder layer)."""
    from transformers.cache_utils import DynamicCache, StaticCache, StaticLayer

    from ..paged.cache import PagedKVCache

    if isinstance(given, PagedKVCache) and given.graph_mode:
        raise ValueError("this lz.PagedKVCache is in graph mode (pages reserved by an earlier decode "
                         "loop); call cache.reset() before lz.speculative_generate")
    if given is not None and given.get_seq_length() != 0:
        raise _refuse(f"a cache holding {int(given.get_seq_length())} tokens (continuing from a cache)")
    if isinstance(given, (DynamicCache, PagedKVCache)):
        return given, None
    if isinstance(given, StaticCache) and cfg.cache_implementation != "static":
        odd = sorted({type(layer).__name__ for layer in given.layers if type(layer) is not StaticLayer})
        if odd:
            raise _refuse(f"a StaticCache with {', '.join(odd)} layers (they can't roll back); pass "
                          "cache_implementation='static' for one that can")
        cap = int(given.get_max_length())
        if cap < need:
            raise ValueError(f"the StaticCache holds {cap} tokens; this call needs at least {need} "
                             "(prompt + max_new_tokens - 1) and uses more, when it has room, to draft")
        return given, cap
    if given is not None and not isinstance(given, StaticCache):
        raise _refuse(f"a cache of type {type(given).__name__} (DynamicCache, StaticCache or lz.PagedKVCache)")
    if cfg.cache_implementation == "static" or (fixed and given is None and cfg.cache_implementation is None):
        return _full_static_cache(model, roomy), roomy
    return DynamicCache(), None
