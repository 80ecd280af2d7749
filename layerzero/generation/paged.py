"""lz.generate's loop over a `lz.PagedKVCache` the caller passed (`_PagedLoop`): the loop of
`loop.py` with the caller's cache in place of its static cache.

Prefill: eager, always (the cache plans a forward's page writes on the host: no prefill graph),
under `cache.dense_prefill()`: the attention runs LayerZero's dense kernels over the step's own K/V
with transformers' mask, as the static loop's prefill does, while the pages are written (a long
prompt's queries would otherwise go to `lz.paged_attention`, whose only kernel for them may be the
reference). The prompt arrives left-padded, with the loop's positions (the mask's cumulative sum)
telling the cache each row's real tokens: padding takes no page.

Decode, where lz.generate graphs its steps (CUDA; or forced, in tests): right after the prefill
the loop reserves every row's pages for all its new tokens (`cache.reserve(max_new, length)`,
`length` = the loop's length bucket, so what the cache reports to transformers' masking code is
the same at every step and every call of this loop), which puts the cache in graph mode: each
layer's update writes at the slot the device lengths name and advances them, with no host reads.
The step is then the static loop's: compiled with fullgraph=True and captured as a CUDA graph,
replayed once per token. The positions the loop feeds (each row's real count, from the mask) are
the lengths the cache advances on the device, so RoPE and the pages agree. The graph bakes in the
cache's tensors (pools, page table, lengths): the loop is kept per cache object, and a capture is
redone when the cache reallocated any of them since (a pool that grew: pass a fixed num_pages to
avoid it). Whether a step can be captured depends on `lz.paged_attention`'s kernel: one that reads
lengths on the host (the reference) cannot, and the capture's failure is the static loop's
(logged, counted as `GRAPH_FALLBACK`, eager steps, still in graph mode). After the decode the
cache leaves graph mode holding each row's tokens as transformers' loop leaves a cache (the last
new token not fed back), its unused reserved pages released.

Elsewhere (CPU, stepwise processors, scores or logits returned) the steps run eagerly through the
cache's host-driven updates, pages taken as tokens arrive.
"""
from __future__ import annotations

from .loop import _Loop


class _PagedLoop(_Loop):
    """The buffers and (on CUDA) the captured step of one (batch, length bucket, plan, cache)."""

    def __init__(self, model, batch: int, max_len: int, plan, device, cache):
        super().__init__(model, batch, max_len, plan, device, cache)
        self.tensors = None     # the cache tensors the captured step names (`_tensors`)

    def _reset_cache(self) -> None:
        self.cache.reset()      # also leaves graph mode

    def _graphable(self) -> bool:
        return self.cache.graph_mode

    def _state(self):
        """The static loop's state and each page group's device lengths (put back after the
        warm-up runs of a capture; the pools' slots those runs wrote are written again)."""
        return super()._state() + [g.seq_lens for g in self.cache.groups if g.seq_lens is not None]

    def _tensors(self) -> tuple:
        groups = [t for g in self.cache.groups for t in (g.table, g.seq_lens, g.cap)]
        pools = [t for layer in self.cache.layers for t in (getattr(layer, "keys", None),
                                                            getattr(layer, "values", None))]
        return tuple((t.data_ptr(), tuple(t.shape)) for t in groups + pools if t is not None)

    def prefill(self, input_ids, attention_mask, max_new: int, rows: int, output_scores: bool,
                output_logits: bool, graphed: bool = False) -> None:
        """The static loop's prefill, eagerly, attention dense; then, if the steps are to be graphed, every row's
        pages reserved and the cache in graph mode."""
        with self.cache.dense_prefill():
            super().prefill(input_ids, attention_mask, max_new, rows, output_scores, output_logits, False)
        if not graphed:
            return
        self.cache.reserve(max_new, length=self.mask.shape[1])
        tensors = self._tensors()
        if tensors != self.tensors:
            if self.graph is not None and self.graph is not False:
                self.graph = None           # captured over tensors the cache has replaced
            self.tensors = tensors

    def decode(self, streamer) -> int:
        """The static loop's decode; then the cache leaves graph mode holding what was fed (a
        decode that raises leaves the cache reset: its reserved pages hold no usable state)."""
        try:
            kept = super().decode(streamer)
        except BaseException:
            self.cache.reset()
            raise
        if self.cache.graph_mode:
            self.cache.end_graph_mode(kept - 1)
        return kept
