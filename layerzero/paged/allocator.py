"""Page bookkeeping of a paged KV cache: which pages are free, how many rows hold each page, and
each row's pages and length. Plain Python ints and lists, no tensors: the one place that decides
where a token's K/V goes, small enough to check exhaustively (tests/test_paged_cache.py drives it
with random operation sequences against a dense model of the rows).

A row is one sequence of the batch. It holds `lens[row]` tokens (its real tokens: padding holds
none); token t lives in the row's logical page t // page_size at slot t % page_size. A
sliding-window row may drop pages from its front (`drop_front`); `dropped[row]` counts them and
`rows[row]` lists the live pages only, so logical page i is rows[row][i - dropped[row]].

Pages are shared by refcount: rows with an identical prefix hold the same pages (`share`, and
`reorder` when a row is repeated, as beam search does). A shared page is never written: a row
appending into a shared, partly filled last page first gets a copy of it (copy on write:
`append` returns the (source, destination) pairs the caller copies in every layer's pool), and
`fork` gives a row copies of all its shared pages. Operations that take pages check the count
first (`need_*` + `reserve`), so a failed one changes nothing.
"""
from __future__ import annotations


def pages_for(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


class PageAllocator:
    """Pages 0..capacity-1 of one group of layers. `num_pages=None` grows the pool (at least
    doubling) when an operation needs more pages than are free; a fixed `num_pages` raises
    ValueError instead, saying how many were needed and how many are free."""

    def __init__(self, page_size: int, num_pages: int | None = None):
        self.page_size = page_size
        self.fixed = num_pages is not None
        self.capacity = 0
        self.refs: list[int] = []        # rows holding each page
        self._free: list[int] = []       # a stack: pop() takes the lowest free id
        self.rows: list[list[int]] = []  # live pages of each row, in order
        self.lens: list[int] = []        # tokens of each row (those in dropped pages included)
        self.dropped: list[int] = []     # pages dropped from each row's front
        if num_pages:
            self._grow(num_pages)

    # ---- pages ------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free)

    def _grow(self, n: int) -> None:
        start, self.capacity = self.capacity, self.capacity + n
        self.refs += [0] * n
        self._free = list(range(self.capacity - 1, start - 1, -1)) + self._free

    def reserve(self, need: int, what: str = "this step") -> None:
        """Make sure `need` pages are free: grow the pool, or raise when its size is fixed."""
        if need <= len(self._free):
            return
        if self.fixed:
            raise ValueError(f"lz.PagedKVCache is out of pages: {what} needs {need} pages of "
                             f"{self.page_size} tokens and {len(self._free)} of {self.capacity} are "
                             f"free. Pass a larger num_pages=, free finished rows (cache.free(rows)) "
                             f"or reset() the cache")
        self._grow(max(need - len(self._free), self.capacity))

    def _take(self) -> int:
        page = self._free.pop()
        self.refs[page] = 1
        return page

    def _decref(self, page: int) -> None:
        if self.refs[page] <= 0:
            raise RuntimeError(f"page {page} released more often than it was taken (a bug in "
                               f"layerzero.paged; please report it)")
        self.refs[page] -= 1
        if self.refs[page] == 0:
            self._free.append(page)

    # ---- rows -------------------------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    def set_rows(self, n: int) -> None:
        """Start a batch of `n` empty rows; the current rows must hold nothing."""
        if any(self.rows):
            raise ValueError(f"the cache holds pages of {self.num_rows} rows; free or reset them "
                             f"before starting a batch of {n}")
        self.rows = [[] for _ in range(n)]
        self.lens, self.dropped = [0] * n, [0] * n

    def _row(self, row: int) -> int:
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < self.num_rows:
            raise ValueError(f"row {row!r} is not a row of the cache; allowed: 0..{self.num_rows - 1}")
        return row

    def need_append(self, row: int, n: int) -> int:
        """Pages `append(row, n)` takes from the free list (new pages, plus a copy on write)."""
        if n <= 0:
            return 0
        length = self.lens[row]
        new = pages_for(length + n, self.page_size) - pages_for(length, self.page_size)
        cow = int(length % self.page_size != 0 and self.refs[self.rows[row][-1]] > 1)
        return new + cow

    def append(self, row: int, n: int) -> list[tuple[int, int]]:
        """Room for `n` more tokens of `row`; returns the (source, destination) page copies to
        make first (a shared, partly filled last page is copied before it is written)."""
        row = self._row(row)
        self.reserve(self.need_append(row, n), f"appending {n} tokens to row {row}")
        copies = []
        if n <= 0:
            return copies
        length, pages = self.lens[row], self.rows[row]
        if length % self.page_size and self.refs[pages[-1]] > 1:
            old, new = pages[-1], self._take()
            copies.append((old, new))
            self._decref(old)
            pages[-1] = new
        for _ in range(pages_for(length + n, self.page_size) - pages_for(length, self.page_size)):
            pages.append(self._take())
        self.lens[row] = length + n
        return copies

    def share(self, row: int, src: int, n_pages: int, n_tokens: int) -> None:
        """Empty `row` takes the first `n_pages` pages of `src` (which dropped none), holding
        `n_tokens` tokens in them: the rows' first n_tokens tokens are identical."""
        row, src = self._row(row), self._row(src)
        if self.rows[row] or self.lens[row]:
            raise ValueError(f"row {row} already holds tokens; only an empty row can share pages")
        if self.dropped[src] or n_pages > len(self.rows[src]) or n_tokens > self.lens[src]:
            raise ValueError(f"row {src} does not hold {n_pages} pages / {n_tokens} tokens from its start")
        if pages_for(n_tokens, self.page_size) != n_pages:
            raise ValueError(f"{n_tokens} tokens fill {pages_for(n_tokens, self.page_size)} pages, not {n_pages}")
        self.rows[row] = self.rows[src][:n_pages]
        for page in self.rows[row]:
            self.refs[page] += 1
        self.lens[row] = n_tokens

    def need_fork(self, row: int) -> int:
        return sum(self.refs[p] > 1 for p in self.rows[row])

    def fork(self, row: int) -> list[tuple[int, int]]:
        """Give `row` its own copy of every page it shares; returns the copies to make."""
        row = self._row(row)
        self.reserve(self.need_fork(row), f"un-sharing row {row}")
        copies = []
        pages = self.rows[row]
        for i, page in enumerate(pages):
            if self.refs[page] > 1:
                pages[i] = self._take()
                copies.append((page, pages[i]))
                self._decref(page)
        return copies

    def drop_front(self, row: int, keep_from: int) -> int:
        """Release `row`'s pages whose tokens all lie before token `keep_from` (a sliding
        window no future query reaches); returns how many were dropped."""
        row = self._row(row)
        n = max(0, min(keep_from, self.lens[row]) // self.page_size - self.dropped[row])
        for page in self.rows[row][:n]:
            self._decref(page)
        del self.rows[row][:n]
        self.dropped[row] += n
        return n

    def crop(self, row: int, length: int) -> None:
        """Keep `row`'s first `length` tokens (no more than it holds)."""
        row = self._row(row)
        length = min(length, self.lens[row])
        if length < self.dropped[row] * self.page_size:
            raise ValueError(f"row {row} dropped its first {self.dropped[row] * self.page_size} "
                             f"tokens (they left the sliding window); it cannot be cropped to {length}")
        keep = pages_for(length, self.page_size) - self.dropped[row]
        for page in self.rows[row][keep:]:
            self._decref(page)
        del self.rows[row][keep:]
        self.lens[row] = length

    def release(self, row: int) -> None:
        """Free `row`'s pages (those other rows share stay theirs); the row is empty after."""
        row = self._row(row)
        for page in self.rows[row]:
            self._decref(page)
        self.rows[row], self.lens[row], self.dropped[row] = [], 0, 0

    def reorder(self, index: list[int]) -> None:
        """Row i becomes the old row index[i] (rows may repeat: they share its pages)."""
        index = [self._row(i) for i in index]
        new = [list(self.rows[i]) for i in index]
        for pages in new:
            for page in pages:
                self.refs[page] += 1
        for pages in self.rows:
            for page in pages:
                self._decref(page)
        self.rows = new
        self.lens = [self.lens[i] for i in index]
        self.dropped = [self.dropped[i] for i in index]

    def reset(self) -> None:
        for row in range(self.num_rows):
            self.release(row)
        self.rows, self.lens, self.dropped = [], [], []

    # ---- checking ---------------------------------------------------------------------------

    def page_of(self, row: int, token: int) -> tuple[int, int]:
        """(page, slot) of `row`'s token `token` (one it holds, in a live page)."""
        i = token // self.page_size - self.dropped[row]
        if not 0 <= token < self.lens[row] or i < 0:
            raise ValueError(f"row {row} holds no live token {token}")
        return self.rows[row][i], token % self.page_size

    def check(self) -> None:
        """Raise AssertionError unless the bookkeeping is consistent: each page's refcount is
        the number of rows holding it, the free pages are exactly those no row holds, and each
        row holds as many live pages as its length needs."""
        held = [0] * self.capacity
        for row, pages in enumerate(self.rows):
            assert len(set(pages)) == len(pages), f"row {row} holds a page twice: {pages}"
            want = pages_for(self.lens[row], self.page_size) - self.dropped[row]
            assert len(pages) == want, f"row {row}: {len(pages)} live pages for {self.lens[row]} tokens"
            for page in pages:
                held[page] += 1
        assert held == self.refs, "refcounts differ from the rows holding each page"
        assert sorted(self._free) == [p for p in range(self.capacity) if held[p] == 0], "free list"
