"""Graph mode of a page group: pages reserved ahead, so that a decode step's cache updates are
device work only and the step can be compiled with fullgraph=True and captured in a CUDA graph.

A normal step plans its page writes on the host (`PageGroup.begin`: real tokens read off the
position ids, pages taken as tokens arrive), a host sync per forward that no graph can hold.
`enter` (through `PagedKVCache.reserve`, after the prompt's forward) instead gives every row the
pages for all its future tokens at once and writes them into the device page table. From then on
the write slot of row b is read off the device: token t = seq_lens[b] goes to page
page_table[b, t // page_size], slot t % page_size (a row's kept keys start at a page boundary, so
this holds for sliding-window groups too, which drop no more pages in graph mode). The group's
first layer advances seq_lens by the step's tokens, once per step: whether a layer is the first
is an object-identity test, a constant when traced. Every row takes every token of a graph-mode
forward (no padding: the loop feeds finished rows pad tokens, written into their reserved pages,
harmless).

What traced code reads, besides device tensors: the group's `graph` flag, its page size, its
first layer, `graph_length` (what get_seq_length / get_mask_sizes answer in graph mode, fixed at
`enter`: transformers sizes its mask with it, so it must not change per step or dynamo would
recompile per token) and the graph-mode `PagedMeta`, one object for every step.

Writes are clamped to each row's reserved capacity (`cap`): a real decode never reaches it (the
last new token is never fed back), but warm-up runs of a step before its CUDA-graph capture may
(the loop puts seq_lens back afterwards), and must not write outside the row's pages.
"""
from __future__ import annotations

import torch

from .allocator import pages_for
from .meta import PagedMeta


def drop_unseen(group) -> None:
    """Release sliding-window pages the next query no longer sees (an eager step would, at its
    start; graph mode drops none later, so it does so once here)."""
    if group.window is not None:
        for row in range(group.alloc.num_rows):
            group.alloc.drop_front(row, group.alloc.lens[row] - group.window + 1)


def need(group, new_tokens: int) -> int:
    """Pages the reservation of `new_tokens` more tokens per row takes from the free list."""
    return sum(group.alloc.need_append(row, new_tokens) for row in range(group.alloc.num_rows))


def enter(group, new_tokens: int, length: int, device) -> None:
    """Reserve `new_tokens` more tokens of every row (pages checked free by the caller), write
    the page table, and switch `group` to graph mode. `length` (>= the padded length plus
    new_tokens) is what get_seq_length answers until `leave`; the metadata's page table is
    ceil(length / page_size) wide (at most the table's width), so its shape is fixed by it."""
    alloc, p = group.alloc, group.page_size
    group._check_previous_step()
    base = list(alloc.lens)
    copies = []
    for row in range(alloc.num_rows):
        copies += alloc.append(row, new_tokens)   # a shared, partly filled last page is copied
    group._copy(copies)                          # (also grows the pools to the pages reserved)
    group._sync(device)                          # page table; seq_lens = the reserved lengths
    rows = alloc.num_rows
    kept = [base[r] - alloc.dropped[r] * p for r in range(rows)]
    group.cap.zero_()
    group.cap[:rows] = group.seq_lens[:rows]
    group.seq_lens[:rows] = torch.tensor(kept, dtype=torch.int32)
    width = min(group.table.shape[1], pages_for(length, p))
    group.graph, group.graph_length, group.graph_base = True, length, (base, group.length)
    group.epoch += 1
    group.meta = PagedMeta(group.table[:rows, :width], group.seq_lens[:rows], p, group.window, group,
                           group.epoch, graph=True)


def write(group, layer, ks: torch.Tensor, vs: torch.Tensor) -> None:
    """Write a graph-mode step's K/V (B, Hkv, Sq, D) into `layer`'s pools at each row's slots."""
    b, h, sq, d = ks.shape
    rows = group.meta.seq_lens.shape[0]
    if b != rows:
        raise ValueError(f"a forward of {b} rows over a lz.PagedKVCache whose pages are reserved for "
                         f"{rows} rows (graph mode): call cache.reset() before another batch")
    p = group.page_size
    lens, cap = group.seq_lens[:b], group.cap[:b]
    if layer is group.layers[0]:                  # once per step: the group's first layer
        lens.copy_(torch.minimum(lens + sq, cap))
    t = lens.view(b, 1) - sq + torch.arange(sq, device=lens.device, dtype=lens.dtype).view(1, sq)
    t = torch.minimum(t.clamp(min=0), cap.view(b, 1) - 1)                        # (B, Sq)
    page = group.table[:b].gather(1, (t // p).long()).long()
    dst = (page * p + t % p).flatten()                                            # (B * Sq,)
    layer.keys.view(-1, h, d).index_copy_(0, dst, ks.transpose(1, 2).reshape(b * sq, h, d))
    hv, dv = vs.shape[1], vs.shape[3]
    layer.values.view(-1, hv, dv).index_copy_(0, dst, vs.transpose(1, 2).reshape(b * sq, hv, dv))


def leave(group, fed: int) -> None:
    """Leave graph mode: each row holds `fed` tokens more than when its pages were reserved;
    pages reserved past them are released (as if the tokens had come through eager steps)."""
    base, length = group.graph_base
    for row, n in enumerate(base):
        group.alloc.crop(row, n + fed)
    group.length = length + fed
    group.graph, group.graph_base = False, None
    group.changed()
