"""No call waits for a FlashInfer JIT build: a variant that needs one is built on a background
thread while calls run the next kernel; then the next call selects FlashInfer. On the CPU, with
a FlashInfer stand-in whose JIT modules "compile" when the test says so."""
from __future__ import annotations

import importlib
import logging
import sys
import threading

import pytest
import torch

import layerzero as lz
warmup = importlib.import_module("layerzero.warmup")  # lz.warmup is the function
from layerzero.backends import flashinfer as fib
from backend_standins import flashinfer_module, module, use_standins

KERNELS = ("flashinfer.prefill", "flashinfer.decode", "flashinfer.rms_norm", "flashinfer.rope",
           "flashinfer.sample")


class Jit:
    """FlashInfer's JIT in miniature: `JitSpec(name).build_and_load()` loads a module that is
    on disk (`on_disk`) and otherwise builds it with `builder(name)` (which may block or raise),
    as flashinfer.jit.core.JitSpec does with nvcc."""

    def __init__(self):
        self.on_disk: set = set()
        self.builds: list = []
        self.release = threading.Event()
        self.started = threading.Event()            # a build began (on whichever thread)
        self.error: Exception | None = None
        jit = self

        class JitSpec:
            def __init__(self, name):
                self.name = name

            @property
            def is_compiled(self):
                return self.name in jit.on_disk

            def build_and_load(self):
                if self.name not in jit.on_disk:
                    jit.builds.append((self.name, threading.current_thread().name))
                    jit.started.set()
                    assert jit.release.wait(10), "test never released the build"
                    if jit.error is not None:
                        raise jit.error
                    jit.on_disk.add(self.name)
                return self

        self.JitSpec = JitSpec


def prefill_module_name(q, softcap, window_left):
    return f"single_prefill_{q.dtype}_d{q.shape[-1]}_swa{window_left >= 0}_cap{bool(softcap)}"


