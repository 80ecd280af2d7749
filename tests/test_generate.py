"""lz.generate: transformers' generate() results from LayerZero's static-cache decode loop (CPU:
the same step as on CUDA, without the compile and the graph)."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

T = pytest.importorskip("transformers")

import layerzero as lz  # noqa: E402
from layerzero import generation as lzgen  # noqa: E402
from test_transformers import _build  # noqa: E402

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "mixtral", "gpt2"]
PROMPT = 7


def _batch(rows=3):
    """Left-padded prompts: row 1 has 2 pads, row 2 has 5."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (rows, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    if rows > 1:
        mask[1, :2] = 0
    if rows > 2:
        mask[2, :5] = 0
    ids[mask == 0] = 0
    return ids, mask


def _pair(family):
    ref, *_ = _build(family)
    return ref, copy.deepcopy(ref)


def _eos_that_stops(ref, ids, mask, gen):
    """EOS ids that stop rows 0 and 2 early, at different steps (read off a run without EOS)."""
    free = ref.generate(ids, attention_mask=mask, eos_token_id=None, **gen)
    return [int(free[0, PROMPT + 2]), int(free[2, PROMPT + 5])]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_identical_with_eos_on_a_left_padded_batch(family):
    """Sliding window (mistral, gemma2), softcap (gemma2), MoE (mixtral), partial RoPE (phi3),
    learned positions (gpt2): both routes give transformers' tokens, rows stopping at their EOS
    and padded after it."""
    ref, model = _pair(family)
    ids, mask = _batch()
    gen = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    eos = _eos_that_stops(ref, ids, mask, gen)
    want = ref.generate(ids, attention_mask=mask, eos_token_id=eos, **gen)
    assert (want[:, PROMPT:] == 0).any(), "the EOS ids should stop some row early"
    got = lz.generate(model, ids, attention_mask=mask, eos_token_id=eos, **gen)
    assert torch.equal(got, want)
    got = model.generate(ids, attention_mask=mask, eos_token_id=eos, custom_generate=lz.generate, **gen)
    assert torch.equal(got, want)
    from layerzero.patch import report
    assert report(model) is not None   # lz.generate patched it


def test_every_row_finishing_stops_the_loop_early():
    ref, model = _pair("llama")
    ids, mask = _batch(1)
    gen = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    free = ref.generate(ids, attention_mask=mask, eos_token_id=None, **gen)
    eos = int(free[0, PROMPT + 3])
    want = ref.generate(ids, attention_mask=mask, eos_token_id=eos, **gen)
    got = lz.generate(model, ids, attention_mask=mask, eos_token_id=eos, **gen)
    assert want.shape[1] < PROMPT + 12 and torch.equal(got, want)


def test_return_dict_scores_logits_min_new_tokens_and_max_length():
    ref, model = _pair("qwen2")
    ids, mask = _batch()
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    eos = _eos_that_stops(ref, ids, mask, gen)
    for extra in ({"min_new_tokens": 5}, {"max_length": PROMPT + 6, "max_new_tokens": None},
                  {"min_length": PROMPT + 4}):
        kw = {**gen, **extra, "eos_token_id": eos, "return_dict_in_generate": True,
              "output_scores": True, "output_logits": True}
        want = ref.generate(ids, attention_mask=mask, **kw)
        got = lz.generate(model, ids, attention_mask=mask, **kw)
        assert type(got) is type(want)
        assert torch.equal(got.sequences, want.sequences), extra
        assert len(got.scores) == len(want.scores) == len(got.logits) == len(want.logits)
        for a, b in zip(got.scores + got.logits, want.scores + want.logits):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_processors_and_criteria_outside_the_step_run_between_steps(caplog):
    """A repetition penalty and a user stopping criterion: transformers' own objects, run eagerly
    between steps (logged), with transformers' results."""
    ref, model = _pair("llama")
    ids, mask = _batch()

    class StopAfter(T.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] % 5 == 0

    gen = dict(max_new_tokens=9, do_sample=False, pad_token_id=0, eos_token_id=None,
               repetition_penalty=1.5, stopping_criteria=T.StoppingCriteriaList([StopAfter()]))
    want = ref.generate(ids, attention_mask=mask, **gen)
    with caplog.at_level(logging.INFO, logger="layerzero"):
        got = lz.generate(model, ids, attention_mask=mask, **gen)
    assert torch.equal(got, want)
    assert any("RepetitionPenaltyLogitsProcessor" in r.getMessage() and "between steps" in r.getMessage()
               for r in caplog.records)


