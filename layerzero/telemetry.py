"""Counters behind `lz.metrics()`: calls per op and kernel, cache hits/misses, fallbacks, selection
latency, kernel health; and their export as Prometheus text, over HTTP, or to OpenTelemetry.

A cached call costs one `next()` on its cache entry's itertools.count (atomic, no lock);
everything else is counted under one lock, off the hot path. Memory is bounded: counters are keyed
by (op, kernel), latency goes into a fixed-size histogram, and live hit counters are one per
decision-cache entry (a bounded dict).
"""
from __future__ import annotations

import bisect
import itertools
import threading
import weakref

from . import health

lock = threading.RLock()   # re-entrant: a hit counter's finalizer may run while it is held
fallbacks: dict[str, int] = {}                  # kernel id that raised -> n
selections = 0
_calls: dict[tuple[str, str, bool], int] = {}   # (op, kernel id, decision-cache hit) -> n
_live: dict[int, tuple] = {}                    # id(counter) -> (hit key, counter, [baseline])

# Selection latency histogram: upper bounds in seconds, 100 ns .. 10 s, six per decade
# (neighbours at most 1.7x apart), plus one bucket above the last bound.
BOUNDS = tuple(float(f"{m}e{e}") for e in range(-7, 1) for m in (1, 1.5, 2, 3, 5, 7)) + (10.0,)
_buckets = [0] * (len(BOUNDS) + 1)
_latency = [0.0, 0.0]                           # [sum of seconds, max seconds]
_otel_histograms: list = []                     # OpenTelemetry histograms, once enabled


def count_call(key: tuple[str, str, bool]) -> None:
    """Count a call made through the slow path (a cache miss or a fallback)."""
    with lock:
        _calls[key] = _calls.get(key, 0) + 1


def _value(counter) -> int:
    return int(repr(counter)[6:-1])  # "count(N)": N is the number of next() calls so far


def hit_counter(entry) -> itertools.count:
    """A counter for the cached calls of one decision-cache entry. `next()` on it is atomic and
    lock-free (the hot path); when the entry is garbage-collected its count is folded in."""
    counter, base = itertools.count(), [0]
    with lock:
        _live[id(counter)] = (entry.hit_key, counter, base)
    weakref.finalize(entry, _retire, id(counter))
    return counter


def _retire(cid: int) -> None:
    with lock:
        key, counter, base = _live.pop(cid)
        _calls[key] = _calls.get(key, 0) + _value(counter) - base[0]


def record_selection(seconds: float) -> None:
    """Count one selection (a decision-cache miss) and the seconds it took."""
    global selections
    with lock:
        selections += 1
        _buckets[bisect.bisect_left(BOUNDS, seconds)] += 1
        _latency[0] += seconds
        if seconds > _latency[1]:
            _latency[1] = seconds
    for h in _otel_histograms:
        h.record(seconds)


def count_fallback(kernel_id: str) -> None:
    with lock:
        fallbacks[kernel_id] = fallbacks.get(kernel_id, 0) + 1


def _call_counts() -> dict:
    with lock:
        total = dict(_calls)
        for key, counter, base in list(_live.values()):
            total[key] = total.get(key, 0) + _value(counter) - base[0]
    return total


def _quantile(buckets: list[int], q: float, peak: float) -> float | None:
    """The q-quantile of a histogram, interpolated linearly inside its bucket (so within one
    bucket width, at most 1.7x, of the true value) and never above the largest value seen."""
    n = sum(buckets)
    if n == 0:
        return None
    rank, seen = q * n, 0
    for i, c in enumerate(buckets):
        if c and seen + c >= rank:
            lo = BOUNDS[i - 1] if i else 0.0
            hi = BOUNDS[i] if i < len(BOUNDS) else peak
            return min(lo + (hi - lo) * max(rank - seen, 0.0) / c, peak)
        seen += c
    return peak


def latency() -> dict:
    """Selection latency: count, sum, mean, p50/p90/p99 and max in seconds (None before any)."""
    with lock:
        buckets, (total, peak) = list(_buckets), tuple(_latency)
    n = sum(buckets)
    return {"count": n, "sum": total, "mean": total / n if n else None,
            "p50": _quantile(buckets, 0.5, peak), "p90": _quantile(buckets, 0.9, peak),
            "p99": _quantile(buckets, 0.99, peak), "max": peak if n else None}


