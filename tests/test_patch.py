"""The generic patch machinery (layerzero/patch.py) on plain torch modules: recognition by structure
and class tags checked by probes, reports, exact undo, accelerate-style hooks, post-import hooks."""
from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

import layerzero as lz
from layerzero import patch as _unused  # noqa: F401  (module import for sys.modules)

P = sys.modules["layerzero.patch"]


class MyRMSNorm(nn.Module):  # llama style
    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(n) + 0.5)
        self.variance_epsilon = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)


class OffsetRMSNorm(MyRMSNorm):  # gemma style: (1 + w)
    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (h * (1.0 + self.weight.float())).type_as(x)


class FakeRMSNorm(MyRMSNorm):  # the tag and the attributes, but not the computation
    def forward(self, x):
        return x * self.weight


class GatedMLP(nn.Module):
    def __init__(self, n=16, inter=24, act=None, fused=False):
        super().__init__()
        if fused:
            self.gate_up_proj = nn.Linear(n, 2 * inter, bias=False)
        else:
            self.gate_proj, self.up_proj = nn.Linear(n, inter), nn.Linear(n, inter)
        self.down_proj = nn.Linear(inter, n)
        self.act_fn = act or nn.SiLU()
        self.fused = fused

    def forward(self, x):
        if self.fused:
            g, u = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(u * self.act_fn(g))
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.n2, self.n3 = MyRMSNorm(16), OffsetRMSNorm(16), FakeRMSNorm(16)
        self.ln = nn.LayerNorm(16)
        self.mlp = GatedMLP()
        self.gelu_mlp = GatedMLP(act=nn.GELU(approximate="tanh"), fused=True)
        self.relu_mlp = GatedMLP(act=nn.ReLU())

    def forward(self, x):
        x = self.ln(self.n1(x) + self.n2(x) + self.n3(x))
        return self.mlp(x) + self.gelu_mlp(x) + self.relu_mlp(x)


def _model():
    torch.manual_seed(0)
    m = Block().eval()
    with torch.no_grad():
        m.ln.weight.uniform_(0.5, 1.5)
        m.ln.bias.uniform_(-0.5, 0.5)
    return m


