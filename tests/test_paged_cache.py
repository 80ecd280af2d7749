"""lz.PagedKVCache: generate() gives DynamicCache's tokens (fp32 tiny models: llama, mistral with a
sliding window, qwen3, gemma2; left-padded batches; greedy, seeded sampling, shared prompt pages,
beam search); random sequences of cache operations never lose or mix data (hypothesis, on the
allocator alone and on the cache against a dense model of the rows); misuse raises."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

T = pytest.importorskip("transformers")

import layerzero as lz  # noqa: E402
from layerzero import reference  # noqa: E402
from layerzero.integrations import transformers as hf  # noqa: E402
from layerzero.paged.allocator import PageAllocator  # noqa: E402
from test_transformers import SMALL, _config  # noqa: E402

PROMPT = 9
REAL = [9, 7, 4, 8]          # real tokens of each prompt row (left padding before them)


def _model(family, route="layerzero"):
    cfg, cls, _ = _config(family)
    torch.manual_seed(0)
    if route == "patch":
        m = cls._from_config(copy.deepcopy(cfg)).eval()
        lz.patch(m)
        return m
    return cls._from_config(copy.deepcopy(cfg), attn_implementation="layerzero").eval()


def _prompts(real=REAL):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (len(real), PROMPT), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(real):
        mask[row, PROMPT - n:] = 1
    return ids.masked_fill(mask == 0, 0), mask


def _generate(m, ids, mask, seed=7, **kw):
    torch.manual_seed(seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = m.generate(ids, attention_mask=mask, pad_token_id=0, eos_token_id=None, **kw)
    assert not [w for w in caught if "layerzero" in str(w.message)], [str(w.message) for w in caught]
    return out


def _check_groups(cache):
    for g in cache.groups:
        g.alloc.check()
        for row, pages in enumerate(g.alloc.rows):
            assert g.table[row, :len(pages)].tolist() == pages and not (g.table[row, len(pages):] + 1).any()
            assert int(g.seq_lens[row]) == g.alloc.lens[row] - g.alloc.dropped[row] * g.page_size


@pytest.mark.parametrize("family, page_size", [("llama", 4), ("mistral", 3), ("qwen3", 16), ("gemma2", 2)])
def test_generate_gives_dynamic_cache_tokens(family, page_size):
    """Greedy and seeded sampling on a left-padded batch of 4; padding takes no page; the
    sliding-window layers (mistral, gemma2's every other) drop pages that left the window; after
    reset() the same cache serves another generate()."""
    m = _model(family)
    ids, mask = _prompts()
    new = 12
    for gen in (dict(do_sample=False), dict(do_sample=True, top_k=20, temperature=0.9)):
        want = _generate(m, ids, mask, max_new_tokens=new, **gen)
        cache = lz.PagedKVCache(m.config, page_size=page_size)
        lz.reset_metrics()
        got = _generate(m, ids, mask, max_new_tokens=new, cache=cache, **gen)
        assert torch.equal(got, want), gen
        calls = lz.metrics()["calls"]
        assert calls["paged_attention"] == {"reference.paged_attention": 2 * new} and "attention" not in calls
        assert cache.get_seq_length() == PROMPT + new - 1      # the last token is never fed back
        _check_groups(cache)
        for g in cache.groups:
            assert g.alloc.lens == [n + new - 1 for n in REAL]            # no padding kept
            if g.window is not None:
                assert min(g.alloc.dropped) > 0
                assert all(d * page_size <= n - g.window + 1 for d, n in zip(g.alloc.dropped, g.alloc.lens))
            else:
                assert not any(g.alloc.dropped)
        cache.reset()
        assert all(g.alloc.num_free == g.alloc.capacity for g in cache.groups)
        assert torch.equal(_generate(m, ids, mask, max_new_tokens=new, cache=cache, **gen), want)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_num_return_sequences_share_prompt_pages_copied_on_write(family):
    """generate() repeats each prompt 3 times before the prefill: the copies hold the first
    copy's full prompt pages (refcount 3) and get their own copy of its last, partly filled page
    when they append."""
    m = _model(family)
    ids, mask = _prompts([9, 6])
    gen = dict(do_sample=True, top_k=30, num_return_sequences=3, max_new_tokens=6)
    want = _generate(m, ids, mask, **gen)
    cache = lz.PagedKVCache(m.config, page_size=4)
    assert torch.equal(_generate(m, ids, mask, cache=cache, **gen), want)
    _check_groups(cache)
    full = next(g for g in cache.groups if g.window is None)
    rows, refs = full.alloc.rows, full.alloc.refs
    for first, n in ((0, 9), (3, 6)):                  # rows 0-2: prompt of 9, rows 3-5: of 6
        shared = n // 4
        assert rows[first][:shared] == rows[first + 1][:shared] == rows[first + 2][:shared]
        assert all(refs[p] == 3 for p in rows[first][:shared])
        assert len({rows[first + i][shared] for i in range(3)}) == 3    # the partial page, copied
    unshared = sum(-(-n // 4) for n in full.alloc.lens)
    assert full.alloc.capacity - full.alloc.num_free == unshared - 2 * (2 + 1)


def test_beam_search_reorders_rows_by_refcount():
    m = _model("qwen3")
    ids, mask = _prompts([9, 5])
    gen = dict(num_beams=3, num_return_sequences=2, do_sample=False, max_new_tokens=7)
    want = _generate(m, ids, mask, **gen)
    cache = lz.PagedKVCache(m.config, page_size=2)
    assert torch.equal(_generate(m, ids, mask, cache=cache, **gen), want)
    _check_groups(cache)
    assert max(cache.groups[0].alloc.refs) > 1


def test_lz_patch_route_and_past_key_values_with_fixed_capacity():
    """An sdpa model patched by lz.patch; the cache passed as past_key_values=, with num_pages
    and max_batch_size fixed: the page table and pools are never reallocated."""
    m = _model("mistral", route="patch")
    ids, mask = _prompts()
    want = _generate(m, ids, mask, max_new_tokens=8)
    cache = lz.PagedKVCache(m.config, page_size=4, num_pages=24, max_batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)       # past_key_values= -> cache=
        got = _generate(m, ids, mask, max_new_tokens=8, past_key_values=cache)
    assert torch.equal(got, want)
    g = cache.groups[0]
    assert g.table.shape == (4, 24) and g.alloc.capacity == 24
    assert all(layer.keys.shape[0] == 24 for layer in g.layers)



def test_assisted_decoding_crops_rejected_candidates():
    """Prompt lookup proposes tokens, the model checks them in one forward, generate() crops the
    rejected ones: also in gemma2's sliding-window layers, which keep what a crop may take back."""
    m = _model("gemma2")
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]])
    gen = dict(do_sample=False, max_new_tokens=12, prompt_lookup_num_tokens=3)
    want = _generate(m, ids, None, **gen)
    cache = lz.PagedKVCache(m.config, page_size=2)
    assert torch.equal(_generate(m, ids, None, cache=cache, **gen), want)
    _check_groups(cache)

