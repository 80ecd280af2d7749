"""`lz.PagedKVCache`: a transformers `Cache` keeping K/V in pages, for `generate(cache=...)` (or
`past_key_values=`) on a model whose attention is LayerZero's (`attn_implementation="layerzero"`
or `lz.patch(model)`).

Pages are taken per row as its tokens arrive (none for padding) and released when the cache is
told (`free(rows)`, `reset()`; generate() keeps every row to the end), or, in sliding-window
layers, once they left every future query's window. Rows whose prompts start alike (generate's
`num_return_sequences`, beam search) share pages, copied on write (`group.py`, `allocator.py`).

Each layer's `update` writes the new K/V into its pages and returns the page pools (pages,
page_size, Hkv, D) in place of K/V, with the page metadata (`meta.PagedMeta`) put into the
attention kwargs under "lz_paged": LayerZero's attention then runs `lz.paged_attention`. Any
other attention would read the pools as K/V, so the cache refuses it: at each step when the
config names another attention, and when an update was not followed by an attention reading the
metadata (a forward raises ValueError at its next update).

Graph mode (`reserve`, `graph.py`): after the prompt's forward, every row's pages for all its
future tokens are taken at once and each layer's `update` becomes device work only (the write
slot comes from the device lengths), so a decode step through the cache can be compiled with
fullgraph=True and captured in a CUDA graph; lz.generate runs its decode steps so.

transformers' 4-D attention mask is still built (from `get_mask_sizes`, as for a DynamicCache) but
not read: the metadata says the same (causal, each row's real keys; the window comes with the
attention call), and the mask's key axis (the padded batch) is not the pages'.
"""
from __future__ import annotations

import contextlib
import sys

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DummyLayer, get_layer_types_and_kwargs

from . import graph
from .group import PageGroup
from .meta import META_KEY


def _attention_kwargs(args: tuple, kwargs: dict) -> dict:
    """The attention kwargs dict a model passed to `cache.update` (`kwargs=kwargs`, as most
    transformers models do, or positionally)."""
    found = kwargs.get("kwargs", args[0] if args else None)
    if not isinstance(found, dict) or "position_ids" not in found:
        raise ValueError("this model calls cache.update without its attention kwargs (position_ids "
                         "among them): lz.PagedKVCache needs them to tell padding from tokens and to "
                         "hand the page metadata to the attention. Use transformers' DynamicCache "
                         "with this model")
    return found


def _calling_attention(frame) -> str | None:
    """The attention implementation of the module whose forward called `cache.update` (the
    config transformers picks the attention function by), found among the few frames above
    the update (Cache.update, the attention forward); None when no module is there (a direct
    call) or its config names none."""
    for _ in range(4):
        if frame is None:
            return None
        me = frame.f_locals.get("self")
        if isinstance(me, torch.nn.Module):
            impl = getattr(getattr(me, "config", None), "_attn_implementation", None)
            return impl if isinstance(impl, str) else None
        frame = frame.f_back
    return None


def _refuse_other_attention(impl: str | None, where: str) -> None:
    if impl is not None and impl != "layerzero":
        raise ValueError(f"lz.PagedKVCache with attn_implementation={impl!r} ({where}): that attention "
                         f"would receive the cache's pages in place of K/V. Build the model with "
                         f"attn_implementation=\"layerzero\" or call lz.patch(model), or use "
                         f"transformers' DynamicCache")