def test_streamer_gets_the_tokens_as_transformers_streams_them():
    class Recorder(T.generation.streamers.BaseStreamer):
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended = True

    ref, model = _pair("llama")
    ids, mask = _batch(1)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    want = Recorder()
    ref.generate(ids, attention_mask=mask, streamer=want, **gen)
    for route in ("direct", "custom_generate"):
        got = Recorder()
        if route == "direct":
            lz.generate(model, ids, attention_mask=mask, streamer=got, **gen)
        else:
            model.generate(ids, attention_mask=mask, streamer=got, custom_generate=lz.generate, **gen)
        assert got.puts == want.puts and got.ended, route


def test_a_second_call_reuses_the_loop_with_another_prompt_length():
    ref, model = _pair("mistral")
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    ids, mask = _batch()
    lz.generate(model, ids, attention_mask=mask, **gen)
    loops = dict(lzgen._LOOPS[model])
    short_ids, short_mask = ids[:, 2:], mask[:, 2:]   # same batch and length bucket
    want = ref.generate(short_ids, attention_mask=short_mask, **gen)
    assert torch.equal(lz.generate(model, short_ids, attention_mask=short_mask, **gen), want)
    assert len(lzgen._LOOPS[model]) == 1 and list(lzgen._LOOPS[model].values()) == list(loops.values())


def test_kept_loops_go_with_the_model():
    """The loops (caches, graphs) are kept on the model: a model lz.generate ran is freed with its
    loops once the caller drops it, and a deepcopy starts without them."""
    import gc
    import weakref

    _, model = _pair("llama")
    model = copy.deepcopy(model)
    ids, mask = _batch()
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    lz.generate(model, ids, attention_mask=mask, **gen)
    assert len(lzgen._LOOPS[model]) == 1
    twin = copy.deepcopy(model)
    assert lzgen._LOOPS.get(twin) == {}
    assert torch.equal(lz.generate(twin, ids, attention_mask=mask, **gen), lz.generate(model, ids, attention_mask=mask, **gen))
    dead = [weakref.ref(model), weakref.ref(next(iter(lzgen._LOOPS[model].values())))]
    del model, twin
    gc.collect()
    assert [r() for r in dead] == [None, None]


def test_a_kept_loop_is_built_again_when_the_weights_moved():
    """A kept loop's graphs read the weights where they were at the capture: after `param.data =
    ...` (or `.to()`; lz.unpatch drops the loops outright), the next call builds a new loop
    instead of replaying the old one."""
    _, model = _pair("llama")
    model = copy.deepcopy(model)
    ids, mask = _batch()
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    want = lz.generate(model, ids, attention_mask=mask, **gen)
    (loop,) = lzgen._LOOPS[model].values()
    lz.generate(model, ids, attention_mask=mask, **gen)
    assert next(iter(lzgen._LOOPS[model].values())) is loop            # kept, reused
    w = model.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        w.data = w.data.clone()                                         # same values, new place
    assert torch.equal(lz.generate(model, ids, attention_mask=mask, **gen), want)
    (again,) = lzgen._LOOPS[model].values()
    assert again is not loop


def test_sampling_runs_through_lz_sample():
    _, model = _pair("llama")
    ids, mask = _batch()
    lz.reset_metrics()
    torch.manual_seed(0)
    out = lz.generate(model, ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=20,
                      top_p=0.9, temperature=0.8, pad_token_id=0)
    assert out.shape == (3, PROMPT + 5) and int(out.max()) < 128
    assert torch.equal(out[:, :PROMPT], ids)
    assert lz.metrics()["calls"]["sample"]