# ---- the allocator alone: random operations against a model of each page's contents ------------

@settings(max_examples=150, deadline=None)
@given(st.data())
def test_allocator_never_loses_or_mixes_tokens(data):
    p = data.draw(st.integers(1, 4), label="page_size")
    fixed = data.draw(st.sampled_from([None, 12]), label="num_pages")
    a = PageAllocator(p, fixed)
    a.set_rows(data.draw(st.integers(1, 4), label="rows"))
    seq = [[] for _ in range(a.num_rows)]      # each row's token tags
    content: dict = {}                         # page -> {slot: tag}
    tag = iter(range(10 ** 9))

    def apply(copies):
        for src, dst in copies:
            content[dst] = dict(content.get(src, {}))

    for _ in range(data.draw(st.integers(1, 25), label="ops")):
        op = data.draw(st.sampled_from(["append", "share", "fork", "drop", "crop", "release", "reorder"]))
        row = data.draw(st.integers(0, a.num_rows - 1))
        before = (copy.deepcopy(a.rows), list(a.lens), list(a.refs))
        try:
            if op == "append":
                n = data.draw(st.integers(0, 6))
                length = a.lens[row]
                apply(a.append(row, n))
                for t in range(length, length + n):
                    page, slot = a.page_of(row, t)
                    assert a.refs[page] == 1, "a shared page was about to be written"
                    seq[row].append(next(tag))
                    content.setdefault(page, {})[slot] = seq[row][-1]
            elif op == "share":
                src = data.draw(st.integers(0, a.num_rows - 1))
                if src == row or a.rows[row] or a.lens[row] or a.dropped[src] or not a.lens[src]:
                    continue
                k = data.draw(st.integers(1, a.lens[src]))
                a.share(row, src, -(-k // p), k)
                seq[row] = seq[src][:k]
            elif op == "fork":
                apply(a.fork(row))
            elif op == "drop":
                a.drop_front(row, data.draw(st.integers(-3, a.lens[row] + 2)))
            elif op == "crop":
                keep = data.draw(st.integers(a.dropped[row] * p, max(a.lens[row], a.dropped[row] * p)))
                a.crop(row, keep)
                del seq[row][keep:]
            elif op == "release":
                a.release(row)
                seq[row] = []
            else:
                idx = data.draw(st.lists(st.integers(0, a.num_rows - 1), min_size=1, max_size=5))
                a.reorder(idx)
                seq = [list(seq[i]) for i in idx]
        except ValueError as e:            # a fixed pool ran out: nothing changed
            assert "out of pages" in str(e) and fixed is not None
            assert (a.rows, a.lens, a.refs) == before
        a.check()
        for r in range(a.num_rows):
            assert a.lens[r] == len(seq[r])
            for t in range(a.dropped[r] * p, a.lens[r]):
                page, slot = a.page_of(r, t)
                assert content[page][slot] == seq[r][t], f"row {r} token {t}"


# ---- the cache: random steps, shares, forks, crops, reorders, frees against dense rows ----------

H, D = 1, 2
WINDOW = 3


def _gemma2_config():
    """4 layers: sliding (window 3), full, sliding, full: two groups of two layers each."""
    cfg = T.Gemma2Config(num_key_value_heads=1, head_dim=D, sliding_window=WINDOW,
                         **{**SMALL, "num_hidden_layers": 4})
    cfg._attn_implementation = "layerzero"
    return cfg


def _run_step(cache, dense, n, sq, data, gen):
    """One forward's updates: rows get n[b] real new tokens after sq - n[b] pads; fresh rows may
    copy an earlier fresh row's first tokens, at every layer or only the first few (a fork)."""
    b = len(n)
    lens = [len(dense[r][0][0]) for r in range(b)]
    copies = {}
    fresh = [r for r in range(b) if lens[r] == 0]
    for r in fresh[1:]:
        if data.draw(st.booleans(), label=f"row {r} copies"):
            src = data.draw(st.sampled_from([f for f in fresh if f < r]))
            k = data.draw(st.integers(1, min(n[r], n[src])))
            upto = data.draw(st.integers(1, 4), label="layers it stays equal")
            copies[r] = (src, k, upto)
    pos = torch.zeros(b, sq, dtype=torch.long)
    for r in range(b):
        pos[r, sq - n[r]:] = torch.arange(lens[r], lens[r] + n[r])
    q = torch.randn(b, 2, sq, D, generator=gen)
    for layer in range(4):
        ks, vs = torch.randn(b, H, sq, D, generator=gen), torch.randn(b, H, sq, D, generator=gen)
        for r, (src, k, upto) in copies.items():
            if layer < upto:
                ks[r, :, sq - n[r]:sq - n[r] + k] = ks[src, :, sq - n[src]:sq - n[src] + k]
                vs[r, :, sq - n[r]:sq - n[r] + k] = vs[src, :, sq - n[src]:sq - n[src] + k]
        kw = {"position_ids": pos}
        kp, vp = cache.update(ks, vs, layer, kwargs=kw)
        meta = kw["lz_paged"]
        window = WINDOW if layer % 2 == 0 else None
        meta.consume(window)
        for r in range(b):
            dense[r][layer][0].extend(ks[r, :, t] for t in range(sq - n[r], sq))
            dense[r][layer][1].extend(vs[r, :, t] for t in range(sq - n[r], sq))
        out = lz.paged_attention(q, kp, vp, meta.page_table, meta.seq_lens,
                                 window=None if window is None else (window - 1, -1))
        for r in range(b):                 # the row's own keys, attended as lz.attention does
            k = torch.stack(dense[r][layer][0], 1).unsqueeze(0)       # (1, H, n, D)
            v = torch.stack(dense[r][layer][1], 1).unsqueeze(0)
            want = reference.attention(q[r:r + 1], k, v, is_causal=True, causal_align="bottom_right",
                                       window=None if window is None else (window - 1, -1))
            torch.testing.assert_close(out[r:r + 1], want, atol=1e-6, rtol=1e-6)


def _check_cache(cache, dense, length):
    assert cache.get_seq_length() == length
    _check_groups(cache)
    for g in cache.groups:
        a = g.alloc
        for layer_no, layer in enumerate(g.layers):
            idx = 2 * layer_no + (0 if g.window is not None else 1)
            for r in range(a.num_rows):
                held = dense[r][idx][0]
                assert a.lens[r] == len(held)
                if g.window is not None:     # the next query (at lens) still sees its window
                    assert a.dropped[r] * g.page_size <= max(0, a.lens[r] - g.window + 1)
                for t in range(a.dropped[r] * g.page_size, a.lens[r]):
                    page, slot = a.page_of(r, t)
                    assert torch.equal(layer.keys[page, slot], held[t]), (r, t)
                    assert torch.equal(layer.values[page, slot], dense[r][idx][1][t]), (r, t)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_cache_operations_never_lose_or_mix_data(data):
    page_size = data.draw(st.integers(1, 3), label="page_size")
    cache = lz.PagedKVCache(_gemma2_config(), page_size=page_size)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16), label="seed"))
    dense: list = []             # dense[row][layer] = ([K (H, D) per token], [V ...])
    length, undo = 0, 0          # padded length; tokens a crop may still take back
    for _ in range(data.draw(st.integers(1, 7), label="ops")):
        op = data.draw(st.sampled_from(["step", "step", "crop", "reorder", "free", "reset"]))
        if op == "step" or not dense:
            sq = data.draw(st.integers(1, 4), label="tokens")
            if not dense or length == 0:           # a new batch
                dense = [[([], []) for _ in range(4)] for _ in range(data.draw(st.integers(1, 4)))]
            n = [sq if dense[r][0][0] else data.draw(st.integers(1, sq)) for r in range(len(dense))]
            _run_step(cache, dense, n, sq, data, gen)
            length, undo = length + sq, sq
        elif op == "crop":
            k = data.draw(st.integers(0, undo))
            cache.crop(-k)
            for row in dense:
                for keys, values in row:
                    del keys[max(0, len(keys) - k):], values[max(0, len(values) - k):]
            length, undo = length - k, undo - k
        elif op == "reorder":
            idx = data.draw(st.lists(st.integers(0, len(dense) - 1), min_size=1, max_size=5))
            cache.reorder_cache(torch.tensor(idx))
            dense = [[(list(k), list(v)) for k, v in dense[i]] for i in idx]
        elif op == "free":
            rows = data.draw(st.lists(st.integers(0, len(dense) - 1), max_size=3, unique=True))
            cache.free(rows)
            for r in rows:
                dense[r] = [([], []) for _ in range(4)]
            if not any(row[0][0] for row in dense):     # the batch is over
                length, undo = 0, 0
        else:
            cache.reset()
            dense, length, undo = [], 0, 0
            continue
        _check_cache(cache, dense, length)


