"""Runtime fallback: a chosen kernel that raises is logged, counted, cooled down (circuit
breaker) and the call still returns the right answer through the next candidate; strict mode
raises instead. Invalid input is an error, never a fallback."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch

import layerzero as lz
from layerzero import health, reference, registry


@pytest.fixture
def flaky():
    """A top-priority attention kernel that raises while `state['fail']` is set."""
    state = {"fail": True, "calls": 0}

    def kernel(*args):
        state["calls"] += 1
        if state["fail"]:
            raise RuntimeError("simulated kernel failure (e.g. an unsupported GPU)")
        return reference.attention(*args)

    lz.register("attention", "flaky.attn", kernel, priority=10_000)
    yield state
    registry.unregister("flaky.attn")


def _qkv():
    return tuple(torch.randn(1, 2, 5, 8) for _ in range(3))


def test_fallback_returns_right_answer_counts_and_logs(flaky, caplog):
    q, k, v = _qkv()
    assert lz.which("attention", q, k, v, is_causal=True) == "flaky.attn"
    with caplog.at_level(logging.WARNING, logger="layerzero"), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = lz.attention(q, k, v, is_causal=True)
        out2 = lz.attention(q, k, v, is_causal=True)          # cached path falls back too
    ref = reference.attention(q.double(), k.double(), v.double(), is_causal=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out2, out)
    m = lz.metrics()
    assert m["fallbacks"] == {"flaky.attn": 2}
    assert m["calls"]["attention"] == {"torch.sdpa": 2}           # the kernel that really ran
    assert "kernel flaky.attn raised RuntimeError" in caplog.text and "simulated kernel failure" in caplog.text
    assert sum("flaky.attn" in str(x.message) for x in w) == 1   # the Python warning is issued once


def test_strict_raises_instead(flaky):
    lz.configure(strict=True)
    with pytest.raises(RuntimeError, match="strict mode: kernel flaky.attn raised") as err:
        lz.attention(*_qkv())
    assert "simulated kernel failure" in str(err.value.__cause__)
    assert lz.metrics()["fallbacks"] == {"flaky.attn": 1}


def test_circuit_breaker_opens_then_half_opens(flaky, monkeypatch):
    q, k, v = _qkv()
    for _ in range(health.threshold + 4):
        lz.attention(q, k, v)
    # tried until the breaker opened, then skipped
    assert flaky["calls"] == health.threshold
    assert lz.metrics()["fallbacks"] == {"flaky.attn": health.threshold}
    assert health.states() == {"flaky.attn": "open"}
    assert lz.metrics()["calls"]["attention"] == {"torch.sdpa": health.threshold + 4}
    # after the cool-down one trial goes through; it succeeds and closes the breaker
    monkeypatch.setattr(health, "cooldown", 0.0)
    flaky["fail"] = False
    lz.attention(q, k, v)
    assert flaky["calls"] == health.threshold + 1 and health.states() == {}
    lz.attention(q, k, v)
    assert flaky["calls"] == health.threshold + 2
    assert lz.metrics()["calls"]["attention"]["flaky.attn"] == 2


def test_breaker_is_per_call_description(flaky):
    q, k, v = _qkv()
    for _ in range(health.threshold):
        lz.attention(q, k, v)
    flaky["fail"] = False
    other = [torch.randn(1, 2, 9, 8) for _ in range(3)]
    lz.attention(*other)                                   # another shape: not cooled down
    assert lz.metrics()["calls"]["attention"]["flaky.attn"] == 1


def test_kernel_failing_after_it_was_cached(flaky):
    flaky["fail"] = False
    q, k, v = _qkv()
    lz.attention(q, k, v)
    flaky["fail"] = True
    out = lz.attention(q, k, v)
    torch.testing.assert_close(out, reference.attention(q, k, v), atol=1e-5, rtol=1e-5)
    assert lz.metrics()["fallbacks"] == {"flaky.attn": 1}


def test_every_kernel_failing_raises_the_first_error(flaky):
    lz.lock("attention", "flaky.attn")
    with pytest.raises(RuntimeError, match="simulated kernel failure"):
        lz.attention(*_qkv())


def test_invalid_input_on_a_cached_key_is_an_error_not_a_fallback():
    q, k, v = _qkv()
    lz.attention(q, k, v)                                        # caches the key
    with pytest.raises(TypeError, match="v has dtype torch.float16 but q has torch.float32"):
        lz.attention(q, k, v.half())
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        lz.attention(q, k.to("meta"), v)
    lz.attention(q, k, v, softcap=3.0)                            # a kernel other than SDPA cached
    with pytest.raises(TypeError, match="k has dtype torch.bfloat16"):
        lz.attention(q, k.bfloat16(), v, softcap=3.0)
    assert lz.metrics()["fallbacks"] == {}


def test_breaker_records_are_bounded(flaky, monkeypatch):
    monkeypatch.setattr(health, "MAX_ENTRIES", 5)
    for s in range(1, 12):
        lz.attention(*(torch.randn(1, 2, s, 8) for _ in range(3)))
    assert len(health.state) == 5