def test_recognises_by_structure_and_probe():
    m = _model()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        ref = m(x)
    report = lz.patch(m)
    by = {i.name: i for i in report.items}
    assert by["n1"].status == "patched" and by["n1"].op == "rms_norm" and "offset=0" in by["n1"].detail
    assert by["n2"].status == "patched" and "offset=1" in by["n2"].detail
    assert by["n3"].status == "skipped" and "matches no LayerZero norm" in by["n3"].detail
    assert by["ln"].op == "layer_norm"
    assert by["mlp"].op == "swiglu"
    assert by["gelu_mlp"].op == "geglu" and "tanh" in by["gelu_mlp"].detail
    assert by["relu_mlp"].status == "skipped" and "neither SiLU nor GELU" in by["relu_mlp"].detail
    assert report.untouched["Linear"] == 8
    text = str(report)
    assert "skipped" in text and "n3" in text and "left as is" in text
    lz.reset_metrics()
    with torch.no_grad():
        out = m(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    calls = lz.metrics()["calls"]
    assert set(calls) == {"rms_norm", "layer_norm", "swiglu", "geglu"}, calls
    assert sum(calls["rms_norm"].values()) == 2
    lz.unpatch(m)
    with torch.no_grad():
        assert torch.equal(m(x), ref)
    assert not any(k in m.n1.__dict__ for k in ("forward", "_old_forward"))


def test_probes_do_not_count_or_select():
    m = _model()
    lz.reset_metrics()
    lz.patch(m)
    met = lz.metrics()
    assert met["calls"] == {} and met["selections"] == 0
    lz.unpatch(m)


def test_idempotent_and_options():
    m = _model()
    r = lz.patch(m)
    assert lz.patch(m) is r
    r2 = lz.patch(m, mlp=False)
    assert r2 is not r and all(i.kind != "mlp" for i in r2.items)
    assert "forward" not in m.mlp.__dict__  # the first patch was undone
    lz.unpatch(m)
    lz.unpatch(m)  # unpatching twice is a no-op
    with pytest.raises(TypeError, match="norm must be a bool"):
        lz.patch(m, norm="yes")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        lz.patch(object())


def test_mixed_dtypes_keep_the_module_semantics():
    norm = MyRMSNorm(8)
    lz.patch(norm)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    out = norm(x)  # fp32 weight * bf16 activations promotes to fp32 in the original
    assert out.dtype == torch.float32
    lz.unpatch(norm)


class _Hook:
    execution_device = torch.device("cpu")


def _attach_hook(module):
    """What accelerate.add_hook_to_module does: keep the forward in _old_forward, wrap it."""
    module._hf_hook = _Hook()
    module._old_forward = module.forward

    def new_forward(self, *a, **k):
        return self._old_forward(*a, **k)
    module.forward = types.MethodType(new_forward, module)
    return module.forward


def test_hooks_attached_before_or_after_patching():
    x = torch.randn(2, 16)
    m = MyRMSNorm(16)
    ref = m(x)
    wrapper = _attach_hook(m)
    lz.patch(m)
    assert m.forward is wrapper and m._old_forward.__name__ == "lz_rms_norm_forward"
    lz.reset_metrics()
    torch.testing.assert_close(m(x), ref)
    assert lz.metrics()["calls"]["rms_norm"]
    lz.unpatch(m)
    assert m.forward is wrapper and m._old_forward.__name__ == "forward"
    assert torch.equal(m(x), ref)

    m2 = MyRMSNorm(16)
    lz.patch(m2)
    wrapper = _attach_hook(m2)  # hooked after patching: the hook now calls our forward
    lz.unpatch(m2)
    assert m2.forward is wrapper and m2._old_forward.__name__ == "forward"
    assert torch.equal(m2(x), MyRMSNorm.forward(m2, x))


def test_with_globals_copies_through_decorators():
    """A copy of a (decorated) function reading some globals from a rebound module: the original
    function and its module are untouched; a decorator hiding what it wraps gives None."""
    import functools
    mod = types.ModuleType("lz_fake_modeling")
    exec(
        "import functools\n"
        "def helper(x):\n    return x + 1\n"
        "def deco(f):\n"
        "    @functools.wraps(f)\n"
        "    def wrapped(*a, **k):\n        return f(*a, **k) * 10\n"
        "    return wrapped\n"
        "@deco\n"
        "def forward(x):\n    return helper(x)\n", mod.__dict__)
    sys.modules[mod.__name__] = mod
    try:
        assert "helper" in P.global_names(mod.forward.__wrapped__.__code__)
        copy = P.with_globals(mod.forward, {"helper": lambda x: x - 1})
        assert copy(5) == 40 and mod.forward(5) == 60 and mod.helper(5) == 6
        assert sys.modules[copy.__wrapped__.__globals__["__name__"]].__dict__ is copy.__wrapped__.__globals__

        def hiding(f):
            @functools.wraps(f)
            def wrapped(*a, **k):
                return 0
            return wrapped
        assert P.with_globals(hiding(lambda x: x), {"helper": None}) is None
    finally:
        del sys.modules[mod.__name__]


def test_when_imported(tmp_path, monkeypatch):
    (tmp_path / "lz_hook_target.py").write_text("VALUE = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    P.when_imported("lz_hook_target", lambda m: seen.append(m.VALUE + 1))
    P.when_imported("lz_hook_target", lambda m: 1 / 0)  # a failing hook is logged, never raised
    assert seen == [] and "lz_hook_target" not in sys.modules
    import lz_hook_target  # noqa: F401
    assert seen == [42]
    P.when_imported("lz_hook_target", lambda m: seen.append("now"))  # already imported: runs now
    assert seen == [42, "now"]
    sys.modules.pop("lz_hook_target")
    assert "lz_hook_target" not in P._pending


def test_explain_plain_model():
    m = _model()
    lz.patch(m)
    with torch.no_grad():
        m(torch.randn(2, 5, 16))
    e = lz.explain(m)
    rows = {r["module"]: r for r in e.rows}
    assert rows["n1"]["kernels"][0]["kernel"] == lz.which("rms_norm", torch.randn(10, 16), m.n1.weight)
    assert "n1" in str(e)
    lz.unpatch(m)


def test_unpatch_and_explain_reasons_small_things():
    with pytest.raises(TypeError, match="lz.unpatch takes .* got NoneType"):
        lz.unpatch(None)
    lz.unpatch(nn.Linear(2, 2))        # an unpatched module: nothing to do
    reason = "needs head_dim a multiple of 8 and a CUDA device with compute capability 8.0 or newer"
    clipped = P._clip(reason)
    assert clipped.endswith(" ...") and reason.startswith(clipped[:-4]) and len(clipped) <= 74
    assert reason[len(clipped) - 4] == " "    # cut between words, never inside one
    assert P._clip("short reason") == "short reason"


def test_a_gated_norm_called_with_its_gate_runs_its_own_forward():
    """mamba2 / bamba / zamba2: `norm(x, gate)` is not a plain RMSNorm; the patched forward hands
    calls with more than the hidden states to the module's own forward (and the report says so)."""
    class GatedRMSNorm(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(n))
            self.variance_epsilon = 1e-6

        def forward(self, hidden_states, gate=None):
            x = hidden_states.float()
            if gate is not None:
                x = x * nn.functional.silu(gate.float())
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = GatedRMSNorm(16)

        def forward(self, x, g):
            return self.norm(x, g) + self.norm(x) + self.norm(x, gate=g)

    m, x, g = M(), torch.randn(2, 16), torch.randn(2, 16)
    want = m(x, g)
    report = lz.patch(m)
    (item,) = [i for i in report.items if i.kind == "norm"]
    assert item.status == "patched" and "calls passing gate run its own forward" in item.detail
    torch.testing.assert_close(m(x, g), want, atol=1e-6, rtol=1e-6)
    lz.unpatch(m)