class PagedLayer(CacheLayerMixin):
    """One decoder layer's pages: `keys` / `values` are its pools, (pages, page_size, Hkv, D),
    created at the first update with the update's dtype and device. Bookkeeping is its group's."""

    is_compileable = False
    is_croppable = True
    supports_early_init = False     # pools come with the first update (their shape is the model's)

    def __init__(self, group: PageGroup, dtype: torch.dtype | None, device: torch.device | None):
        super().__init__()
        self.group, self.dtype, self.want_device = group, dtype, device
        self.is_sliding = group.window is not None
        if self.is_sliding:
            self.sliding_window = group.window
        self.steps = 0               # steps of the group this layer took part in
        group.layers.append(self)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        n = self.group.alloc.capacity
        _, h, _, d = key_states.shape
        self.keys = key_states.new_zeros(n, self.group.page_size, h, d)
        self.values = value_states.new_zeros(n, self.group.page_size, value_states.shape[1],
                                             value_states.shape[3])
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _check(self, key_states: torch.Tensor) -> None:
        """The keys are of the dtype, device and heads the pools are (or were asked to be)."""
        if self.is_initialized:
            if (key_states.dtype, key_states.device, key_states.shape[1], key_states.shape[3]) != (
                    self.keys.dtype, self.keys.device, self.keys.shape[2], self.keys.shape[3]):
                raise ValueError(f"keys of {key_states.dtype} on {key_states.device}, shape "
                                 f"{tuple(key_states.shape)}, for pages of {self.keys.dtype} on "
                                 f"{self.keys.device} with {self.keys.shape[2]} heads of "
                                 f"{self.keys.shape[3]}: one lz.PagedKVCache serves one model")
            return
        for name, want, got in (("dtype", self.dtype, key_states.dtype),
                                ("device", self.want_device, key_states.device)):
            if want is not None and want != got:
                raise ValueError(f"lz.PagedKVCache({name}={want}) but the model's keys are {got}: pass "
                                 f"{name}=None (the model's) or build the model with {name}={want}")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write K/V (B, Hkv, Sq, D) into the pages; return the pools, the metadata in kwargs.
        In graph mode (`PagedKVCache.reserve`) device work only: no host reads, no checks that
        read per-step Python state (see `graph.py`)."""
        attn_kwargs = _attention_kwargs(args, kwargs)
        group = self.group
        if group.graph:
            graph.write(group, self, key_states, value_states)
            attn_kwargs[META_KEY] = group.meta
            return self.keys, self.values
        impl = _calling_attention(sys._getframe(1))
        if impl is not None:
            _refuse_other_attention(impl, "the model's")
        elif self.steps == group.step:
            _refuse_other_attention(getattr(group.config, "_attn_implementation", None),
                                    "the config the cache was built from")
        self._check(key_states)
        if self.steps == group.step:
            group.begin(self, key_states, value_states, attn_kwargs)
        elif self.steps == group.step - 1:
            group.check_read()
        else:
            raise ValueError(f"a layer of this lz.PagedKVCache missed {group.step - self.steps - 1} "
                             f"forward steps (a forward stopped midway?): call cache.reset()")
        self.steps = group.step
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        group.grow_pools()
        group.write(self, key_states, value_states)
        if group.dense:             # a batch's first forward under `dense_prefill`: its own K/V
            return key_states, value_states
        attn_kwargs[META_KEY] = group.meta
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.group.graph:       # a constant while traced (the mask is not read: see the module)
            return self.group.graph_length, 0
        return self.group.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.group.graph_length if self.group.graph else self.group.length

    def get_max_length(self) -> int:
        return -1

    def _whole_cache(self, *args, **kwargs):
        raise TypeError("lz.PagedKVCache layers share their pages with the other layers of their "
                        "group: call crop / reset / reorder_cache / batch_* on the cache, not a layer")

    crop = reset = reorder_cache = batch_repeat_interleave = batch_select_indices = _whole_cache
    offload = prefetch = _whole_cache


def _positive(name: str, x, allow_none: bool = True):
    if x is None and allow_none:
        return None
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, got {type(x).__name__}")
    if x < 1:
        raise ValueError(f"{name}={x}; allowed: >= 1")
    return x


class PagedKVCache(Cache):
    """A transformers Cache keeping K/V in pages (see the module docstring).

    config: the model's config (`model.config`; its decoder's layer types, sliding windows,
    max_position_embeddings and attention implementation are read). page_size: tokens per
    page. num_pages: pages of each layer's pool (its group's: full-attention layers form one
    group, each sliding window another), fixed: a step needing more raises, saying how many were
    needed and how many are free (a fixed capacity is what a CUDA-graphed decode step needs);
    None: pools grow, at least doubling, reallocated. max_batch_size: rows of the page table,
    fixed (None: the first batch's, grown as needed). dtype / device: the pools', checked
    against the model's keys (None: the model's). Pools are allocated at the first forward.

    get_seq_length() is the batch's padded length, as generate() counts; `free(rows)` releases
    finished rows' pages, `reset()` everything (pools are kept).
    """

    def __init__(self, config, *, page_size: int = 16, num_pages: int | None = None,
                 max_batch_size: int | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        page_size = _positive("page_size", page_size, allow_none=False)
        num_pages = _positive("num_pages", num_pages)
        max_batch_size = _positive("max_batch_size", max_batch_size)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError, ValueError):
                raise ValueError(f"device={device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
        if not callable(getattr(config, "get_text_config", None)):
            raise TypeError(f"config must be a transformers PreTrainedConfig (model.config), got "
                            f"{type(config).__name__}")
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(f"lz.PagedKVCache pages a decoder's self-attention; {type(config).__name__} "
                             f"is an encoder-decoder config (use transformers' EncoderDecoderCache)")
        text = config.get_text_config(decoder=True)
        if getattr(text, "num_kv_shared_layers", 0) or "reuse" in (getattr(text, "kv_sharing_modes", None) or ()):
            raise ValueError(f"{type(text).__name__} shares K/V between layers, which read each other's "
                             f"cache as tensors: lz.PagedKVCache does not page them")
        types, per_layer = get_layer_types_and_kwargs(text)
        positions = getattr(text, "max_position_embeddings", None)
        width = -(-positions // page_size) if isinstance(positions, int) and positions > 0 else None
        if num_pages is not None:
            width = min(width or num_pages, num_pages)
        groups: dict = {}
        layers, unsupported = [], []
        for i, (kind, kw) in enumerate(zip(types, per_layer)):
            if kind == "dummy":              # no attention (MoE / MLP-only layer)
                layers.append(DummyLayer())
                continue
            if kind not in ("full_attention", "sliding_attention"):
                unsupported.append(f"{i}: {kind}")
                continue
            window = kw.get("sliding_window") if kind == "sliding_attention" else None
            if window not in groups:
                groups[window] = PageGroup(page_size, num_pages, window, width, max_batch_size, text)
            layers.append(PagedLayer(groups[window], dtype, device))
        if unsupported or not groups:
            raise ValueError(f"lz.PagedKVCache pages full_attention and sliding_attention layers; "
                             f"{type(text).__name__} has "
                             f"{'layers ' + ', '.join(unsupported) if unsupported else 'no attention layers'} "
                             f"(chunked, linear, hybrid and indexed attention keep other state)")
        super().__init__(layers=layers)
        self.config, self.page_size, self.num_pages = text, page_size, num_pages
        self.max_batch_size = max_batch_size
        self.groups: list[PageGroup] = list(groups.values())

    def __repr__(self) -> str:
        return (f"PagedKVCache(page_size={self.page_size}, num_pages={self.num_pages}, "
                f"groups={[(g.window, len(g.layers)) for g in self.groups]}, length={self.get_seq_length()})")

    @property
    def num_rows(self) -> int:
        return self.groups[0].alloc.num_rows

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The batch's padded length; in graph mode the `length` given to `reserve` (fixed, so
        that a traced decode step does not change with it)."""
        g = self.groups[0]
        return g.graph_length if g.graph else g.length

    @property
    def graph_mode(self) -> bool:
        """Pages are reserved (`reserve`): updates are device work only, until `end_graph_mode`
        or `reset`."""
        return self.groups[0].graph

    def _refuse_in_graph_mode(self, what: str) -> None:
        if self.graph_mode:
            raise ValueError(f"lz.PagedKVCache.{what} in graph mode (pages reserved by cache.reserve "
                             f"for a CUDA-graphed decode, whose steps read the page table as it is): "
                             f"call cache.end_graph_mode(tokens) or cache.reset() first")

    def reserve(self, new_tokens: int, length: int | None = None) -> None:
        """Give every row the pages for `new_tokens` more tokens now, and switch to graph mode.

        Called after the prompt's forward (lz.generate does, before its decode steps): each row
        gets pages for its real tokens plus `new_tokens` (none for padding), written into the
        device page table, and each layer's `update` then writes row b's next token at the slot
        the device lengths name and advances them, with no host reads (a decode step through the
        cache can then be compiled with fullgraph=True and captured in a CUDA graph; `graph.py`).
        Sliding-window layers drop the pages the next query no longer sees, then keep the rest
        until graph mode ends. Every row takes every token of a graph-mode forward (no padding).

        length: what get_seq_length() and the layers' get_mask_sizes() answer in graph mode
        (>= the padded length + new_tokens; default that sum): a caller that compiles the step
        passes a length that does not change between its calls (lz.generate: its length bucket).
        Out of pages (a fixed num_pages) raises ValueError with the pages needed and free, before
        anything but the sliding-window drops changed. Graph mode refuses free, crop,
        reorder_cache and batch_*; `end_graph_mode(tokens)` or `reset()` leave it.
        """
        new_tokens = _positive("new_tokens", new_tokens, allow_none=False)
        self._refuse_in_graph_mode("reserve")
        held = self.get_seq_length()
        if held == 0:
            raise ValueError("lz.PagedKVCache.reserve follows the prompt's forward, and the cache "
                             "holds no tokens: run the prompt through the model first")
        length = held + new_tokens if length is None else _positive("length", length, allow_none=False)
        if length < held + new_tokens:
            raise ValueError(f"reserve(length={length}); allowed: >= {held + new_tokens} (the "
                             f"{held} positions held + new_tokens={new_tokens})")
        for g in self.groups:
            g._check_previous_step()
            graph.drop_unseen(g)
        what = f"reserving {new_tokens} tokens for each of {self.num_rows} rows"
        try:
            for g in self.groups:
                g.alloc.reserve(graph.need(g, new_tokens), what)
        except ValueError:
            for g in self.groups:
                g.changed()       # the page table follows the sliding-window drops
            raise
        for g in self.groups:
            graph.enter(g, new_tokens, length, g.table.device)

    def end_graph_mode(self, tokens: int) -> None:
        """Leave graph mode: each row holds `tokens` more tokens than at `reserve` (the decode
        steps that ran, or fewer: later ones are forgotten); reserved pages past them are
        released and the cache is as if those tokens had come through eager steps."""
        if not self.graph_mode:
            raise ValueError("lz.PagedKVCache.end_graph_mode: the cache is not in graph mode")
        if isinstance(tokens, bool) or not isinstance(tokens, int):
            raise TypeError(f"tokens must be an int, got {type(tokens).__name__}")
        reserved = self.groups[0].graph_base
        most = min(self.groups[0].alloc.lens[r] - n for r, n in enumerate(reserved[0]))
        if not 0 <= tokens <= most:
            raise ValueError(f"end_graph_mode(tokens={tokens}); allowed: 0..{most} (the tokens reserved)")
        for g in self.groups:
            graph.leave(g, tokens)

    def _rows(self, index, what: str) -> list[int]:
        if isinstance(index, torch.Tensor):
            index = (index.nonzero().flatten() if index.dtype == torch.bool else index).tolist()
        elif isinstance(index, int) and not isinstance(index, bool):
            index = [index]
        if not isinstance(index, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in index):
            raise TypeError(f"{what} takes row indices (ints, a list or a LongTensor), got {index!r}")
        for i in index:
            if not 0 <= i < self.num_rows:
                raise ValueError(f"{what}: row {i} is not a row of the cache; allowed: 0..{self.num_rows - 1}")
        return list(index)

    def free(self, rows) -> None:
        """Release the pages of finished rows (an int, ints, or a bool / index tensor). The rows
        stay in the batch, empty: a freed row cannot continue its sequence (a forward giving it
        the next positions raises), its slot may start a new one (positions from 0, left padding
        allowed). When every row is free the batch is over and a new one (any size) may start."""
        self._refuse_in_graph_mode("free")
        rows = self._rows(rows, "free")
        for g in self.groups:
            g.free(rows)

    @contextlib.contextmanager
    def dense_prefill(self):
        """Within the block, a batch's first forward hands each layer's attention the step's own
        K/V (B, Hkv, Sq, D), as a DynamicCache does, instead of the pools and page metadata; the
        pages are written all the same. Every row's keys are then exactly the step's tokens, so
        dense attention under transformers' (left-padding, causal, window) mask is the same
        attention, and it runs LayerZero's dense prefill kernels (flash-attn, FlashInfer, cuDNN,
        SDPA), where `lz.paged_attention` may have only its reference for long queries (which
        gathers the pages and materialises (B, H, Sq, Sk) scores). lz.generate prefills so."""
        for g in self.groups:
            g.dense_first = True
        try:
            yield
        finally:
            for g in self.groups:
                g.dense_first = False

    def reset(self) -> None:
        """Release every page and forget the batch (leaving graph mode); pools, page table and
        lengths are kept, the same tensors, for the next batch."""
        for g in self.groups:
            g.reset()

    def crop(self, tokens_to_remove: int) -> None:
        """transformers 5.x: crop(-n) removes the batch's last n positions (crop(0) nothing);
        crop(n) with n > 0 keeps the first n (the older form). Each row loses its last tokens;
        a sliding-window group can take back only the tokens of its last forward."""
        if isinstance(tokens_to_remove, bool) or not isinstance(tokens_to_remove, int):
            raise TypeError(f"crop takes an int, got {type(tokens_to_remove).__name__}")
        self._refuse_in_graph_mode("crop")
        length = self.get_seq_length()
        keep = tokens_to_remove if tokens_to_remove > 0 else length + tokens_to_remove
        if keep < 0:
            raise ValueError(f"crop({tokens_to_remove}) removes more than the {length} positions held")
        for g in self.groups:
            g.crop(min(keep, length))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row i becomes row beam_idx[i] (repeated rows share its pages, copied on write)."""
        self._refuse_in_graph_mode("reorder_cache")
        index = self._rows(beam_idx, "reorder_cache")
        for g in self.groups:
            g.reorder(index)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.reorder_cache([i for i in range(self.num_rows) for _ in range(repeats)])

    def batch_select_indices(self, indices) -> None:
        self.reorder_cache(indices)