@pytest.fixture
def fi(monkeypatch):
    calls, jit = [], Jit()
    mod = flashinfer_module(calls)
    single = mod.single_prefill_with_kv_cache

    def single_prefill_with_kv_cache(q, k, v, logits_soft_cap=None, window_left=-1, **kw):
        jit.JitSpec(prefill_module_name(q, logits_soft_cap, window_left)).build_and_load()
        return single(q, k, v, logits_soft_cap=logits_soft_cap, window_left=window_left, **kw)

    mod.single_prefill_with_kv_cache = single_prefill_with_kv_cache
    core = module("flashinfer.jit.core", JitSpec=jit.JitSpec)
    mod.jit = module("flashinfer.jit", core=core)
    use_standins(monkeypatch, {"flashinfer": mod, "flashinfer.jit": mod.jit,
                               "flashinfer.jit.core": core}, KERNELS)
    monkeypatch.setattr(fib, "_standin_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(fib, "_plans", type(fib._plans)())
    monkeypatch.setattr(fib, "_workspaces", {})
    monkeypatch.setattr(fib, "WORKSPACE_BYTES", 1024)
    monkeypatch.setattr(warmup, "_builds", {})
    jit.calls = calls
    yield jit
    jit.release.set()                          # no build thread outlives its test
    warmup.warmup(timeout=10)


def qkv(d=64):
    g = torch.Generator().manual_seed(d)
    q = torch.randn(1, 4, 8, d, generator=g).half()
    k, v = (torch.randn(1, 2, 8, d, generator=g).half() for _ in range(2))
    return q, k, v


def ran(jit):
    """Calls of the test's q (4 heads; the stand-in calls of dry runs and builds have fewer)."""
    return sum(c["api"] == "single_prefill" and c["q"].shape[1] == 4 for c in jit.calls)


def test_a_call_never_waits_for_a_build(fi, caplog):
    q, k, v = qkv()
    kw = dict(softcap=20.0, is_causal=True)          # flashinfer.prefill's call once built
    with caplog.at_level(logging.INFO, logger="layerzero"):
        out = lz.attention(q, k, v, **kw)
        # the build can't end before the test releases it: the call returned without waiting
        assert fi.started.wait(10)                       # the thread may take a moment to start
        assert len(fi.builds) == 1 and not fi.release.is_set()
        assert fi.builds[0][1].startswith("layerzero-build")             # on a thread of its own
        first = lz.explain("attention", q, k, v, **kw)
        assert first.chosen != "flashinfer.prefill"
        reason = {c.kernel: c for c in first.candidates}["flashinfer.prefill"].reasons
        assert reason == [f"{_what(q)} is being built in the background (ready in a later call)"]
        lz.attention(q, k, v, **kw)                      # still building: still the next kernel
        assert ran(fi) == 0 and lz.metrics()["calls"]["attention"].get("flashinfer.prefill") is None
        fi.release.set()
        report = lz.warmup(timeout=10)                   # waits for the builds started
        assert report["built"] == [_what(q)] and not report["building"]
        again = lz.attention(q, k, v, **kw)
    assert lz.which("attention", q, k, v, **kw) == "flashinfer.prefill" and ran(fi) >= 1
    torch.testing.assert_close(again.float(), out.float(), atol=2e-2, rtol=2e-2)
    started = [r for r in caplog.records if "building it in the background" in r.getMessage()]
    assert len(started) == 1 and started[0].levelno == logging.WARNING
    assert sum("built in" in r.getMessage() for r in caplog.records) == 1


def _what(q):
    return ("FlashInfer variant prefill (float16, head_dim 64, causal, softcap, one request, "
            "HND k/v) on sm90")


def test_a_variant_on_disk_is_used_at_once(fi):
    q, k, v = qkv()
    fi.on_disk.add(prefill_module_name(q, 20.0, -1))
    lz.attention(q, k, v, softcap=20.0, is_causal=True)
    assert ran(fi) == 1 and not fi.builds
    assert lz.metrics()["calls"]["attention"] == {"flashinfer.prefill": 1}


def test_a_failed_build_becomes_the_reason(fi, caplog):
    q, k, v = qkv()
    fi.error = RuntimeError("nvcc: error: unsupported head_dim\nmore lines")
    fi.release.set()
    with caplog.at_level(logging.WARNING, logger="layerzero"):
        lz.attention(q, k, v, softcap=20.0)
        report = lz.warmup(timeout=10)
    why = f"{_what(q).replace('causal, ', '')} failed to build: RuntimeError: nvcc: error: unsupported head_dim"
    assert report["failed"] == {_what(q).replace("causal, ", ""): why.split(" failed to build: ")[1]}
    c = {c.kernel: c for c in lz.explain("attention", q, k, v, softcap=20.0).candidates}
    assert c["flashinfer.prefill"].status == "rejected" and c["flashinfer.prefill"].reasons == [why]
    assert sum("failed after" in r.getMessage() for r in caplog.records) == 1
    assert len(fi.builds) == 1                           # not retried by later calls


def test_warmup_builds_ahead_and_waits(fi):
    q, k, v = qkv()
    timer = threading.Timer(0.2, fi.release.set)
    timer.start()
    report = lz.warmup("attention", q, k, v, window=(3, 0), softcap=5.0)
    timer.join()
    what = ("FlashInfer variant prefill (float16, head_dim 64, causal, sliding window, softcap, "
            "one request, HND k/v) on sm90")
    assert report == {"built": [what], "ready": [], "failed": {}, "building": [],
                      "kernel": "flashinfer.prefill"}
    assert ran(fi) >= 1 and lz.metrics()["calls"]["attention"] == {"flashinfer.prefill": 1}
    assert lz.warmup("attention", q, k, v, window=(3, 0), softcap=5.0)["built"] == [what]


def test_warmup_timeout_returns_what_is_still_building(fi):
    q, k, v = qkv()
    report = lz.warmup("attention", q, k, v, softcap=5.0, timeout=0.1)
    assert report["building"] and report["kernel"] != "flashinfer.prefill"


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((), dict(timeout=-1), ValueError, "timeout"),
    ((), dict(timeout="1"), TypeError, "timeout"),
    (("attn",), {}, ValueError, "unknown op"),
    ((3,), {}, TypeError, "op name"),
])
def test_warmup_rejects_bad_arguments(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        lz.warmup(*args, **kwargs)


def test_nothing_is_built_while_tracing(fi, monkeypatch):
    q, k, v = qkv()
    monkeypatch.setattr(warmup, "tracing", lambda: True)
    c = {c.kernel: c for c in lz.explain("attention", q, k, v, softcap=20.0).candidates}
    assert "nothing is checked or built inside torch.compile" in c["flashinfer.prefill"].reasons[0]
    assert not fi.builds and warmup._builds == {}


def test_no_build_for_a_variant_another_kernel_wins(fi):
    q, k, v = qkv()
    lz.configure(policy={"deny": [{"kernel": "flashinfer.prefill"}]})
    lz.attention(q, k, v, softcap=20.0)
    assert not fi.builds
    c = {c.kernel: c for c in lz.explain("attention", q, k, v, softcap=20.0).candidates}
    assert "not started" in c["flashinfer.prefill"].reasons[0]


def test_without_flashinfer_installed_nothing_changes():
    if "flashinfer" not in sys.modules:
        q, k, v = qkv()
        assert lz.warmup("attention", q, k, v) == {"built": [], "ready": [], "failed": {},
                                                   "building": [], "kernel": lz.which("attention", q, k, v)}