def test_lz_patch_false_leaves_the_model_unpatched():
    ref, model = _pair("llama")
    ids, mask = _batch()
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    got = lz.generate(model, ids, attention_mask=mask, lz_patch=False, **gen)
    from layerzero.patch import report
    assert report(model) is None
    assert torch.equal(got, ref.generate(ids, attention_mask=mask, **gen))


@pytest.mark.parametrize("option, says", [
    ({"num_beams": 2}, "num_beams=2"),
    ({"penalty_alpha": 0.6, "top_k": 4}, "penalty_alpha"),
    ({"output_attentions": True, "return_dict_in_generate": True}, "output_attentions"),
    ({"prefix_allowed_tokens_fn": lambda b, ids: [3, 4]}, "prefix_allowed_tokens_fn"),
    ({"cache_implementation": "offloaded"}, "cache_implementation='offloaded'"),
    ({"assistant_model": "draft"}, "assistant_model"),
])
def test_options_it_cannot_honour_raise(option, says):
    _, model = _pair("llama")
    ids, mask = _batch()
    option = dict(option)
    if option.get("assistant_model") == "draft":
        option["assistant_model"] = copy.deepcopy(model)
    for call in (lambda: lz.generate(model, ids, attention_mask=mask, max_new_tokens=3, **option),
                 lambda: model.generate(ids, attention_mask=mask, max_new_tokens=3,
                                        custom_generate=lz.generate, **option)):
        with pytest.raises(ValueError, match="model.generate") as e:
            call()
        assert says in str(e.value)


def test_encoder_decoder_and_embeddings_raise():
    t5, *_ = _build("t5")
    ids, mask = _batch()
    with pytest.raises(ValueError, match="encoder-decoder.*model.generate"):
        lz.generate(t5, ids, attention_mask=mask, max_new_tokens=3)
    _, model = _pair("llama")
    emb = model.get_input_embeddings()(ids)
    with pytest.raises(ValueError, match="inputs_embeds|input_ids"):
        lz.generate(model, inputs_embeds=emb, attention_mask=mask, max_new_tokens=3)
    with pytest.raises(TypeError, match="model"):
        lz.generate("not a model", ids)


def test_batch_buckets_fill_rows_that_never_show(monkeypatch):
    """A batch of 3 runs in a loop built for 4 (as CUDA graphs do; forced here on the CPU): the
    fourth row repeats the first, is finished from the start, and is cut from every output."""
    monkeypatch.setattr(lzgen, "_buckets", lambda device, plan: True)
    assert [lzgen.batch_bucket(n) for n in (1, 2, 3, 5, 64, 65, 130)] == [1, 2, 4, 8, 64, 128, 192]
    ref, model = _pair("qwen3")
    ids, mask = _batch()
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
               output_scores=True)
    eos = _eos_that_stops(ref, ids, mask, {k: v for k, v in gen.items() if k in ("max_new_tokens", "do_sample", "pad_token_id")})
    want = ref.generate(ids, attention_mask=mask, eos_token_id=eos, **gen)
    got = lz.generate(model, ids, attention_mask=mask, eos_token_id=eos, **gen)
    assert torch.equal(got.sequences, want.sequences)
    assert [s.shape for s in got.scores] == [s.shape for s in want.scores]
    (key,) = lzgen._LOOPS[model]
    assert key[0] == 4


def test_graphed_prefill_pads_the_prompt_to_its_bucket(monkeypatch, caplog):
    """Where the prefill is a CUDA graph (forced here on the CPU, where capturing fails), the
    prompt is left-padded to a multiple of PREFILL_BUCKET: same tokens, same streamed prompt, the
    padding cut from the result; the failed capture is logged and counted once per length."""
    monkeypatch.setattr(lzgen, "_buckets", lambda device, plan: True)
    ref, model = _pair("llama")
    ids, mask = _batch()
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    eos = _eos_that_stops(ref, ids, mask, gen)
    want = ref.generate(ids, attention_mask=mask, eos_token_id=eos, **gen)
    lz.reset_metrics()
    with caplog.at_level(logging.WARNING, logger="layerzero"):
        for _ in range(2):
            assert torch.equal(lz.generate(model, ids, attention_mask=mask, eos_token_id=eos, **gen), want)
    assert lz.metrics()["fallbacks"] == {lzgen.PREFILL_FALLBACK: 1}
    assert sum("capturing the prefill of 64 tokens" in r.getMessage() for r in caplog.records) == 1
    (loop,) = lzgen._LOOPS[model].values()
    assert list(loop.prefill_graphs) == [lzgen.PREFILL_BUCKET] and loop.prefill_graphs[64] is False


