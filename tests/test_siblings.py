"""Sibling projections (q/k/v, gate/up) as one product (layerzero.patching.siblings), as
lz.generate's graphed steps run them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import layerzero as lz
from layerzero import generation as lzgen
from layerzero.patching import siblings
from layerzero.patching.record import Report

from test_generate import _batch, _eos_that_stops, _pair


class Attn(nn.Module):
    def __init__(self, bias=False, kv_bias=None):
        super().__init__()
        kv_bias = bias if kv_bias is None else kv_bias
        self.q_proj = nn.Linear(16, 16, bias=bias)
        self.k_proj = nn.Linear(16, 8, bias=kv_bias)
        self.v_proj = nn.Linear(16, 8, bias=kv_bias)

    def forward(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


def _fused(bias=True):
    torch.manual_seed(0)
    m = Attn(bias)
    want = [F.linear(torch.ones(1, 16), p.weight, p.bias) for p in (m.q_proj, m.k_proj, m.v_proj)]
    report, undo = Report("Attn"), []
    assert siblings.fuse(m, report, undo) == 1
    return m, want, report, undo


def test_fused_projections_share_one_weight_and_give_the_same_values():
    m, _, report, _ = _fused()
    w = m.q_proj.weight
    assert all(p.weight.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
               for p in (m.k_proj, m.v_proj))
    assert sum(p.numel() for p in m.parameters()) == (16 + 8 + 8) * (16 + 1)   # nothing added
    assert w.untyped_storage().nbytes() == (16 + 8 + 8) * 16 * 4                # the one matrix
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        got = m(x)
        for y, p in zip(got, (m.q_proj, m.k_proj, m.v_proj)):
            torch.testing.assert_close(y, F.linear(x, p.weight, p.bias))
        other = torch.randn(2, 3, 16)                      # not the input q saw: its own product
        torch.testing.assert_close(m.k_proj(other), F.linear(other, m.k_proj.weight, m.k_proj.bias))
    (item,) = report.items
    assert item.kind == "projections" and item.status == "patched"


def test_fusing_keeps_the_parameters_and_adds_no_memory():
    """The projections keep their Parameter objects (views of the fused matrix now) and nothing
    holds the storage they had: fusing adds no memory (undo once kept the old weights, doubling
    the q/k/v and gate/up weights while fused)."""
    torch.manual_seed(0)
    m = Attn(bias=True)
    params = [t for p in (m.q_proj, m.k_proj, m.v_proj) for t in (p.weight, p.bias)]
    old = {t.untyped_storage().data_ptr() for t in params}
    undo = []
    assert siblings.fuse(m, Report("Attn"), undo) == 1
    now = [t for p in (m.q_proj, m.k_proj, m.v_proj) for t in (p.weight, p.bias)]
    assert all(a is b for a, b in zip(now, params))                                # the same objects
    assert not old & {t.untyped_storage().data_ptr() for t in now}
    held = [v for fn in undo for v in (fn.__defaults__ or ()) + tuple(c.cell_contents for c in fn.__closure__ or ())
            if isinstance(v, torch.Tensor)]
    assert all(any(v is t for t in params) for v in held)       # undo names the module's own parameters only
    for fn in reversed(undo):
        fn()
    assert all(a is b for a, b in zip([t for p in (m.q_proj, m.k_proj, m.v_proj) for t in (p.weight, p.bias)],
                                      params))


def test_one_row_keeps_the_separate_products():
    m, _, _, _ = _fused()
    calls = []
    m.q_proj.__dict__["forward"].__func__.__closure__  # the swapped forward exists
    real = F.linear
    try:
        F.linear = lambda *a: calls.append(a[1].shape[0]) or real(*a)
        with torch.no_grad():
            m(torch.randn(1, 1, 16))
            assert sorted(calls) == [8, 8, 16]
            calls.clear()
            m(torch.randn(1, 2, 16))
            assert calls == [32]
    finally:
        F.linear = real


def test_a_traced_group_is_one_product():
    m, _, _, _ = _fused()
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(m, backend=backend, fullgraph=True)(torch.randn(2, 1, 16))
    assert [y.shape[-1] for y in out] == [16, 8, 8]
    (gm,) = graphs
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch._C._nn.linear]
    assert len(linears) == 1


def test_weights_replaced_after_fusing_are_used():
    m, _, _, _ = _fused()
    with torch.no_grad():
        m.v_proj.weight.data = torch.randn(8, 16)          # no longer a view of the fused matrix
        x = torch.randn(3, 16)
        torch.testing.assert_close(m(x)[2], F.linear(x, m.v_proj.weight, m.v_proj.bias))


def test_training_keeps_each_projections_own_product():
    m, _, _, _ = _fused()
    x = torch.randn(2, 16)
    sum(y.sum() for y in m(x)).backward()
    assert all(p.weight.grad is not None for p in (m.q_proj, m.k_proj, m.v_proj))


def test_undo_gives_back_separate_weights_and_forwards():
    m, want, _, undo = _fused()
    with torch.no_grad():
        m.k_proj.weight[0, 0] += 1.0                       # a change made while fused is kept
    kept = m.k_proj.weight.detach().clone()
    for fn in reversed(undo):
        fn()
    assert "forward" not in m.q_proj.__dict__
    ptrs = {p.weight.untyped_storage().data_ptr() for p in (m.q_proj, m.k_proj, m.v_proj)}
    assert len(ptrs) == 3
    torch.testing.assert_close(m.k_proj.weight, kept)
    torch.testing.assert_close(F.linear(torch.ones(1, 16), m.q_proj.weight, m.q_proj.bias), want[0])


def test_groups_that_differ_are_left_alone_with_the_reason():
    report = Report("Attn")
    assert siblings.fuse(Attn(bias=True, kv_bias=False), report, []) == 0
    (item,) = report.items
    assert item.status == "skipped" and "bias" in item.detail
    hooked = Attn()
    hooked.k_proj.register_forward_hook(lambda *a: None)
    report = Report("Attn")
    assert siblings.fuse(hooked, report, []) == 0 and "hooks" in report.items[0].detail


def test_graphed_generate_fuses_siblings_and_keeps_transformers_tokens(monkeypatch):
    """Where lz.generate's steps are CUDA graphs (forced here on the CPU, where capturing fails
    and the steps run eagerly), the patched model's q/k/v and gate/up run as one product each:
    the same tokens as transformers; lz.unpatch undoes it."""
    monkeypatch.setattr(lzgen, "_buckets", lambda device, plan: True)
    ref, model = _pair("qwen3")                        # q/k norms after the projections
    ids, mask = _batch()
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    eos = _eos_that_stops(ref, ids, mask, gen)
    want = ref.generate(ids, attention_mask=mask, eos_token_id=eos, **gen)
    assert torch.equal(lz.generate(model, ids, attention_mask=mask, eos_token_id=eos, **gen), want)
    fused = [i for i in lz.patch(model).items if i.kind == "projections"]
    layers = model.config.num_hidden_layers
    assert len(fused) == 2 * layers and all(i.status == "patched" for i in fused)
    lz.unpatch(model)
    assert "forward" not in model.model.layers[0].self_attn.q_proj.__dict__
    assert torch.equal(model.generate(ids, attention_mask=mask, eos_token_id=eos, **gen), want)
