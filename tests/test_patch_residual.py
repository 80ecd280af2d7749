"""Residual adds of pre-norm decoder layers folded into the norm and the down projection
(layerzero/patch_residual.py), on plain torch modules shaped like transformers' decoder layers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import layerzero as lz
from layerzero import patch_residual
from test_patch import MyRMSNorm as RMSNorm  # llama-style RMSNorm

H, I = 32, 64


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(H, I, bias=False), nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.o_proj = nn.Linear(H, H, bias=False)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        s = 1.0 if position_embeddings is None else position_embeddings
        return self.o_proj(torch.tanh(hidden_states) * s), None


class DecoderLayer(nn.Module):      # transformers' llama decoder layer, in miniature
    def __init__(self):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(H), RMSNorm(H)
        self.self_attn, self.mlp = Attention(), MLP()
        self.drop = nn.Dropout(0.5)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        residual = hidden_states
        h, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
                              position_embeddings=position_embeddings, **kwargs)
        h = residual + self.drop(h)
        residual = h
        return residual + self.mlp(self.post_attention_layernorm(h))


class ExtraNormLayer(DecoderLayer):  # gemma2-like: another norm after the attention
    def __init__(self):
        super().__init__()
        self.post_attn_extra = RMSNorm(H)

    def forward(self, hidden_states, **kwargs):
        h, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        h = hidden_states + self.post_attn_extra(h)
        return h + self.mlp(self.post_attention_layernorm(h))


class RenamingLayer(DecoderLayer):   # hands attention another argument than it was given
    def forward(self, hidden_states, position_embeddings=None, **kwargs):
        h, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states),
                              position_embeddings=None, **kwargs)
        h = hidden_states + h
        return h + self.mlp(self.post_attention_layernorm(h))


class Stack(nn.Module):
    def __init__(self, cls=DecoderLayer, n=2):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([cls() for _ in range(n)])

    def forward(self, x, **kw):
        for layer in self.layers:
            x = layer(x, **kw)
        return x


def _item(report, name="layers.0"):
    return next(i for i in report.items if i.kind == "residual" and i.name == name)


def test_prenorm_layers_fold_both_residual_adds_and_match():
    model = Stack().eval()
    x = torch.randn(2, 5, H)
    with torch.no_grad():
        want = model(x, position_embeddings=0.5)
    rep = lz.patch(model)
    item = _item(rep)
    assert item.status == "patched" and "down_proj GEMM" in item.detail, str(rep)
    calls = []
    real = torch.Tensor.addmm_
    lz.reset_metrics()
    try:
        torch.Tensor.addmm_ = lambda *a, **k: calls.append(1) or real(*a, **k)
        with torch.no_grad():
            got = model(x, position_embeddings=0.5)
    finally:
        torch.Tensor.addmm_ = real
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(calls) == 2                                  # one down projection per layer, in place
    xg = x.clone().requires_grad_()                         # grad mode and inputs needing grad:
    with torch.enable_grad():                               # out of place, backward works
        model(xg, position_embeddings=0.5).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    assert lz.metrics()["calls"]["rms_norm"]               # the fused norms ran through LayerZero
    lz.unpatch(model)
    assert "forward" not in vars(model.layers[0])
    with torch.no_grad():
        assert torch.equal(model(x, position_embeddings=0.5), want)


def test_training_mode_keeps_the_layers_own_forward():
    model = Stack().eval()
    lz.patch(model)
    model.train()
    torch.manual_seed(3)
    x = torch.randn(2, 5, H)
    a = model.layers[0](x)
    lz.unpatch(model)
    torch.manual_seed(3)
    torch.randn(2, 5, H)
    assert torch.equal(model.layers[0](x), a)              # same dropout draws: the original ran


@pytest.mark.parametrize("cls,why", [(ExtraNormLayer, "forward is not"),
                                     (RenamingLayer, "other arguments")])
def test_other_layers_are_skipped_with_the_reason(cls, why):
    model = Stack(cls).eval()
    x = torch.randn(2, 5, H)
    with torch.no_grad():
        want = model(x, position_embeddings=0.5)
    rep = lz.patch(model)
    item = _item(rep)
    assert item.status == "skipped" and why in item.detail, item.detail
    with torch.no_grad():
        torch.testing.assert_close(model(x, position_embeddings=0.5), want, atol=1e-5, rtol=1e-5)
    lz.unpatch(model)


def test_unpatched_norms_leave_layers_alone():
    model = Stack().eval()
    rep = lz.patch(model, norm=False)
    assert not [i for i in rep.items if i.kind == "residual"]
    lz.unpatch(model)


def test_mlp_residual_without_lz_mlp_is_an_add():
    mlp, x, h = MLP(), torch.randn(3, H), torch.randn(3, H)
    with torch.no_grad():
        torch.testing.assert_close(patch_residual.mlp_residual(mlp, x, h), h + mlp(x))