@pytest.mark.parametrize("equal_layers", [4, 1, 3])
def test_rows_sharing_pages_are_checked_at_every_layer(equal_layers):
    """Rows 0 and 2 start alike (9 and 7 tokens) and row 1 is row 0 over 5 tokens, at the first
    `equal_layers` layers: with 4 they share pages (refcounts) in both groups; with fewer, a
    group whose first layer saw them alike and a later one not gives them copies (fork), and
    every layer's pages hold the row's own K/V."""
    cache = lz.PagedKVCache(_gemma2_config(), page_size=2)
    gen = torch.Generator().manual_seed(0)
    n, sq = [9, 5, 7], 9
    pos = torch.zeros(3, sq, dtype=torch.long)
    for r in range(3):
        pos[r, sq - n[r]:] = torch.arange(n[r])
    dense = [[([], []) for _ in range(4)] for _ in range(3)]
    for layer in range(4):
        ks, vs = torch.randn(3, H, sq, D, generator=gen), torch.randn(3, H, sq, D, generator=gen)
        if layer < equal_layers:
            ks[1, :, 4:], vs[1, :, 4:] = ks[0, :, :5], vs[0, :, :5]
            ks[2, :, 2:], vs[2, :, 2:] = ks[0, :, :7], vs[0, :, :7]
        kw = {"position_ids": pos}
        cache.update(ks, vs, layer, kwargs=kw)
        kw["lz_paged"].consume(WINDOW if layer % 2 == 0 else None)
        for r in range(3):
            dense[r][layer][0].extend(ks[r, :, t] for t in range(sq - n[r], sq))
            dense[r][layer][1].extend(vs[r, :, t] for t in range(sq - n[r], sq))
    _check_cache(cache, dense, sq)
    for g in cache.groups:
        rows, refs = g.alloc.rows, g.alloc.refs
        if equal_layers == 4 or (equal_layers == 3 and g.window is not None):  # alike at its layers
            assert rows[1][:3] == rows[0][:3] and rows[2][:4] == rows[0][:4]   # 7 tokens: 3 full + 1
            assert refs[rows[0][0]] == 3 and refs[rows[0][3]] == 2
        else:
            assert not set(rows[0]) & (set(rows[1]) | set(rows[2])) and max(refs) == 1


