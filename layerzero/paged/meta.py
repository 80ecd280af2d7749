"""The page metadata a `lz.PagedKVCache` layer hands to the attention call of one forward step.

A cache layer's `update` writes the new K/V into its pages, returns the page pools in place of
K/V, and puts a `PagedMeta` into the attention kwargs under `META_KEY`; LayerZero's transformers
attention pops it and calls `lz.paged_attention(q, k_pages, v_pages, meta.page_table,
meta.seq_lens, ...)`. The form is `lz.paged_attention`'s own: a (B, max_pages) page table and
(B,) lengths, both device tensors of a fixed capacity updated in place, so a decode step can be
captured in a CUDA graph; FlashInfer's CSR form (`csr`) is derived from them on the device.

No transformers import here: the attention function checks for the key without importing the
cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

META_KEY = "lz_paged"


def csr(page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int):
    """FlashInfer's paged-KV form of a page table: (indptr (B+1,), indices (nnz,), last_page_len
    (B,)), int32 on the table's device. Row b's pages are indices[indptr[b]:indptr[b+1]]; its
    last page holds last_page_len[b] keys (0 for a row with none). Selecting the used entries
    syncs with the host once (their count); FlashInfer's plan() reads indptr on the host anyway."""
    lens = seq_lens.to(torch.int32)
    pages = (lens + page_size - 1) // page_size                       # (B,)
    indptr = torch.zeros(lens.shape[0] + 1, dtype=torch.int32, device=lens.device)
    indptr[1:] = torch.cumsum(pages, 0)
    cols = torch.arange(page_table.shape[1], device=lens.device).view(1, -1)
    indices = page_table[cols < pages.view(-1, 1)].to(torch.int32)    # row-major: row by row
    last = torch.where(pages > 0, lens - (pages - 1) * page_size, torch.zeros_like(lens))
    return indptr, indices, last


@dataclass(eq=False)
class PagedMeta:
    """One forward step's pages of a group of layers (all full-attention layers, or the layers
    of one sliding window), shared by the group's layers.

    page_table (B, max_pages) int32 and seq_lens (B,) int32: `lz.paged_attention`'s arguments
    (views of the group's fixed-capacity tensors). seq_lens counts the keys a row's pages hold,
    the new tokens included; padding holds no page. A sliding-window group drops whole pages
    that left every future query's window, from the front of a row: its seq_lens then count the
    kept keys only, which leaves every query-key distance, hence causality and the window, as
    they were. `window`: the sliding window (transformers' `sliding_window`: a query sees that
    many keys, itself included) the group keeps keys for, None when it keeps every key.
    `epoch`: the group's state this metadata describes (`consume` refuses stale metadata).
    `graph`: metadata of graph mode (`PagedKVCache.reserve`): one object serves every decode step
    (page_table is then the reserved width of the table), so `consume` neither checks the epoch
    nor counts reads: traced code must not read Python state that changes per step, and a CUDA
    graph's replays run no Python at all.
    """
    page_table: torch.Tensor
    seq_lens: torch.Tensor
    page_size: int
    window: int | None
    group: object
    epoch: int
    reads: int = 0
    graph: bool = False

    def csr(self):
        """(indptr, indices, last_page_len) for FlashInfer's paged wrappers (see `csr`)."""
        return csr(self.page_table, self.seq_lens, self.page_size)

    def consume(self, sliding_window: int | None) -> None:
        """Called by the attention function that reads this metadata: refuse metadata of an
        earlier step, or of pages since freed / reordered / cropped, and an attention whose
        window is wider than the keys the group kept; count the read (the cache checks that
        every layer's update was followed by one). Graph-mode metadata: the window check only."""
        if not self.graph and self.epoch != self.group.epoch:
            raise ValueError("lz.PagedKVCache page metadata used after its pages changed (a later "
                             "step, or free / crop / reorder_cache / reset since): the pages it "
                             "names may hold other rows' keys now. Take the metadata of the "
                             "current step (the cache layer's update puts it in the attention kwargs)")
        if self.window is not None and (sliding_window is None or sliding_window > self.window):
            raise ValueError(f"attention with sliding_window={sliding_window} over a "
                             f"lz.PagedKVCache group that keeps only the last {self.window} keys "
                             f"per query (the config's sliding_window): the keys it would read "
                             f"were dropped. Build the cache from the model's own config")
        if not self.graph:
            self.reads += 1
