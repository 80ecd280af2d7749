"""Telemetry: counts per op/kernel, cache hits/misses, selection latency in bounded memory, health
states; Prometheus text (checked with prometheus_client's parser), the metrics server, the
OpenTelemetry export; and the debug log of new decisions."""
from __future__ import annotations

import logging
import random
import sys
import urllib.request

import pytest
import torch

import layerzero as lz
from layerzero import control, dispatch, health, reference, registry, telemetry
from layerzero.call import CallSpec

parser = pytest.importorskip("prometheus_client.parser")


def families(text: str) -> dict:
    return {f.name: f for f in parser.text_string_to_metric_families(text)}


def qkv(s=4):
    return tuple(torch.randn(1, 2, s, 8) for _ in range(3))


def test_calls_hits_misses_and_selections():
    q, k, v = qkv()
    x, w = torch.randn(2, 8), torch.randn(8)
    for _ in range(3):
        lz.attention(q, k, v)
    lz.rms_norm(x, w)
    kid, rid = lz.which("attention", q, k, v), lz.which("rms_norm", x, w)   # decided already
    m = lz.metrics()
    assert m["calls"] == {"attention": {kid: 3}, "rms_norm": {rid: 1}}
    assert m["cache_misses"] == 2 and m["cache_hits"] == 2
    assert m["selections"] == 2                             # one per new call
    lat = m["selection_seconds"]
    assert lat["count"] == m["selections"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] and lat["sum"] > 0
    assert m["health"] == {}
    lz.reset_metrics()
    m = lz.metrics()
    assert m["calls"] == {} and m["selections"] == 0 and m["selection_seconds"]["p50"] is None
    lz.attention(q, k, v)                                   # cached: a hit, no new selection
    assert lz.metrics()["calls"] == {"attention": {kid: 1}}
    assert lz.metrics()["selections"] == 0


def test_metrics_format_is_checked():
    with pytest.raises(ValueError, match="format='xml'; allowed: 'dict', 'prometheus'"):
        lz.metrics(format="xml")


def test_latency_percentiles_are_close_and_memory_is_bounded():
    size = len(telemetry._buckets)
    rng = random.Random(0)
    samples = [rng.lognormvariate(-9, 1.0) for _ in range(200_000)]   # ~120 us median
    for s in samples:
        telemetry.record_selection(s)
    assert len(telemetry._buckets) == size == len(telemetry.BOUNDS) + 1
    assert sys.getsizeof(telemetry._buckets) < 1024 and len(telemetry._latency) == 2
    lat = lz.metrics()["selection_seconds"]
    assert lat["count"] == len(samples) and lat["max"] == max(samples)
    samples.sort()
    for q in ("p50", "p90", "p99"):
        true = samples[int(float(q[1:]) / 100 * len(samples))]
        assert true / 1.7 <= lat[q] <= true * 1.7, (q, lat[q], true)


def test_many_distinct_selections_stay_bounded():
    """More decisions for distinct call descriptions than the cache holds: caches, counters and the histogram stay
    within their bounds."""
    base = CallSpec("attention", "cpu", 0, torch.float32, 1, 2, 2, 4, 4, 8, 8)
    n = dispatch.MAX_ENTRIES + 1000
    for i in range(n):
        dispatch.decide(base._replace(seq_len_q=1 + i, seq_len_k=1 + i))
    m = lz.metrics()
    assert m["selections"] == n and m["selection_seconds"]["count"] == n
    assert len(dispatch.decisions) <= dispatch.MAX_ENTRIES
    assert len(telemetry._buckets) == len(telemetry.BOUNDS) + 1
    assert len(telemetry._live) <= 2 * dispatch.MAX_ENTRIES       # one per cache entry
    assert len(telemetry._calls) <= 2 * len(registry.all_kernels())  # (op, kernel, hit)


@pytest.fixture
def failing():
    """A top-priority attention kernel that always raises."""
    def kernel(*args):
        raise RuntimeError("simulated failure")

    lz.register("attention", "broken.attn", kernel, priority=10_000)
    yield "broken.attn"
    registry.unregister("broken.attn")
    health.reset()


def test_fallbacks_and_health_states(failing):
    q, k, v = qkv()
    with pytest.warns(RuntimeWarning):
        for _ in range(health.threshold):
            out = lz.attention(q, k, v)
    torch.testing.assert_close(out, reference.attention(q, k, v))
    m = lz.metrics()
    assert m["fallbacks"] == {failing: health.threshold}
    assert m["health"] == {failing: "open"}
    f = families(lz.metrics(format="prometheus"))
    assert [(s.labels, s.value) for s in f["layerzero_fallbacks"].samples] == [
        ({"kernel": failing}, health.threshold)]
    assert [(s.labels, s.value) for s in f["layerzero_kernel_health"].samples] == [
        ({"kernel": failing, "backend": "broken", "state": "open"}, 1.0)]