def metrics(format: str = "dict"):
    """Everything counted since start or the last `reset()`.

    format="dict" (default): `{"calls": {op: {kernel_id: n}}, "selections": n, "cache_hits": n,
    "cache_misses": n, "fallbacks": {kernel_id: n}, "selection_seconds": {"count", "sum", "mean",
    "p50", "p90", "p99", "max"}, "health": {kernel_id: breaker state}}`.
    format="prometheus": the same as Prometheus text exposition (see `prometheus()`).
    """
    if format == "prometheus":
        return prometheus()
    if format != "dict":
        raise ValueError(f"format={format!r}; allowed: 'dict', 'prometheus'")
    return snapshot()


def snapshot() -> dict:
    """`metrics()` as a dict."""
    counts = _call_counts()
    with lock:
        fb, sel = dict(fallbacks), selections
    per_op: dict[str, dict[str, int]] = {}
    hits = misses = 0
    for (op, kid, hit), n in counts.items():
        if not n:   # entries whose hits were all before a reset
            continue
        per_op.setdefault(op, {})
        per_op[op][kid] = per_op[op].get(kid, 0) + n
        if hit:
            hits += n
        else:
            misses += n
    return {"calls": per_op, "selections": sel, "cache_hits": hits, "cache_misses": misses,
            "fallbacks": fb, "selection_seconds": latency(), "health": health.states()}


def reset() -> None:
    global selections
    with lock:
        for _, counter, base in _live.values():
            base[0] = _value(counter)
        _calls.clear()
        fallbacks.clear()
        selections = 0
        _buckets[:] = [0] * len(_buckets)
        _latency[:] = [0.0, 0.0]


# ---- Prometheus ------------------------------------------------------------------------------

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(v) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _sample(name: str, labels: dict, value) -> str:
    inner = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
    return f"{name}{{{inner}}} {value}" if inner else f"{name} {value}"


def prometheus() -> str:
    """Every metric in Prometheus text exposition format (0.0.4), names prefixed `layerzero_`."""
    m = snapshot()
    with lock:
        buckets, total = list(_buckets), _latency[0]
    out: list[str] = []

    def family(name, kind, help_, samples):
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(samples)

    family("layerzero_calls_total", "counter", "Op calls, by op and the kernel that ran them.",
           [_sample("layerzero_calls_total", {"op": op, "kernel": kid}, n)
            for op, per in sorted(m["calls"].items()) for kid, n in sorted(per.items())])
    family("layerzero_cache_hits_total", "counter", "Calls served from the decision cache.",
           [_sample("layerzero_cache_hits_total", {}, m["cache_hits"])])
    family("layerzero_cache_misses_total", "counter",
           "Calls that went through the slow path (validation, selection or fallback).",
           [_sample("layerzero_cache_misses_total", {}, m["cache_misses"])])
    family("layerzero_selections_total", "counter", "Kernel selections made (decision-cache misses).",
           [_sample("layerzero_selections_total", {}, m["selections"])])
    family("layerzero_fallbacks_total", "counter",
           "Kernel failures that fell back to the next eligible kernel, by failing kernel.",
           [_sample("layerzero_fallbacks_total", {"kernel": k}, n) for k, n in sorted(m["fallbacks"].items())])
    samples, cum = [], 0
    for bound, c in zip(BOUNDS + (float("inf"),), buckets):
        cum += c
        le = "+Inf" if bound == float("inf") else repr(bound)
        samples.append(_sample("layerzero_selection_seconds_bucket", {"le": le}, cum))
    samples += [_sample("layerzero_selection_seconds_sum", {}, repr(total)),
                _sample("layerzero_selection_seconds_count", {}, cum)]
    family("layerzero_selection_seconds", "histogram", "Time to select a kernel for a new call.", samples)
    family("layerzero_kernel_health", "gauge",
           "1 for each kernel with recorded failures, labelled with its circuit-breaker state "
           "(failing, open, half-open); kernels without failures are healthy and not listed.",
           [_sample("layerzero_kernel_health",
                    {"kernel": k, "backend": k.split(".", 1)[0], "state": s}, 1)
            for k, s in sorted(m["health"].items())])
    return "\n".join(out) + "\n"


