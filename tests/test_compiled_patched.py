"""A patched model under torch.compile: LayerZero's bookkeeping adds no guard that eager calls
invalidate, and torch.flex chosen inside a compiled region traces into the graph (no nested
compile, no graph break)."""
from __future__ import annotations

import pytest
import torch

T = pytest.importorskip("transformers")

import layerzero as lz  # noqa: E402
from layerzero.backends._torch_version import TORCH  # noqa: E402

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _patched_llama():
    torch.manual_seed(0)
    model = T.LlamaForCausalLM._from_config(T.LlamaConfig(**SMALL)).eval()
    lz.patch(model)
    return model


def _ids(n):
    return torch.randint(3, 64, (1, n), generator=torch.Generator().manual_seed(n))


def test_eager_calls_do_not_invalidate_the_compiled_graph():
    """explain(model)'s per-module call sizes are not read while tracing: no guard on them."""
    import torch._dynamo

    torch._dynamo.reset()
    model = _patched_llama()
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
    with torch.no_grad():
        compiled(_ids(6), use_cache=False)
        model(_ids(9), use_cache=False)           # eager: notes new sizes in the modules
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled(_ids(6), use_cache=False)    # same shapes: the graph stands


@pytest.mark.skipif(TORCH < (2, 6), reason="FlexAttention on CPU needs torch >= 2.6")
@pytest.mark.parametrize("features", ["mask", "causal_window"])
def test_flex_inside_an_outer_compile_traces_into_the_graph(features):
    import torch._dynamo

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 16, 16, generator=g) for _ in range(3))
    mask = torch.rand(1, 1, 16, 16, generator=g) > 0.3
    mask[..., 0] = True
    kw = (dict(attn_mask=mask, softcap=20.0) if features == "mask"
          else dict(is_causal=True, window=(4, 0), softcap=20.0))       # a block mask

    def f(q, k, v):
        return lz.attention(q, k, v, **kw)

    ref = lz.attention(q.double(), k.double(), v.double(), **kw)
    with lz.use("torch.flex"):
        out = torch.compile(f, backend="eager", fullgraph=True)(q, k, v)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_a_plain_causal_mask_is_none_while_compiling():
    """Under torch.compile, a prefill with no padding mask gets no materialised causal mask (the
    attention runs with is_causal=True); a padding mask, a window or a cache offset keep one."""
    from transformers import masking_utils

    import layerzero.integrations.transformers  # noqa: F401  (registers the mask function)
    fn = masking_utils.AttentionMaskInterface._global_mapping["layerzero"]

    def probe(**kw):
        @torch.compile(backend="eager", fullgraph=True)
        def f(x):
            m = fn(batch_size=2, q_length=8, kv_length=8, device="cpu", **kw)
            return x if m is None else x + m.float().sum()
        return float(f(torch.zeros(())))

    assert probe() == 0.0
    pad = torch.ones(2, 8, dtype=torch.bool)
    pad[1, :3] = False
    assert probe(attention_mask=pad) > 0
    assert probe(local_size=4, mask_function=masking_utils.sliding_window_causal_mask_function(4)) > 0
