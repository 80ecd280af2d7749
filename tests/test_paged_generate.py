"""lz.generate with a lz.PagedKVCache (fp32 tiny models on CPU): model.generate's DynamicCache tokens
on a left-padded batch of prompts of different lengths (llama, mistral with a sliding window, qwen3,
gemma2; greedy with EOS; lz.generate(cache=) and custom_generate), with the host-driven cache and in
graph mode (the graphed path forced on the CPU: pages reserved after the prefill, device-only
updates, steps run eagerly); the graph-mode step traced by torch.compile(fullgraph=True) in one
graph; a failed capture's warm-up steps undone; pages taken for real tokens only; misuse raises;
benchmarks/paged_generate.py --tiny."""
from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

T = pytest.importorskip("transformers")

import layerzero as lz  # noqa: E402
from layerzero import generation as lzgen, reference, registry  # noqa: E402
from test_paged_cache import PROMPT, REAL, _check_groups, _direct, _llama_config, _prompts  # noqa: E402
from helpers import one_thread  # noqa: E402,F401  (autouse)
from test_transformers import _build  # noqa: E402

FAMILIES = ["llama", "mistral", "qwen3", "gemma2"]
NEW = 8
PAGE = 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pair(family):
    ref, *_ = _build(family)
    return ref, copy.deepcopy(ref)


def _want(ref, ids, mask, new=NEW):
    """transformers' tokens (DynamicCache) with EOS ids that stop rows 0 and 2 early."""
    gen = dict(max_new_tokens=new, do_sample=False, pad_token_id=0)
    free = ref.generate(ids, attention_mask=mask, eos_token_id=None, **gen)
    gen["eos_token_id"] = [int(free[0, PROMPT + 2]), int(free[2, PROMPT + 4])]
    return ref.generate(ids, attention_mask=mask, **gen), gen


def _record_reserve(monkeypatch):
    """Each reserve's pages in use per group, right after it: [(window, pages, dropped)]."""
    seen = []
    real = lz.PagedKVCache.reserve

    def reserve(self, *args, **kwargs):
        real(self, *args, **kwargs)
        seen.append([(g.window, g.alloc.capacity - g.alloc.num_free, list(g.alloc.dropped))
                     for g in self.groups])

    monkeypatch.setattr(lz.PagedKVCache, "reserve", reserve)
    return seen


