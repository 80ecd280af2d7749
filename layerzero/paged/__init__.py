"""Paged KV cache for transformers' generate() and the page metadata `lz.paged_attention` takes.

    allocator.py  page bookkeeping: free pages, refcounts, each row's pages (plain Python)
    group.py      one group of layers (full attention, or one sliding window): a forward step's
                  plan (padding, shared prefixes, page writes), the device page table
    graph.py      graph mode: pages reserved ahead, device-only updates (CUDA-graphed decode)
    cache.py      `lz.PagedKVCache`, the transformers Cache (imports transformers)
    meta.py       `PagedMeta`: what a layer's update hands to the attention call; FlashInfer's CSR

`layerzero.paged.PagedKVCache` (and `lz.PagedKVCache`) import transformers on first use only.
"""
from .meta import META_KEY, PagedMeta, csr

__all__ = ["META_KEY", "PagedMeta", "csr", "PagedKVCache"]


def __getattr__(name: str):
    if name == "PagedKVCache":
        from .cache import PagedKVCache
        return PagedKVCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