def test_traced_greedy_sampling_takes_the_first_maximum_in_two_stages():
    """Traced, lz.sample(temperature=0) reduces blocks of the row first (inductor runs a plain
    argmax over a long row in one program); the token is argmax's, ties to the first index."""
    from layerzero import reference

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    v = 5 * reference.ARGMAX_BLOCK + 37                       # padded to whole blocks
    logits = torch.randint(0, 50, (4, v), generator=g).float()
    logits[1, 7] = logits[1, v - 1] = 99.0                    # a tie: the first one wins
    logits[2, v - 1] = 99.0                                   # the maximum in the padded block
    logits[3] = -float("inf")
    traced = torch.compile(lambda x: lz.sample(x, temperature=0.0), backend="eager", fullgraph=True)
    got = traced(logits)
    assert torch.equal(got, logits.argmax(dim=-1))
    assert got.tolist()[1:] == [7, v - 1, 0]


def test_unpatch_drops_the_kept_loops(monkeypatch):
    """lz.unpatch(model) also forgets the decode loops lz.generate and lz.speculative_generate
    kept on it (their caches and graphs): nothing holds them afterwards, and the next call builds
    a new loop with the same tokens."""
    import gc
    import weakref

    from layerzero.speculative import graphs as spec_graphs

    monkeypatch.setattr(spec_graphs, "FIXED_ON_CPU", True)
    _, model = _pair("llama")
    model = copy.deepcopy(model)
    ids, mask = _batch()
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    want = lz.generate(model, ids, attention_mask=mask, **gen)
    lz.speculative_generate(model, None, ids, attention_mask=mask, prompt_lookup=2, **gen)
    held = [weakref.ref(next(iter(lzgen._LOOPS[model].values()))),
            weakref.ref(next(iter(spec_graphs._KEPT[model].values()))[1])]
    lz.unpatch(model)
    gc.collect()
    assert lzgen._LOOPS.get(model) is None and spec_graphs._KEPT.get(model) is None
    assert [r() for r in held] == [None, None]
    assert torch.equal(lz.generate(model, ids, attention_mask=mask, **gen), want)
    lz.unpatch(model)          # a model lz.generate patched and ran again: dropped again, no error
    assert lzgen._LOOPS.get(model) is None


def test_the_tuned_step_keeps_its_tuning_for_the_next_process(monkeypatch, tmp_path):
    """The batch-1 step's coordinate-descent tuning is kept in inductor's per-kernel best-config
    files; a process that hits an FX graph cache entry with the Triton kernels bundled into it
    tuned every kernel again (H200: 84-96 tuning runs per new process). lz.generate's compile
    options turn the bundle off for that step, and only there."""
    from torch._inductor import config, triton_bundler

    from layerzero.generation import loop

    seen = []
    begin = triton_bundler.TritonBundler.begin_compile.__func__

    def recording(cls):
        seen.append((config.coordinate_descent_tuning, triton_bundler.TritonBundler.is_enabled()))
        return begin(cls)

    monkeypatch.setattr(triton_bundler.TritonBundler, "begin_compile", classmethod(recording))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))   # a compile, not a cache hit
    torch._dynamo.reset()
    opts = loop.compile_options(lzgen.COMPILE_OPTIONS)
    torch.compile(lambda x: (x * 2).sin(), fullgraph=True, dynamic=False, **opts)(torch.ones(3))
    assert seen == [(True, False)]
    assert loop.compile_options(lzgen.COMPILE_OPTIONS_BATCHED) is lzgen.COMPILE_OPTIONS_BATCHED
    torch._dynamo.reset()
