"""Crash isolation: a module with a probe is tried in a subprocess before this process imports
it; crashes, exits and exceptions become the kernel's "unavailable" reason, cached on disk."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import layerzero as lz
from layerzero import control, probe, registry


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A fresh probe cache, probing on, and fake modules on sys.path."""
    monkeypatch.setenv("LAYERZERO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LAYERZERO_PROBE", "1")
    monkeypatch.setattr(registry, "_module_reasons", {})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(probe, "PROBES", dict(probe.PROBES))
    monkeypatch.setattr(probe, "NEEDS", dict(probe.NEEDS))
    added = []

    def fake(name, body, code, **kw):
        (tmp_path / f"{name}.py").write_text(body)
        probe.define(name, code, needs=None, **kw)
        kid = f"probetest.{name}"
        registry.register("rms_norm", kid, lambda *a: None, priority=1000, requires=(name,))
        added.append(kid)
        return kid
    yield fake
    for kid in added:
        registry.unregister(kid)
    control.changed()


def _info(kid):
    return {k.id: k for k in lz.kernels("rms_norm")}[kid]


@pytest.mark.parametrize("body,code,expect", [
    ("import os\nos.abort()\n", "import {m}", "crashed (SIGABRT)"),               # dies on import
    ("def f():\n    import os\n    os._exit(7)\n", "import {m}\n{m}.f()", "exited with code 7"),
    ("def f():\n    raise RuntimeError('CUDA error: no kernel image is available')\n",
     "import {m}\n{m}.f()", "RuntimeError: CUDA error: no kernel image"),
])
def test_failing_probe_marks_unavailable_without_importing(sandbox, body, code, expect):
    name = f"lz_probe_fake_{abs(hash(body)) % 10**6}"
    kid = sandbox(name, body, code.format(m=name))
    info = _info(kid)
    assert not info.available and expect in info.reason, info.reason
    assert name not in sys.modules, "the module was imported in this process"
    x = torch.randn(2, 8)
    assert lz.which("rms_norm", x, torch.ones(8)) != kid       # selection skips it, no crash


def test_verdict_is_cached_on_disk(sandbox, monkeypatch):
    kid = sandbox("lz_probe_ok", "X = 1\n", "import lz_probe_ok\nassert lz_probe_ok.X == 1")
    assert _info(kid).available
    assert "lz_probe_ok" in sys.modules                         # passed: imported in-process
    monkeypatch.delitem(sys.modules, "lz_probe_ok")
    monkeypatch.setattr(registry, "_module_reasons", {})

    def no_subprocess(*a, **k):
        raise AssertionError("probe ran again despite the disk cache")
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    assert _info(kid).available
    probe.clear()
    monkeypatch.setattr(registry, "_module_reasons", {})
    monkeypatch.delitem(sys.modules, "lz_probe_ok")
    with pytest.raises(AssertionError, match="despite"):
        _info(kid)


def test_key_has_versions_and_gpus(sandbox):
    sandbox("lz_probe_key", "", "import lz_probe_key", dists=("torch",))
    key = probe.key("lz_probe_key")
    assert torch.__version__ in key and f"torch={torch.__version__.split('+')[0]}" in key.replace("+cpu", "")
    assert ("no-gpu" in key) != torch.cuda.is_available()


def test_probing_off_and_already_imported(sandbox, monkeypatch):
    kid = sandbox("lz_probe_off", "import os\nos.abort()\n", "import lz_probe_off")
    monkeypatch.setenv("LAYERZERO_PROBE", "0")
    assert probe.reason("lz_probe_off") is None                 # off: nothing is probed
    monkeypatch.setitem(sys.modules, "lz_probe_off", object())
    monkeypatch.setenv("LAYERZERO_PROBE", "1")
    assert probe.reason("lz_probe_off") is None                 # already imported here
    assert kid


def test_gpu_only_modules_need_no_probe_without_a_gpu(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for mod in ("flash_attn.cute", "flashinfer", "xformers.ops", "layerzero.backends._triton_impl"):
        if mod not in sys.modules:
            assert "needs a CUDA GPU" in probe.reason(mod)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert probe._no_gpu_reason("layerzero.backends._triton_impl") is None
    assert probe._no_gpu_reason("flashinfer") is not None


def test_import_layerzero_probes_nothing(tmp_path):
    code = ("import subprocess, layerzero\n"
            "from layerzero import probe, registry\n"
            "assert not registry._module_reasons, registry._module_reasons\n"
            "import os; assert not os.path.exists(probe.cache_path())\n")
    env = {**__import__("os").environ, "LAYERZERO_CACHE_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
