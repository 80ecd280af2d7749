"""What a new user hit in dispatch (issue 12): bad data never opens a circuit breaker, torch's
control-flow exceptions pass through untouched, every op names a non-tensor argument, one new call
counts one selection, argument errors keep their type under torch.compile, explain shows an op's
own fields, the ops are typed."""
from __future__ import annotations

import importlib.resources
import inspect
import pathlib
import re
import typing

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import layerzero as lz
from layerzero import control, dispatch, health, ops, registry
from layerzero.call import CallSpec

NAN_LOGITS = torch.full((2, 10), float("nan"))




# ---- item 3: a user's input error never opens a breaker; the last resort is never cooled down --

def test_bad_data_does_not_open_the_breaker():
    for _ in range(health.threshold + 2):
        with pytest.raises(RuntimeError, match="probability tensor contains"):
            lz.sample(NAN_LOGITS)
    m = lz.metrics()
    assert m["fallbacks"] == {} and m["health"] == {} and health.state == {}
    out = lz.sample(torch.randn(2, 10))                       # a valid call runs
    assert out.shape == (2,) and lz.metrics()["calls"]["sample"] == {"reference.sample": 1}


def test_every_kernel_raising_marks_nobody(temp_kernel):
    def picky(logits, *rest):
        if torch.isnan(logits).any():
            raise RuntimeError("picky.sample: NaN logits")
        return logits.argmax(-1)

    temp_kernel("sample", "picky.sample", picky, priority=1000)
    for _ in range(health.threshold + 2):
        with pytest.raises(RuntimeError, match="picky.sample: NaN logits"):   # the first error
            lz.sample(NAN_LOGITS)
    assert lz.metrics()["fallbacks"] == {} and health.state == {}
    lz.sample(torch.randn(2, 10))
    assert lz.metrics()["calls"]["sample"] == {"picky.sample": 1}     # not cooled down


def test_reference_kernel_is_never_cooled_down(temp_kernel):
    """reference.sample raises on NaN logits; a kernel ranked after it copes: that is a fallback,
    counted, but the reference (every op's last resort) keeps being tried."""
    temp_kernel("sample", "lenient.sample",
                lambda logits, *rest: torch.zeros(logits.shape[0], dtype=torch.long), priority=-100)
    n = health.threshold + 3
    for _ in range(n):
        assert lz.sample(NAN_LOGITS).tolist() == [0, 0]
    m = lz.metrics()
    assert m["fallbacks"] == {"reference.sample": n}             # tried (and failed) every time
    assert m["calls"]["sample"] == {"lenient.sample": n} and m["health"] == {}


def test_strict_raises_the_input_error_itself_and_never_cools_down(temp_kernel):
    lz.configure(strict=True)
    with pytest.raises(RuntimeError, match="probability tensor contains"):   # no fallback happened
        lz.sample(NAN_LOGITS)

    def flaky(*args):
        raise RuntimeError("simulated kernel failure")

    temp_kernel("swiglu", "flaky.swiglu", flaky, priority=1000)
    g, u = torch.randn(2, 4), torch.randn(2, 4)
    for _ in range(health.threshold + 2):      # every call is an error: strict never skips it
        with pytest.raises(RuntimeError, match="strict mode: kernel flaky.swiglu raised"):
            lz.swiglu(g, u)
    assert lz.metrics()["fallbacks"] == {"flaky.swiglu": health.threshold + 2}


# ---- item 12: control-flow exceptions pass through: no fallback, no breaker mark ---------------

