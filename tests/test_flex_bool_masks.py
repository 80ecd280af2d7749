"""torch.flex takes a caller's bool mask as a block mask (empty tiles skipped, full tiles run
without reading it), combined with causal / window patterns; one block mask per mask object.
Eager FlexAttention in float64 against the exact reference (the compiled program is the same
code; compiling on the CPU costs seconds)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from layerzero import reference
from layerzero.backends import torch_flex

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch.nn.attention.flex_attention") is None,
                                reason="no FlexAttention in this torch")
F64 = torch.float64


@pytest.fixture(autouse=True)
def _eager_flex(monkeypatch):
    monkeypatch.setattr(torch_flex, "_compiled", lambda config: torch_flex._run_flex)
    torch_flex._LAST_BOOL.clear()


def _qkv(b, h, sq, sk, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, sq, d, generator=g, dtype=F64), torch.randn(b, h, sk, d, generator=g, dtype=F64),
            torch.randn(b, h, sk, d, generator=g, dtype=F64))


def _left_padded_causal(lengths, s):
    """transformers' prefill mask: (B, 1, S, S) causal, left padding masked as keys."""
    keys = torch.arange(s)[None] >= (s - torch.tensor(lengths))[:, None]          # (B, S)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    return causal[None, None] & keys[:, None, None, :]


def _flex(q, k, v, mask, causal=False, align="top_left", window=None):
    return torch_flex.flex(q, k, v, mask, causal, None, 0.0, window, None, None, None, "bhsd", align)


def _check(out, q, k, v, mask, causal=False, align="top_left"):
    exact = reference.attention(q, k, v, mask, causal, None, 0.0, None, None, None, None, "bhsd", align)
    rows = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]).any(-1) if mask is not None else None
    err = ((out - exact).abs().amax(-1) * rows).max().item()   # rows that attend to something
    assert err < 1e-12, f"error {err:.2g}"


def test_left_padded_causal_prefill_skips_the_empty_tiles():
    s, lengths = 300, [300, 170, 40]
    q, k, v = _qkv(3, 2, s, s)
    mask = _left_padded_causal(lengths, s)
    _check(_flex(q, k, v, mask), q, k, v, mask)
    bm = torch_flex._bool_block_mask((False, None, 0), mask.expand(3, 2, s, s), s, s, q.device)
    tiles = -(-s // 128)
    assert bm.kv_num_blocks.shape[0] == 3 and bm.kv_num_blocks.shape[1] == 1   # heads stay broadcast
    assert int(bm.kv_num_blocks.sum()) + int(bm.full_kv_num_blocks.sum()) < 3 * tiles * tiles
    assert int(bm.full_kv_num_blocks.sum()) > 0        # tiles the mask fills run without reading it


def test_key_padding_with_causal_bottom_right_and_per_head_masks():
    q, k, v = _qkv(2, 3, 140, 260, seed=1)
    keys = torch.ones(2, 1, 1, 260, dtype=torch.bool)
    keys[1, ..., :90] = False
    out = _flex(q, k, v, keys, causal=True, align="bottom_right")
    exact = reference.attention(q, k, v, keys, True, None, 0.0, None, None, None, None, "bhsd", "bottom_right")
    assert (out - exact).abs().max().item() < 1e-12
    heads = torch.rand(2, 3, 140, 260, generator=torch.Generator().manual_seed(2)) > 0.4
    _check(_flex(q, k, v, heads), q, k, v, heads)


def test_one_block_mask_per_mask_object_and_a_new_one_when_it_changes():
    s = 200
    q, k, v = _qkv(2, 2, s, s, seed=3)
    mask = _left_padded_causal([200, 77], s)
    _flex(q, k, v, mask)
    first = torch_flex._LAST_BOOL[0][3]
    _flex(q, k, v, mask)                       # the next layer: the same mask object
    assert torch_flex._LAST_BOOL[0][3] is first
    mask[1, ..., :150] = False                 # changed in place: its version moved
    out = _flex(q, k, v, mask)
    assert torch_flex._LAST_BOOL[0][3] is not first
    _check(out, q, k, v, mask)
