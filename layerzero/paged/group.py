"""The pages of one group of layers of a `lz.PagedKVCache`: all its full-attention layers, or the
layers of one sliding window. They share the page bookkeeping (a `PageAllocator`), the device page
table and lengths, and the plan of each forward step; each layer has its own page pools.

A forward step begins at the first layer of the group that a forward updates (`begin`): the rows'
new real tokens are read off the position ids (padding holds no page), pages are allocated, rows
whose prompt starts like an earlier row's share its pages, and the write plan (token -> page slot)
is built once for the step. Every layer's update then writes its K/V by that plan (`write`).

In graph mode (`graph.py`) none of this runs: pages were reserved ahead and updates write at the
device lengths.

Padding. generate() left-pads a batch and gives each row position ids counting its real tokens
only: 0, 1, ..., n-1 after the padding (whose positions it sets to 0), then n, n+1, ... per step.
So row b's real new tokens in a step of Sq tokens are the last n = position_ids[b, -1] + 1 -
lens[b] of them, and their positions must read lens[b], ..., lens[b] + n - 1; anything else
(right padding, padding in a row that already holds tokens, a freed row continuing, 3-D mRoPE
positions) raises instead of guessing. A row whose prompt is all padding cannot be told from a
one-token row by its positions: generate() never makes one.
"""
from __future__ import annotations

import torch

from .allocator import PageAllocator, pages_for
from .meta import PagedMeta

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """t's bit patterns (for bitwise comparison: -0.0 differs from 0.0, a NaN equals itself)."""
    return t.view(_BITS[t.element_size()])


def _prefix_match(ks, vs, b: int, a: int, sb: int, sa: int, n: int) -> int:
    """How many leading tokens of rows b and a (starting at sb / sa in the step's K/V, n at most)
    are bitwise identical in both K and V."""
    same = (_bits(ks[b, :, sb:sb + n]) == _bits(ks[a, :, sa:sa + n])).all(-1).all(0)   # (n,)
    same &= (_bits(vs[b, :, sb:sb + n]) == _bits(vs[a, :, sa:sa + n])).all(-1).all(0)
    return int(same.to(torch.int32).cumprod(0).sum())