# ---- misuse -------------------------------------------------------------------------------------

def _direct(cache, b=2, sq=3, positions=None, layers=(0, 1)):
    """Feed the cache as a 2-layer model would, reading the metadata like LayerZero's attention."""
    pos = torch.arange(sq).expand(b, sq) if positions is None else positions
    for layer in layers:
        kw = {"position_ids": pos}
        cache.update(torch.randn(b, 2, sq, 16), torch.randn(b, 2, sq, 16), layer, kwargs=kw)
        kw["lz_paged"].consume(None)
    return kw["lz_paged"]


def _llama_config(**kw):
    cfg, _, _ = _config("llama")
    cfg = copy.deepcopy(cfg)
    cfg._attn_implementation = "layerzero"
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_out_of_pages_says_how_many_were_needed_and_free():
    cache = lz.PagedKVCache(_llama_config(), page_size=2, num_pages=5)
    _direct(cache, b=2, sq=4)                        # 2 full pages per row: 4 of 5 taken
    with pytest.raises(ValueError, match=r"out of pages: this step needs 2 pages of 2 tokens and 1 of 5 are free"):
        _direct(cache, b=2, sq=1, positions=torch.tensor([[4], [4]]))
    assert cache.get_seq_length() == 4 and cache.groups[0].alloc.lens == [4, 4]   # nothing changed
    cache.free(1)                                    # a finished row's pages come back
    _direct(cache, b=2, sq=1, positions=torch.tensor([[4], [0]]))   # row 1's slot starts anew
    assert cache.groups[0].alloc.lens == [5, 1]