def test_gradient_checkpointing_non_reentrant():
    torch.manual_seed(0)
    w = torch.randn(16, requires_grad=True)
    x = torch.randn(4, 16, requires_grad=True)

    def f(x):
        h = lz.rms_norm(x, w)
        h = lz.swiglu(h, h * 0.5)
        return lz.rms_norm(h, w)

    f(x).sum().backward()
    want = (x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    lz.reset_metrics()
    checkpoint(f, x, use_reentrant=False).sum().backward()
    torch.testing.assert_close((x.grad, w.grad), want)
    m = lz.metrics()
    assert m["fallbacks"] == {} and m["health"] == {}


def test_control_flow_exception_propagates_untouched(temp_kernel):
    from torch.utils.checkpoint import _StopRecomputationError

    stop = _StopRecomputationError()

    def unwinds(*args):
        raise stop

    temp_kernel("swiglu", "unwinds.swiglu", unwinds, priority=1000)
    g, u = torch.randn(2, 4), torch.randn(2, 4)
    for _ in range(2):                                  # slow path, then the cached path
        with pytest.raises(_StopRecomputationError) as err:
            lz.swiglu(g, u)
        assert err.value is stop
    assert lz.metrics()["fallbacks"] == {} and lz.metrics()["calls"] == {} and health.state == {}


# ---- item 7: every op names a non-tensor (or unhashable) argument ------------------------------

X, W = torch.randn(2, 8), torch.randn(8)
Q = torch.randn(1, 2, 4, 8)
COS = SIN = torch.randn(4, 8)


@pytest.mark.parametrize("call, message", [
    (lambda: lz.rms_norm([1.0] * 8, W), "x must be a torch.Tensor, got list"),
    (lambda: lz.rms_norm(X, [1.0] * 8), "weight must be a torch.Tensor, got list"),
    (lambda: lz.rms_norm(X, W, residual=[0.0]), "residual must be a torch.Tensor, got list"),
    (lambda: lz.rms_norm(X, W, eps=[1e-6]), "eps must be a Python number, got list"),
    (lambda: lz.layer_norm(X, W, "bias"), "bias must be a torch.Tensor, got str"),
    (lambda: lz.layer_norm(3.0, W, None), "x must be a torch.Tensor, got float"),
    (lambda: lz.rope(Q, [Q], COS, SIN), "k must be a torch.Tensor, got list"),
    (lambda: lz.rope(Q, Q, COS.tolist(), SIN), "cos must be a torch.Tensor, got list"),
    (lambda: lz.swiglu(X, X.tolist()), "up must be a torch.Tensor, got list"),
    (lambda: lz.geglu(None, X), "gate must be a torch.Tensor, got NoneType"),
    (lambda: lz.sample([[0.1, 0.2]]), "logits must be a torch.Tensor, got list"),
    (lambda: lz.sample(X, temperature=[1.0]), "temperature must be a Python number, got list"),
    (lambda: lz.attention(Q, Q, Q, scale=[1.0]), "scale must be a Python number, got list"),
    (lambda: lz.attention(Q, Q.tolist(), Q), "k must be a torch.Tensor, got list"),
])
def test_non_tensor_arguments_raise_type_error_naming_them(call, message):
    with pytest.raises(TypeError, match=message):
        call()
    with pytest.raises(TypeError, match=message):   # and again, whatever was cached meanwhile
        call()


# ---- item 14: one new call, one selection; the hidden grad probe is not counted ----------------

def test_one_new_call_counts_one_selection(monkeypatch, temp_kernel):
    selects = []
    real = dispatch.select
    monkeypatch.setattr(dispatch, "select", lambda *a: selects.append(a[0].op) or real(*a))
    q = torch.randn(1, 2, 4, 8)
    lz.attention(q, q, q)                     # grad mode on, inputs need no grad
    assert lz.metrics()["selections"] == 1
    lz.attention(q, q, q)
    lz.rms_norm(X, W)
    lz.rms_norm(X, W)
    assert lz.metrics()["selections"] == 2
    assert selects.count("rms_norm") == 1     # no probe for an op whose key holds grad itself
    with torch.no_grad():
        lz.attention(q, q, q, is_causal=True)  # no probe: no call with this key can need grad
    assert selects.count("attention") == 3 and lz.metrics()["selections"] == 3
    lz.attention(q, q, q, scale=0.5)           # another raw key, the same description: nothing new
    assert selects.count("attention") == 3 and lz.metrics()["selections"] == 3
    qg = q.clone().requires_grad_()
    lz.attention(qg, q, q)                     # the probe said: the same kernel; no new decision
    assert lz.metrics()["selections"] == 3

    # A kernel without a backward: a call needing grad needs the decision the probe made; it is
    # counted then, once.
    temp_kernel("attention", "fwd_only.attn", lambda *a: torch.nn.functional.scaled_dot_product_attention(*a[:3]),
                priority=1000, supports=lambda s: ["no backward"] if s.grad else [])
    lz.reset_metrics()
    lz.attention(q, q, q)
    assert lz.metrics()["selections"] == 1
    lz.attention(qg, q, q).sum().backward()
    lz.attention(qg, q, q)
    m = lz.metrics()
    assert m["selections"] == 2 and m["calls"]["attention"] == {"fwd_only.attn": 1, "torch.sdpa": 2}


# ---- item 15: argument errors keep their type under torch.compile ------------------------------

@pytest.mark.parametrize("fullgraph", [False, True])
def test_compiled_argument_errors_keep_their_type(fullgraph, temp_kernel):
    def compiled(fn, *args):
        torch._dynamo.reset()
        return torch.compile(fn, backend="eager", fullgraph=fullgraph)(*args)

    with pytest.raises(ValueError, match=r"eps=-1.0 is out of range"):
        compiled(lambda x, w: lz.rms_norm(x, w, eps=-1.0), X, W)
    with pytest.raises(ValueError, match=r"weight has shape \(3,\)"):
        compiled(lambda x, w: lz.rms_norm(x, w[:3]), X, W)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        compiled(lambda x, w: lz.rms_norm(x, w, bogus=1), X, W)
    with pytest.raises(TypeError, match="has dtype torch.int64"):
        compiled(lambda g: lz.swiglu(g, g), torch.ones(2, 4, dtype=torch.long))
    temp_kernel("swiglu", "never.swiglu", lambda g, u: g, supports=lambda s: ["never runs"])
    lz.lock("swiglu", "never.swiglu")
    with pytest.raises(ValueError, match="locked to never.swiglu, which can't run this call: never"):
        compiled(lambda g: lz.swiglu(g, g), torch.randn(2, 4))
    lz.unlock("swiglu")
    torch.testing.assert_close(compiled(lambda x, w: lz.rms_norm(x, w), X, W), lz.rms_norm(X, W))


# ---- environment errors: every op call raises until the environment is fixed -------------------

def test_environment_error_makes_every_call_raise():
    lz.rms_norm(X, W)                                     # cached
    msg = "LAYERZERO_LOG='loud'; allowed: debug, info, warning, error, critical"
    old = getattr(control, "environment_error", None)
    control.environment_error = msg
    try:
        control.changed()
        for call in (lambda: lz.rms_norm(X, W), lambda: lz.attention(Q, Q, Q),
                     lambda: lz.sample(torch.randn(2, 10))):
            with pytest.raises(ValueError) as err:
                call()
            assert str(err.value) == msg
    finally:
        control.environment_error = old
        control.changed()
    lz.rms_norm(X, W)


# ---- item 19: explain shows the op's own fields ------------------------------------------------

def test_explain_of_a_norm_shows_norm_fields_only():
    d = lz.explain("rms_norm", X, W)
    fields = d.spec.as_dict()
    assert set(fields) == {"op", "device", "sm", "dtype", "batch", "head_dim", "grad", "flags"}
    text, rep = str(d), repr(d.spec)
    assert text.splitlines()[0].startswith("rms_norm on cpu, float32: batch=2, head_dim=8")
    for attention_field in ("num_heads", "layout", "causal", "seq_len", "mask", "window", "softcap"):
        assert attention_field not in text and attention_field not in rep
    assert eval(rep, {"CallSpec": CallSpec, "torch": torch}) == d.spec     # still a faithful repr
    a = lz.explain("attention", Q, Q, Q, is_causal=True)
    assert set(a.spec.as_dict()) == set(CallSpec._fields) - {"flags", "page_size"}
    assert "causal=True" in str(a).splitlines()[0]


# ---- item 20: typed ops, py.typed shipped ------------------------------------------------------

def test_ops_are_typed_and_py_typed_ships():
    assert importlib.resources.files("layerzero").joinpath("py.typed").is_file()
    pyproject = pathlib.Path(__file__).parents[1] / "pyproject.toml"
    if pyproject.is_file():                      # a source checkout: the wheel must ship it
        assert re.search(r'\[tool\.setuptools\.package-data\]\s*layerzero = \[[^]]*"py\.typed"',
                         pyproject.read_text())
    for name, fn in ops.PUBLIC.items():
        hints = typing.get_type_hints(fn)
        assert "return" in hints, name
        params = inspect.signature(fn).parameters
        assert set(params) <= set(hints), (name, set(params) - set(hints))
    assert typing.get_type_hints(lz.rms_norm)["x"] is torch.Tensor
    with pytest.raises(TypeError, match=r"^lz\.swiglu\(gate, up\): too many positional arguments"):
        lz.which("swiglu", X, X, X)                         # the signature as written