def _serve_stdlib(port: int, addr: str):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.split("?", 1)[0] not in ("/", "/metrics"):
                self.send_error(404, "layerzero serves /metrics")
                return
            body = prometheus().encode()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # scrapes are not news
            pass

    server = ThreadingHTTPServer((addr, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="layerzero-metrics", daemon=True).start()
    return server


def _closing(server):
    """`server` whose `.shutdown()` also closes its socket: socketserver's stops the serving
    loop but leaves the port bound, so a new server on it would fail with EADDRINUSE."""
    stop = server.shutdown

    def shutdown():
        stop()
        server.server_close()

    server.shutdown = shutdown
    return server


class _Collector:
    """A prometheus_client collector that re-reads `prometheus()` on each scrape."""

    def collect(self):
        from prometheus_client.parser import text_string_to_metric_families
        return text_string_to_metric_families(prometheus())


def serve(port: int, addr: str = "127.0.0.1"):
    """Serve `prometheus()` at http://addr:port/metrics from a daemon thread: through
    prometheus_client when installed, else a small http.server. Returns the server (its
    `.server_port` is the port, useful with port=0; `.shutdown()` stops it and frees the port)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an int in 0..65535, got {port!r}")
    if not isinstance(addr, str):
        raise TypeError(f"addr must be a str, got {type(addr).__name__}")
    try:
        import prometheus_client
    except ImportError:
        return _closing(_serve_stdlib(port, addr))
    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    started = prometheus_client.start_http_server(port, addr, registry=registry)
    return _closing(started[0] if isinstance(started, tuple) else started)


# ---- OpenTelemetry ---------------------------------------------------------------------------

_otel_providers: list = []


def opentelemetry(meter_provider=None) -> None:
    """Report LayerZero's metrics through OpenTelemetry (needs opentelemetry-api): observable
    counters read `metrics()` only when the SDK collects, and selection latency goes to a
    histogram. `meter_provider` defaults to the global one. Idempotent per provider."""
    try:
        from opentelemetry import metrics as otel
    except ImportError:
        raise ImportError("OpenTelemetry export needs opentelemetry-api "
                          "(pip install opentelemetry-api opentelemetry-sdk)") from None
    from . import __version__

    provider = meter_provider if meter_provider is not None else otel.get_meter_provider()
    with lock:
        if any(p is provider for p in _otel_providers):
            return
        _otel_providers.append(provider)
    meter = provider.get_meter("layerzero", __version__)
    Obs = otel.Observation

    def calls(_options):
        return [Obs(n, {"op": op, "kernel": kid})
                for op, per in snapshot()["calls"].items() for kid, n in per.items()]

    def scalar(key):
        return lambda _options: [Obs(snapshot()[key])]

    def fallback(_options):
        return [Obs(n, {"kernel": k}) for k, n in snapshot()["fallbacks"].items()]

    def healths(_options):
        return [Obs(1, {"kernel": k, "state": s}) for k, s in health.states().items()]

    meter.create_observable_counter("layerzero.calls", [calls], "{call}",
                                    "Op calls, by op and the kernel that ran them")
    meter.create_observable_counter("layerzero.cache.hits", [scalar("cache_hits")], "{call}",
                                    "Calls served from the decision cache")
    meter.create_observable_counter("layerzero.cache.misses", [scalar("cache_misses")], "{call}",
                                    "Calls through the slow path")
    meter.create_observable_counter("layerzero.selections", [scalar("selections")], "{selection}",
                                    "Kernel selections made")
    meter.create_observable_counter("layerzero.fallbacks", [fallback], "{failure}",
                                    "Kernel failures that fell back, by failing kernel")
    meter.create_observable_gauge("layerzero.kernel.health", [healths], "1",
                                  "1 per kernel with recorded failures, by breaker state")
    try:  # bucket advice (opentelemetry-api >= 1.23): the SDK's default buckets suit milliseconds
        hist = meter.create_histogram("layerzero.selection.duration", "s",
                                      "Time to select a kernel for a new call",
                                      explicit_bucket_boundaries_advisory=list(BOUNDS))
    except TypeError:
        hist = meter.create_histogram("layerzero.selection.duration", "s",
                                      "Time to select a kernel for a new call")
    with lock:
        _otel_histograms.append(hist)