def test_pages_used_after_free_crop_or_reset_raise():
    cache = lz.PagedKVCache(_llama_config(), page_size=2)
    meta = _direct(cache, b=2, sq=3)
    cache.free([1])
    with pytest.raises(ValueError, match="used after its pages changed"):
        meta.consume(None)
    with pytest.raises(ValueError, match=r"position_ids\[1\] = \[3\] do not continue row 1, which holds 0"):
        _direct(cache, b=2, sq=1, positions=torch.tensor([[3], [3]]))
    cache.reset()
    meta = _direct(cache, b=3, sq=2)                  # a new batch of another size
    cache.crop(-1)
    with pytest.raises(ValueError, match="used after its pages changed"):
        meta.consume(None)
    with pytest.raises(ValueError, match="holds 3 rows; this forward has 2"):
        _direct(cache, b=2, sq=1, positions=torch.tensor([[1], [1]]))
    with pytest.raises(ValueError, match="4 padding tokens after its first 1 tokens"):
        _direct(cache, b=3, sq=5, positions=torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [0, 0, 0, 0, 1]]))


def test_crop_of_a_sliding_window_layer_beyond_its_last_forward_raises():
    cfg, _, _ = _config("mistral")            # window 4
    cfg = copy.deepcopy(cfg)
    cfg._attn_implementation = "layerzero"
    cache = lz.PagedKVCache(cfg, page_size=2)
    for step in range(8):
        sq = 6 if step == 0 else 1
        pos = torch.arange(sq).view(1, sq) + (0 if step == 0 else 5 + step)
        for layer in (0, 1):
            kw = {"position_ids": pos}
            cache.update(torch.randn(1, 2, sq, 16), torch.randn(1, 2, sq, 16), layer, kwargs=kw)
            kw["lz_paged"].consume(4)
    cache.crop(-1)
    with pytest.raises(ValueError, match="already dropped the keys its next query would see"):
        cache.crop(-5)
    assert cache.get_seq_length() == 12