class PageGroup:
    """See the module docstring. `window`: transformers' sliding_window of the group's layers (a
    query sees that many keys, itself included), None for full attention."""

    def __init__(self, page_size: int, num_pages: int | None, window: int | None, width: int | None,
                 max_rows: int | None, config):
        self.alloc = PageAllocator(page_size, num_pages)
        self.page_size, self.window, self.config = page_size, window, config
        self.width, self.max_rows = width, max_rows    # page-table capacity (None: grows)
        self.layers: list = []       # its PagedLayers, in model order
        self.length = 0              # the batch's padded length (transformers' get_seq_length)
        self.step = 0                # forward steps begun
        self.writes = 0              # layer updates in the current step
        self.epoch = 0               # bumped whenever pages change hands (PagedMeta.consume)
        self.meta: PagedMeta | None = None
        self.table: torch.Tensor | None = None    # (rows, width) int32, -1 = no page
        self.seq_lens: torch.Tensor | None = None  # (rows,) int32: keys in live pages
        self._written: list[list[int]] = []        # what each row of `table` holds
        self._plan = None            # (dst, src_b, src_s) LongTensors of this step's writes
        self._verify: list = []      # [(row, src_row, tokens, start, src_start)] still shared
        self._planner = None         # the layer that planned the step (it matched the rows)
        # graph mode (`graph.py`): pages reserved ahead, updates are device work only
        self.graph = False
        self.cap: torch.Tensor | None = None       # (rows,) int32: keys each row's pages can take
        self.graph_length = 0        # what get_seq_length / get_mask_sizes say in graph mode
        self.graph_base = None       # (each row's tokens, the padded length) when pages were reserved
        self.dense_first = False     # a batch's first forward attends its own K/V densely (cache.py)
        self.dense = False           # ... and this step is such a forward

    # ---- one forward step ---------------------------------------------------------------------

    def begin(self, layer, ks: torch.Tensor, vs: torch.Tensor, kwargs: dict) -> None:
        """Plan a forward step from its first layer's K/V (B, Hkv, Sq, D) and attention kwargs."""
        self._check_previous_step()
        b, _, sq, _ = ks.shape
        alloc = self.alloc
        fresh_batch = self.length == 0 and not any(alloc.lens)
        if not fresh_batch and b != alloc.num_rows:
            raise ValueError(f"lz.PagedKVCache holds {alloc.num_rows} rows; this forward has {b}. "
                             f"Call cache.reset() before a new batch")
        if fresh_batch and self.max_rows is not None and b > self.max_rows:
            raise ValueError(f"batch of {b} rows; this lz.PagedKVCache was built for "
                             f"max_batch_size={self.max_rows}")
        lens = [0] * b if fresh_batch else list(alloc.lens)
        n = self._new_tokens(kwargs, b, sq, lens, ks.device)
        # -- checks done: from here on, state changes --
        if fresh_batch:
            alloc.set_rows(b)
        self.dense = fresh_batch and self.dense_first
        shares = self._find_shares(ks, vs, n, lens, sq)
        need = sum(pages_for(n[r], self.page_size) - shares[r][1] if r in shares
                   else alloc.need_append(r, n[r]) for r in range(b))
        alloc.reserve(need)             # raises before anything changes when pages are short
        if self.window is not None:     # keep the keys this step's queries (and later) can see
            for row in range(b):
                alloc.drop_front(row, lens[row] - self.window + 1)
        copies = []
        for row in range(b):
            if row not in shares:
                copies += alloc.append(row, n[row])
        for row, (src, n_pages, n_tokens) in shares.items():
            alloc.share(row, src, n_pages, n_tokens)
            alloc.append(row, n[row] - n_tokens)
        self.length += sq
        self.step += 1
        self.writes = 0
        self.epoch += 1
        self._copy(copies)
        self._verify = [(r, src, t, sq - n[r], sq - n[src]) for r, (src, _, t) in shares.items()]
        self._planner = layer
        self._step_rows = (lens, n, sq, {r: t for r, (_, _, t) in shares.items()})
        self._make_plan(ks.device)
        self._sync(ks.device)
        self.meta = PagedMeta(self.table[:b], self.seq_lens[:b], self.page_size, self.window, self,
                              self.epoch)

    def _check_previous_step(self) -> None:
        """Every layer of the group was updated in the previous step, and every update was
        followed by an attention call that read the page metadata."""
        if self.step == 0:
            return
        if self.writes != len(self.layers):
            raise ValueError(f"the previous forward updated {self.writes} of the {len(self.layers)} "
                             f"layers of this lz.PagedKVCache group (it stopped midway, or the model "
                             f"skips layers): call cache.reset() and run the prompt again")
        self.check_read()

    def check_read(self) -> None:
        """Raise unless each update of this step was followed by LayerZero's attention reading
        the metadata: another attention would have read the pages as if they were K/V."""
        if self.meta is not None and not self.dense and self.meta.reads != self.writes:
            impl = getattr(self.config, "_attn_implementation", None)
            raise ValueError(f"the attention that ran after a lz.PagedKVCache update did not read its "
                             f"page metadata: the model's attention is not LayerZero's "
                             f"(attn_implementation={impl!r}), so it received pages in place of "
                             f"K/V. Build the model with attn_implementation=\"layerzero\" or call "
                             f"lz.patch(model), or use transformers' DynamicCache")

    def _new_tokens(self, kwargs: dict, b: int, sq: int, lens: list[int], device) -> list[int]:
        """Each row's real new tokens, from the position ids (module docstring); raises if they
        don't describe left padding of the rows the cache holds."""
        pos = kwargs.get("position_ids")
        if pos is None:
            raise ValueError("lz.PagedKVCache reads each row's real tokens off the position_ids "
                             "among the attention kwargs, and this model's attention got none: "
                             "the cache cannot tell padding from tokens (pass position_ids to the "
                             "model, as generate() does)")
        if not isinstance(pos, torch.Tensor) or pos.dim() != 2 or pos.shape[1] != sq or pos.shape[0] not in (1, b):
            shape = tuple(pos.shape) if isinstance(pos, torch.Tensor) else type(pos).__name__
            raise ValueError(f"position_ids has shape {shape}; lz.PagedKVCache takes (B, Sq) = "
                             f"({b}, {sq}) or (1, {sq}) (not 3-D multimodal positions)")
        pos = pos.to(device=device, dtype=torch.long).expand(b, sq)
        held = torch.tensor(lens, dtype=torch.long, device=device)
        n = pos[:, -1] + 1 - held                                       # (B,)
        col = torch.arange(sq, device=device).view(1, sq)
        first = (sq - n).view(b, 1)                                     # first real column
        want = held.view(b, 1) + col - first
        ok = ((pos == want) | (col < first)).all(1) & (n >= 0) & (n <= sq)
        n_list, ok_list = torch.stack([n, ok.long()]).tolist()
        for row in range(b):
            if not ok_list[row]:
                raise ValueError(f"position_ids[{row}] = {pos[row].tolist()} do not continue row {row}, "
                                 f"which holds {lens[row]} tokens: lz.PagedKVCache expects its "
                                 f"positions {lens[row]}, {lens[row] + 1}, ... after any left padding "
                                 f"(a freed row cannot continue; right padding is not supported)")
            if n_list[row] < sq and lens[row]:
                raise ValueError(f"row {row} gets {sq - n_list[row]} padding tokens after its first "
                                 f"{lens[row]} tokens: lz.PagedKVCache keeps no padding and takes "
                                 f"left padding only in a row's first forward")
        return n_list

    def _find_shares(self, ks, vs, n, lens, sq) -> dict:
        """Rows starting this step (empty before) whose first tokens' K and V are bitwise those of
        an earlier such row: {row: (src, pages, tokens)}, sharing whole pages, and the last partly
        filled one when all the row's tokens match. Sources are rows that share nothing, so each
        shared page is written by its one source row. Checked again at every layer (`write`)."""
        fresh = [r for r in range(len(n)) if lens[r] == 0 and n[r] > 0]
        if len(fresh) < 2:
            return {}
        # candidates first: rows whose first token's K bits agree (one sync, not one per pair)
        first = torch.stack([_bits(ks[r, :, sq - n[r]]).flatten() for r in fresh])   # (F, Hkv*D)
        kind = dict(zip(fresh, torch.unique(first, dim=0, return_inverse=True)[1].tolist()))
        shares, roots = {}, []
        for row in fresh:
            best = None
            for src in (r for r in roots if kind[r] == kind[row]):
                k = _prefix_match(ks, vs, row, src, sq - n[row], sq - n[src], min(n[row], n[src]))
                pages = k // self.page_size + (1 if k == n[row] and k % self.page_size else 0)
                if pages and (best is None or pages > best[1]):
                    best = (src, pages, min(pages * self.page_size, n[row]))
            if best is None:
                roots.append(row)
            else:
                shares[row] = best
        return shares

    def _make_plan(self, device) -> None:
        """The step's writes: destination slot (page * page_size + slot) and source (row, column
        of the step's K/V) of every new token a row writes (not those in pages it borrowed)."""
        lens, n, sq, skip = self._step_rows
        p, dst, src_b, src_s = self.page_size, [], [], []
        for row in range(len(n)):
            start = skip.get(row, 0)
            if n[row] <= start:
                continue
            tok = torch.arange(lens[row] + start, lens[row] + n[row])
            pages = torch.tensor(self.alloc.rows[row], dtype=torch.long)
            dst.append(pages[tok // p - self.alloc.dropped[row]] * p + tok % p)
            src_b.append(torch.full_like(tok, row))
            src_s.append(tok - lens[row] + sq - n[row])
        if not dst:
            none = torch.zeros(0, dtype=torch.long, device=device)
            self._plan = (none, none, none)
            return
        self._plan = tuple(torch.cat(xs).to(device) for xs in (dst, src_b, src_s))

    def write(self, layer, ks: torch.Tensor, vs: torch.Tensor) -> None:
        """Write this step's new K/V (B, Hkv, Sq, D) into `layer`'s pools; first un-share rows
        whose K/V at this layer differ from their source row's (`fork`: they get copies of the
        pages, whose contents so far were identical)."""
        if self._verify and layer is not self._planner:
            for item in list(self._verify):
                row, src, t, s, s_src = item
                if _prefix_match(ks, vs, row, src, s, s_src, t) < t:
                    self.alloc.reserve(self.alloc.need_fork(row), f"un-sharing row {row}")
                    self._copy(self.alloc.fork(row))
                    self._verify.remove(item)
                    self._step_rows[3].pop(row)
                    self._make_plan(ks.device)
                    self._sync(ks.device)
        dst, rows, cols = self._plan
        if dst.numel():     # pools (pages, page_size, Hkv, D) as (slots, Hkv, D); sources (N, Hkv, D)
            layer.keys.view(-1, *layer.keys.shape[2:]).index_copy_(0, dst, ks[rows, :, cols])
            layer.values.view(-1, *layer.values.shape[2:]).index_copy_(0, dst, vs[rows, :, cols])
        self.writes += 1

    # ---- pools and the device table ------------------------------------------------------------

    def grow_pools(self) -> None:
        """Every initialised layer's pools hold `alloc.capacity` pages (new pages are zeros)."""
        for layer in self.layers:
            if layer.is_initialized and layer.keys.shape[0] < self.alloc.capacity:
                extra = self.alloc.capacity - layer.keys.shape[0]
                layer.keys = torch.cat([layer.keys, layer.keys.new_zeros(extra, *layer.keys.shape[1:])])
                layer.values = torch.cat([layer.values, layer.values.new_zeros(extra, *layer.values.shape[1:])])

    def _copy(self, copies: list[tuple[int, int]]) -> None:
        """Copy pages (source -> destination) in every initialised layer's pools."""
        self.grow_pools()
        if not copies:
            return
        for layer in self.layers:
            if layer.is_initialized:
                src = torch.tensor([s for s, _ in copies], device=layer.keys.device)
                dst = torch.tensor([d for _, d in copies], device=layer.keys.device)
                layer.keys.index_copy_(0, dst, layer.keys[src])
                layer.values.index_copy_(0, dst, layer.values[src])

    def _sync(self, device) -> None:
        """Bring the device page table and lengths up to the bookkeeping, in place where their
        capacity allows (rows: max_batch_size, else grown; width: the config's positions in
        pages, else grown; growing reallocates, at least doubling)."""
        alloc = self.alloc
        rows, widest = alloc.num_rows, max((len(r) for r in alloc.rows), default=0)
        old_rows, old_width = self.table.shape if self.table is not None else (0, 0)
        if rows > old_rows or widest > old_width:
            rows = max(rows, self.max_rows or 0, 2 * old_rows if rows > old_rows else old_rows, 1)
            width = max(widest, self.width or 0, 2 * old_width if widest > old_width else old_width, 1)
            self.table = torch.full((rows, width), -1, dtype=torch.int32, device=device)
            self.seq_lens = torch.zeros(rows, dtype=torch.int32, device=device)
            self.cap = torch.zeros(rows, dtype=torch.int32, device=device)
            self._written = [[] for _ in range(rows)]
        for row, old in enumerate(self._written):
            live = alloc.rows[row] if row < alloc.num_rows else []
            if live == old:
                continue
            same = 0
            while same < min(len(live), len(old)) and live[same] == old[same]:
                same += 1
            if len(live) > same:
                self.table[row, same:len(live)] = torch.tensor(live[same:], dtype=torch.int32)
            if len(old) > len(live):
                self.table[row, len(live):len(old)] = -1
            self._written[row] = list(live)
        kept = [alloc.lens[r] - alloc.dropped[r] * self.page_size for r in range(alloc.num_rows)]
        self.seq_lens.zero_()
        if kept:
            self.seq_lens[:len(kept)] = torch.tensor(kept, dtype=torch.int32)

    # ---- changes between steps -----------------------------------------------------------------

    def changed(self) -> None:
        """Pages changed hands outside a step: metadata handed out so far is stale."""
        self.epoch += 1
        self.meta = None
        if self.table is not None:
            self._sync(self.table.device)

    def crop(self, length: int) -> None:
        """Keep the first `length` positions of the padded batch (rows lose their last tokens;
        their padding is at their start)."""
        removed = self.length - length
        if removed <= 0:
            return
        alloc = self.alloc
        for row in range(alloc.num_rows):
            keep = max(0, alloc.lens[row] - removed)
            if self.window is not None and alloc.dropped[row] * self.page_size > max(0, keep - self.window + 1):
                raise ValueError(f"cannot crop {removed} tokens: row {row} of a sliding-window group "
                                 f"(window {self.window}) already dropped the keys its next query "
                                 f"would see. A sliding-window lz.PagedKVCache can take back only "
                                 f"the tokens of its last forward")
        for row in range(alloc.num_rows):
            alloc.crop(row, max(0, alloc.lens[row] - removed))
        self.length = length
        self.changed()

    def reorder(self, index: list[int]) -> None:
        if self.max_rows is not None and len(index) > self.max_rows:
            raise ValueError(f"{len(index)} rows; this lz.PagedKVCache was built for "
                             f"max_batch_size={self.max_rows}")
        self.alloc.reorder(index)
        self.changed()

    def free(self, rows: list[int]) -> None:
        """Release the rows' pages; the rows stay, empty. When no row holds a token any more the
        batch is over: the padded length goes back to 0, ready for a new batch."""
        for row in rows:
            self.alloc.release(row)
        if not any(self.alloc.lens):
            self.length = 0
        self.changed()

    def reset(self) -> None:
        self.alloc.reset()
        self.graph, self.graph_base, self.dense = False, None, False
        self.length = self.step = self.writes = 0
        for layer in self.layers:
            layer.steps = 0
        self._verify, self._plan, self._planner = [], None, None
        self.changed()