def test_prometheus_text_parses_and_matches_metrics():
    q, k, v = qkv()
    for _ in range(3):
        lz.attention(q, k, v)
    lz.attention(*qkv(s=6))
    text = lz.metrics(format="prometheus")
    f = families(text)
    assert all(name.startswith("layerzero_") for name in f)
    assert f["layerzero_calls"].type == "counter"
    calls = {(s.labels["op"], s.labels["kernel"]): s.value for s in f["layerzero_calls"].samples}
    m = lz.metrics()
    assert calls == {("attention", kid): n for kid, n in m["calls"]["attention"].items()}
    assert sum(calls.values()) == 4
    assert f["layerzero_cache_hits"].samples[0].value == m["cache_hits"] == 2
    assert f["layerzero_cache_misses"].samples[0].value == m["cache_misses"] == 2
    assert f["layerzero_selections"].samples[0].value == m["selections"]
    hist = f["layerzero_selection_seconds"]
    assert hist.type == "histogram"
    buckets = [s for s in hist.samples if s.name.endswith("_bucket")]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == m["selections"]
    assert [s.value for s in buckets] == sorted(s.value for s in buckets)   # cumulative
    count = next(s for s in hist.samples if s.name.endswith("_count"))
    assert count.value == m["selections"]


def test_label_values_are_escaped(failing):
    telemetry.count_fallback('odd"kernel\\with\nnewline')
    f = families(lz.metrics(format="prometheus"))
    assert {s.labels["kernel"] for s in f["layerzero_fallbacks"].samples} == {'odd"kernel\\with\nnewline'}


@pytest.mark.parametrize("use_client", [True, False], ids=["prometheus_client", "stdlib"])
def test_metrics_server_serves_the_text(use_client, monkeypatch):
    if not use_client:
        monkeypatch.setitem(sys.modules, "prometheus_client", None)   # as if not installed
    lz.attention(*qkv())
    kid = lz.which("attention", *qkv())
    server = lz.metrics_server(0)
    try:
        port = server.server_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            f = families(r.read().decode())
    finally:
        server.shutdown()
        server.server_close()
    calls = {(s.labels["op"], s.labels["kernel"]): s.value for s in f["layerzero_calls"].samples}
    assert calls == {("attention", kid): 1.0}


@pytest.mark.parametrize("use_client", [True, False], ids=["prometheus_client", "stdlib"])
def test_metrics_server_shutdown_frees_its_port(use_client, monkeypatch):
    if not use_client:
        monkeypatch.setitem(sys.modules, "prometheus_client", None)
    server = lz.metrics_server(0)
    port = server.server_port
    server.shutdown()
    server = lz.metrics_server(port)            # the same port again: it was released
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert r.status == 200
    finally:
        server.shutdown()
    server.shutdown()                           # twice is harmless


def test_metrics_server_checks_its_port():
    with pytest.raises(ValueError, match="port must be an int in 0..65535"):
        lz.metrics_server(70000)


def test_opentelemetry_export():
    sdk = pytest.importorskip("opentelemetry.sdk.metrics")
    export = pytest.importorskip("opentelemetry.sdk.metrics.export")
    reader = export.InMemoryMetricReader()
    provider = sdk.MeterProvider(metric_readers=[reader])
    try:
        lz.metrics_opentelemetry(provider)
        lz.metrics_opentelemetry(provider)                      # idempotent
        q, k, v = qkv(s=5)
        lz.attention(q, k, v)
        lz.attention(q, k, v)
        data = reader.get_metrics_data()
        points = {m.name: list(m.data.data_points)
                  for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
        calls = {(p.attributes["op"], p.attributes["kernel"]): p.value for p in points["layerzero.calls"]}
        assert calls == {("attention", lz.which("attention", q, k, v)): 2}
        assert points["layerzero.cache.hits"][0].value == 1
        assert points["layerzero.selection.duration"][0].count >= 1
    finally:
        telemetry._otel_histograms.clear()
        telemetry._otel_providers.clear()
        provider.shutdown()


def test_debug_log_shows_each_new_decision_with_rejection_reasons(caplog):
    with caplog.at_level(logging.DEBUG, logger="layerzero"):
        lz.attention(*qkv(s=7), softcap=None, is_causal=True)
        n = len(caplog.records)
        lz.attention(*qkv(s=7), is_causal=True)                 # cached: nothing new logged
    assert len(caplog.records) == n
    text = caplog.text
    assert "new decision in" in text and "seq_len_q=7" in text and "causal=True" in text
    assert "torch.sdpa_cudnn" in text and "rejected" in text and "needs a CUDA device" in text
    assert f"chosen: {lz.which('attention', *qkv(s=7), is_causal=True)}" in text


def test_layerzero_log_environment_variable(monkeypatch):
    log = logging.getLogger("layerzero")
    level, handlers = log.level, list(log.handlers)
    monkeypatch.setenv("LAYERZERO_LOG", "debug")
    try:
        control.load_environment()
        assert log.isEnabledFor(logging.DEBUG) and control.environment_error is None
        monkeypatch.setenv("LAYERZERO_LOG", "chatty")   # kept, not raised: see test_environment.py
        control.load_environment()
        assert "LAYERZERO_LOG='chatty' is not a log level; allowed: debug, info" in control.environment_error
        assert log.isEnabledFor(logging.DEBUG)          # the bad value was not applied
    finally:
        monkeypatch.delenv("LAYERZERO_LOG")
        control.load_environment()
        log.setLevel(level)
        log.handlers[:] = handlers