def test_configs_it_cannot_page_and_bad_arguments():
    t5, _, _ = _config("t5")
    with pytest.raises(ValueError, match="encoder-decoder"):
        lz.PagedKVCache(t5)
    cfg = _llama_config()
    cfg.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(ValueError, match=r"sliding_attention layers; LlamaConfig has layers 1: linear_attention"):
        lz.PagedKVCache(cfg)
    with pytest.raises(TypeError, match="PreTrainedConfig"):
        lz.PagedKVCache({"num_hidden_layers": 2})
    with pytest.raises(ValueError, match="page_size=0; allowed: >= 1"):
        lz.PagedKVCache(_llama_config(), page_size=0)
    with pytest.raises(TypeError, match="num_pages must be an int or None, got str"):
        lz.PagedKVCache(_llama_config(), num_pages="8")
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        lz.PagedKVCache(_llama_config(), dtype=torch.int8)
    cache = lz.PagedKVCache(_llama_config(), dtype=torch.float16)
    with pytest.raises(ValueError, match="dtype=torch.float16.*keys are torch.float32"):
        _direct(cache)
    assert cache.get_seq_length() == 0 and cache.groups[0].step == 0      # nothing changed
    cache = lz.PagedKVCache(_llama_config())
    _direct(cache)
    with pytest.raises(ValueError, match="one lz.PagedKVCache serves one model"):
        cache.update(torch.randn(2, 4, 1, 16), torch.randn(2, 4, 1, 16), 0,
                     kwargs={"position_ids": torch.full((2, 1), 3)})
    cache = lz.PagedKVCache(_llama_config(), max_batch_size=2)
    with pytest.raises(ValueError, match="batch of 3 rows.*max_batch_size=2"):
        _direct(cache, b=3)
    with pytest.raises(TypeError, match="call crop / reset / reorder_cache"):
        cache.layers[0].crop(-1)
    with pytest.raises(ValueError, match="free: row 5 is not a row"):
        _direct(cache, b=2) and cache.free(5)
    kw = {}
    with pytest.raises(ValueError, match="without its attention kwargs"):
        cache.update(torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16), 0, kwargs=kw)
    with pytest.raises(ValueError, match=r"position_ids has shape \(2, 2, 1\)"):
        cache.update(torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16), 0,
                      kwargs={"position_ids": torch.zeros(2, 2, 1, dtype=torch.long)})


def test_a_model_whose_attention_is_not_layerzeros_is_refused():
    cfg, cls, _ = _config("llama")
    torch.manual_seed(0)
    m = cls._from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    ids, mask = _prompts()
    for built_from in (m.config, copy.deepcopy(cfg)):     # the model's config, or one naming none
        with pytest.raises(ValueError, match="attn_implementation='sdpa' \\(the model's\\)"):
            m.generate(ids, attention_mask=mask, cache=lz.PagedKVCache(built_from), max_new_tokens=2,
                       pad_token_id=0)
    # called from no model: the config decides, and an update whose metadata no attention read
    # is caught at the next update
    with pytest.raises(ValueError, match="the config the cache was built from"):
        _direct(lz.PagedKVCache(m.config))
    cache = lz.PagedKVCache(copy.deepcopy(cfg))
    pos = {"position_ids": torch.arange(3).expand(2, 3)}
    cache.update(torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 16), 0, kwargs=dict(pos))
    with pytest.raises(ValueError, match="did not read its page metadata"):
        cache.update(torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 16), 1, kwargs=dict(pos))


def test_layerzero_attention_refuses_what_pages_cannot_take():
    m = _model("llama")
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="output_attentions=True cannot be applied to paged K/V"):
        m.generate(ids, attention_mask=mask, cache=lz.PagedKVCache(m.config), max_new_tokens=2,
                   pad_token_id=0, output_attentions=True, return_dict_in_generate=True)
    q = torch.randn(1, 4, 1, 16)
    module = m.model.layers[0].self_attn
    with pytest.raises(ValueError, match="block_table, k_cache, v_cache"):
        hf.attention_forward(module, q, q, q, None, block_table=torch.zeros(1, 2, dtype=torch.int32),
                             k_cache=torch.zeros(2, 4, 2, 16), v_cache=torch.zeros(2, 4, 2, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")     # continuous batching's own indices: no unknown-kwarg warning
        hf.attention_forward(module, q, q, q, None, read_index=[torch.zeros(1)], write_index=[torch.zeros(1)],
                             logits_indices=torch.zeros(1))