@pytest.mark.parametrize("graphed", [False, True], ids=["host-driven", "graph-mode"])
@pytest.mark.parametrize("family", FAMILIES)
def test_tokens_equal_dynamic_cache_and_padding_takes_no_page(family, graphed, monkeypatch):
    """Both routes give DynamicCache's tokens, rows stopping at their EOS; the prefill's attention
    is dense (`cache.dense_prefill`), the decode steps' paged. In graph mode every
    row's pages for prompt + max_new tokens are reserved at once, none for padding; afterwards
    the cache holds each row's real tokens (the last new one is never fed back), as transformers'
    loop leaves a cache, its unused reserved pages released."""
    if graphed:
        monkeypatch.setattr(lzgen, "_buckets", lambda device, plan: True)
    reserved = _record_reserve(monkeypatch)
    ref, model = _pair(family)
    ids, mask = _prompts()
    want, gen = _want(ref, ids, mask)
    assert (want[:, PROMPT:] == 0).any(), "the EOS ids should stop some row early"
    kept = want.shape[1] - PROMPT
    for route in ("direct", "custom_generate"):
        cache = lz.PagedKVCache(model.config, page_size=PAGE)
        lz.reset_metrics()
        if route == "direct":
            got = lz.generate(model, ids, attention_mask=mask, cache=cache, **gen)
        else:
            got = model.generate(ids, attention_mask=mask, cache=cache, custom_generate=lz.generate, **gen)
        assert torch.equal(got, want), route
        calls, layers = lz.metrics()["calls"], model.config.num_hidden_layers
        assert sum(calls["attention"].values()) == layers                  # the prefill: dense
        assert sum(calls["paged_attention"].values()) == layers * (kept - 1)   # each decode step
        assert not cache.graph_mode
        _check_groups(cache)
        for g in cache.groups:
            assert g.alloc.lens == [n + kept - 1 for n in REAL]
    if not graphed:
        assert reserved == []
        return
    assert len(reserved) == 2
    for window, pages, dropped in reserved[0]:
        want_pages = sum(-(-(n + NEW) // PAGE) for n in REAL)
        assert pages == want_pages - sum(dropped)
        assert (sum(dropped) > 0) == (window is not None)   # the prompt left the window: dropped
    (key,) = [k for k in lzgen._LOOPS[model] if k[-1] is cache]
    assert key[0] == 4


def _dense_paged(q, k_pages, v_pages, page_table, seq_lens, scale=None, is_causal=True, window=None,
                 softcap=None, sinks=None, layout="bhsd"):
    """reference.paged_attention without its host reads: every page of the table gathered, the
    lengths applied as a mask. Traceable with fullgraph=True (the reference sizes its gather by
    the longest row, a value read on the host; this one by the table's width, a shape)."""
    if layout == "bshd":
        q = q.transpose(1, 2)
    sq, width, p = q.shape[2], page_table.shape[1], k_pages.shape[1]
    k = reference.gather_pages(k_pages, page_table, width)
    v = reference.gather_pages(v_pages, page_table, width)
    held = torch.arange(width * p, device=q.device).view(1, 1, -1, 1) < seq_lens.view(-1, 1, 1, 1)
    v = torch.where(held, v, torch.zeros((), dtype=v.dtype, device=v.device))
    allowed = reference.paged_positions(seq_lens, sq, width * p, is_causal=is_causal, window=window)
    out = reference.attention(q, k, v, allowed.unsqueeze(1), False, scale, 0.0, None, softcap, None, sinks,
                              "bhsd", "top_left")
    return out.transpose(1, 2) if layout == "bshd" else out


@pytest.fixture
def traceable_paged_attention():
    """lz.paged_attention locked to `_dense_paged` (registered as "test.paged_dense")."""
    lz.register("paged_attention", "test.paged_dense", _dense_paged)
    lz.lock("paged_attention", "test.paged_dense")
    torch._dynamo.reset()
    try:
        yield
    finally:
        lz.unlock("paged_attention")
        registry.unregister("test.paged_dense")
        torch._dynamo.reset()


def test_graph_mode_step_compiles_in_one_graph(monkeypatch, traceable_paged_attention):
    """gemma2 (a sliding-window group and a full one, softcap): the decode step over a cache in
    graph mode traces with torch.compile(fullgraph=True) -- no host read, no graph break -- once
    for every step (what it reads of the cache does not change per token), and gives
    DynamicCache's tokens. The attention is a traceable stand-in: the reference kernel reads the
    lengths on the host, so it cannot be traced (on CUDA a graph-safe kernel takes its place)."""
    monkeypatch.setattr(lzgen, "_buckets", lambda device, plan: True)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    real = lzgen._PagedLoop.prefill

    def prefill(self, *args, **kwargs):
        real(self, *args, **kwargs)
        assert self.cache.graph_mode
        compiled = torch.compile(self.step, fullgraph=True, dynamic=False, backend=backend)
        self.step = lambda cur=None: compiled()

    monkeypatch.setattr(lzgen._PagedLoop, "prefill", prefill)
    ref, model = _pair("gemma2")
    ids, mask = _prompts()
    want, gen = _want(ref, ids, mask)
    lz.reset_metrics()
    got = lz.generate(model, ids, attention_mask=mask, cache=lz.PagedKVCache(model.config, page_size=PAGE), **gen)
    assert torch.equal(got, want)
    assert len(graphs) == 1
    assert "test.paged_dense" in lz.metrics()["calls"]["paged_attention"]


def test_failed_capture_undoes_its_warm_up_steps(monkeypatch, caplog):
    """Where capturing the step fails (forced here: warm-up steps, then an error), the loop counts
    the fallback and runs its steps eagerly, still in graph mode. The warm-up steps wrote K/V
    past the reservation (2 new tokens, 3 warm-up steps): clamped to each row's pages, and the
    lengths put back, the tokens are transformers'."""
    monkeypatch.setattr(lzgen, "_buckets", lambda device, plan: True)

    def warm_and_capture(self):
        for _ in range(3):
            self.step()
        raise RuntimeError("no CUDA graph here")

    real = lzgen._PagedLoop.decode

    def decode(self, streamer):
        assert self.cache.graph_mode and self._try_capture() is False
        return real(self, streamer)

    monkeypatch.setattr(lzgen._Loop, "_warm_and_capture", warm_and_capture)
    monkeypatch.setattr(lzgen._PagedLoop, "decode", decode)
    ref, model = _pair("llama")
    ids, mask = _prompts()
    gen = dict(max_new_tokens=2, do_sample=False, pad_token_id=0, eos_token_id=None)
    want = ref.generate(ids, attention_mask=mask, **gen)
    cache = lz.PagedKVCache(model.config, page_size=PAGE)
    lz.reset_metrics()
    with caplog.at_level(logging.WARNING, logger="layerzero"):
        assert torch.equal(lz.generate(model, ids, attention_mask=mask, cache=cache, **gen), want)
    assert lz.metrics()["fallbacks"] == {lzgen.GRAPH_FALLBACK: 1}
    assert any("no CUDA graph here" in r.getMessage() for r in caplog.records)
    _check_groups(cache)


def test_the_loop_is_kept_per_cache_and_reused_after_reset(monkeypatch):
    """A second call with the same cache (reset) reuses the loop and its cache tensors (a fixed
    num_pages: nothing reallocated, so a captured graph would stay valid); another cache gets
    another loop. past_key_values= is the same route; the dict result hands the cache back."""
    monkeypatch.setattr(lzgen, "_buckets", lambda device, plan: True)
    ref, model = _pair("qwen3")
    ids, mask = _prompts()
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    want = ref.generate(ids, attention_mask=mask, **gen)
    cache = lz.PagedKVCache(model.config, page_size=PAGE, num_pages=16, max_batch_size=4)
    out = lz.generate(model, ids, attention_mask=mask, cache=cache, return_dict_in_generate=True, **gen)
    assert torch.equal(out.sequences, want) and out.cache is cache
    (loop,) = lzgen._LOOPS[model].values()
    tensors = loop.tensors
    cache.reset()
    with pytest.warns(FutureWarning):        # transformers: past_key_values= is now cache=
        got = model.generate(ids, attention_mask=mask, past_key_values=cache, custom_generate=lz.generate, **gen)
    assert torch.equal(got, want)
    assert list(lzgen._LOOPS[model].values()) == [loop] and loop.tensors == tensors
    other = lz.PagedKVCache(model.config, page_size=PAGE)
    assert torch.equal(lz.generate(model, ids, attention_mask=mask, cache=other, **gen), want)
    assert [k[-1] for k in lzgen._LOOPS[model]] == [cache, other]


def test_caches_it_cannot_take_raise():
    """A filled cache (continuing is model.generate's), a cache of another class the caller
    passed, a cache left in graph mode, a batch too large for max_batch_size."""
    _, model = _pair("llama")
    ids, mask = _prompts()
    gen = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    cache = lz.PagedKVCache(model.config, page_size=PAGE)
    lz.generate(model, ids, attention_mask=mask, cache=cache, **gen)
    with pytest.raises(ValueError, match=r"holding 11 tokens \(continuing from a cache\).*model.generate"):
        lz.generate(model, ids, attention_mask=mask, cache=cache, **gen)
    with pytest.raises(ValueError, match="cache=DynamicCache.*lz.PagedKVCache"):
        lz.generate(model, ids, attention_mask=mask, cache=T.DynamicCache(), **gen)
    cache.reset()
    _direct(cache, b=2, sq=3, layers=range(model.config.num_hidden_layers))
    cache.reserve(2)
    with pytest.raises(ValueError, match="in graph mode.*call cache.reset"):
        lz.generate(model, ids, attention_mask=mask, cache=cache, **gen)
    small = lz.PagedKVCache(model.config, max_batch_size=2)
    with pytest.raises(ValueError, match="batch of 4 rows.*max_batch_size=2"):
        lz.generate(model, ids, attention_mask=mask, cache=small, **gen)


def test_reserve_counts_pages_and_graph_mode_refuses_what_it_cannot_do():
    cache = lz.PagedKVCache(_llama_config(), page_size=2, num_pages=8)
    with pytest.raises(ValueError, match="follows the prompt's forward"):
        cache.reserve(4)
    pos = torch.tensor([[0, 1, 2], [0, 0, 1]])           # row 1: one pad, 2 tokens
    _direct(cache, b=2, sq=3, positions=pos)             # 2 + 1 pages of 8
    with pytest.raises(ValueError, match=r"out of pages: reserving 6 tokens for each of 2 rows needs 6 "
                                         r"pages of 2 tokens and 5 of 8 are free"):
        cache.reserve(6)
    assert not cache.graph_mode and cache.groups[0].alloc.lens == [3, 2]     # nothing changed
    with pytest.raises(ValueError, match=r"reserve\(length=5\); allowed: >= 7"):
        cache.reserve(4, length=5)
    cache.reserve(4)                                     # rows 3 + 4 and 2 + 4 tokens: 4 + 3 pages
    g = cache.groups[0]
    assert cache.graph_mode and cache.get_seq_length() == 7 and g.alloc.num_free == 1
    assert g.seq_lens[:2].tolist() == [3, 2] and g.cap[:2].tolist() == [7, 6]
    assert cache.layers[0].get_mask_sizes(1) == (7, 0)
    for layer in (0, 1):                                 # one graph-mode step: slots off seq_lens
        kw = {"position_ids": torch.tensor([[3], [2]])}
        k, v = torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16)
        pools = cache.update(k, v, layer, kwargs=kw)
        meta = kw["lz_paged"]
        assert meta.graph and meta.page_table.shape == (2, 4)
        meta.consume(None)
        for row, t in ((0, 3), (1, 2)):
            page, slot = g.alloc.page_of(row, t)
            assert torch.equal(pools[0][page, slot], k[row, :, 0]) and torch.equal(pools[1][page, slot], v[row, :, 0])
    assert g.seq_lens[:2].tolist() == [4, 3]             # advanced once, by the group's first layer
    for call, what in ((lambda: cache.crop(-1), "crop"), (lambda: cache.free(0), "free"),
                       (lambda: cache.reorder_cache(torch.tensor([1, 0])), "reorder_cache"),
                       (lambda: cache.batch_repeat_interleave(2), "reorder_cache"),
                       (lambda: cache.reserve(1), "reserve")):
        with pytest.raises(ValueError, match=f"PagedKVCache.{what} in graph mode"):
            call()
    with pytest.raises(ValueError, match="forward of 3 rows.*reserved for 2 rows"):
        cache.update(torch.randn(3, 2, 1, 16), torch.randn(3, 2, 1, 16), 0,
                     kwargs={"position_ids": torch.zeros(3, 1, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"end_graph_mode\(tokens=5\); allowed: 0..4"):
        cache.end_graph_mode(5)
    cache.end_graph_mode(1)                              # the step above: 4 and 3 tokens held
    assert not cache.graph_mode and g.alloc.lens == [4, 3] and cache.get_seq_length() == 4
    _check_groups(cache)
    _direct(cache, b=2, sq=1, positions=torch.tensor([[4], [3]]))    # eager steps continue
    cache.reserve(2)
    cache.reset()                                        # leaves graph mode, every page free
    assert not cache.graph_mode and g.alloc.num_free == 8
    with pytest.raises(ValueError, match="not in graph mode"):
        cache.end_graph_mode(0)


def test_benchmark_tiny_smoke(tmp_path):
    """benchmarks/paged_generate.py --tiny: the paged and static variants, fp32 on CPU, give
    transformers' tokens (it exits non-zero otherwise); the JSON has the memory figures."""
    out = tmp_path / "paged.json"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "paged_generate.py"), "--tiny",
                           "--variants", "sdpa-static", "lz-paged", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"sdpa-static", "lz-paged"} and all(r["same_tokens_as_sdpa-static"] for r in rows.values())
    paged = rows["lz-paged"]
    assert paged["stored_bytes"] == sum(n + 6 for n in res["prompt_lengths"]) * paged["kv_per_token"]
    assert paged["kv_bytes"] < rows["sdpa-static"]["kv_bytes"]
    assert set(res["goals"]) == {"memory_kv_over_stored", "tok_s_vs_sdpa-static"}
