"""Crash isolation: an optional backend is first tried in a subprocess.

Some GPU packages take the whole process down instead of raising (a kernel built for another GPU
aborts, an ABI break segfaults), or import fine and then fail on first use (xFormers built for
another torch: "No operator found"). Before this process imports a module that has a probe, the
probe runs in a child Python: `import torch`, then the module's snippet (import + one tiny call on
the GPU when there is one). A child that crashes, exits or raises marks the module unavailable
with the reason; the verdict is cached on disk, keyed by the versions involved, so each machine
pays the probe once.

Backends declare probes with `define(module, code, dists)` at import (that only stores a
string); `registry.module_reason` calls `reason(module)` just before the first in-process import.
Nothing is probed at `import layerzero`.

Environment: LAYERZERO_PROBE=0 turns probing off; LAYERZERO_CACHE_DIR moves the cache (default
~/.cache/layerzero); LAYERZERO_PROBE_TIMEOUT (seconds, default 300: FlashInfer JIT-compiles).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading

# module -> (snippet, distribution names whose versions key the cache)
PROBES: dict[str, tuple[str, tuple[str, ...]]] = {}
NEEDS: dict[str, str] = {}   # module -> "cuda" | "cuda_or_interpreter" (Triton's CPU interpreter)
_lock = threading.Lock()
_MARK = "LAYERZERO_PROBE"

# The child runs this, then the snippet. `dev` is "cuda" when a GPU is visible, else None.
_PRELUDE = """
import sys, traceback
try:
    import torch
    dev = "cuda" if torch.cuda.is_available() else None
    sm = (lambda c: c[0] * 10 + c[1])(torch.cuda.get_device_capability()) if dev else 0
{body}
    if dev:
        torch.cuda.synchronize()
except BaseException as e:
    msg = (str(e).strip().splitlines() or [""])[0][:400]
    print("{mark}_FAIL " + type(e).__name__ + ": " + msg, flush=True)
    traceback.print_exc()
    sys.exit(3)
print("{mark}_OK", flush=True)
"""


def define(module: str, code: str, dists: tuple[str, ...] = (), *, needs: str | None = "cuda") -> None:
    """Probe `module` with `code` (Python run after `import torch`; `dev` and `sm` are set)
    before its first in-process import. `dists` are the distributions whose versions key the
    cached verdict. `needs="cuda"`: on a machine with no visible CUDA GPU the module is
    unavailable without probing or importing it ("cuda_or_interpreter": unless Triton's CPU
    interpreter is on, TRITON_INTERPRET=1; None: no such rule)."""
    if needs not in (None, "cuda", "cuda_or_interpreter"):
        raise ValueError(f"needs={needs!r}; allowed: None, 'cuda', 'cuda_or_interpreter'")
    PROBES[module] = (code, tuple(dists))
    if needs:
        NEEDS[module] = needs
    else:
        NEEDS.pop(module, None)


def enabled() -> bool:
    return os.environ.get("LAYERZERO_PROBE", "1").lower() not in ("0", "false", "no", "off")


def cache_path() -> str:
    root = os.environ.get("LAYERZERO_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "layerzero")
    return os.path.join(root, "probes.json")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _gpus() -> str:
    import torch

    if not torch.cuda.is_available():
        return "no-gpu"
    n = torch.cuda.device_count()
    return ";".join(f"{torch.cuda.get_device_name(i)}/sm{''.join(map(str, torch.cuda.get_device_capability(i)))}"
                    for i in range(n))


def key(module: str) -> str:
    """Cache key: module, probe code, Python/torch/CUDA/package versions and the GPUs."""
    import torch

    code, dists = PROBES[module]
    from . import __version__

    parts = [module, hashlib.sha1(code.encode()).hexdigest()[:12], platform.python_version(),
             torch.__version__, str(torch.version.cuda), __version__, _gpus()]
    parts += [f"{d}={_version(d)}" for d in dists]
    return "|".join(parts)


def _load() -> dict:
    try:
        with open(cache_path()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store(k: str, reason: str | None) -> None:
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = _load()
        data[k] = {"reason": reason}
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".probes-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs a re-probe next time


def run(module: str, timeout: float | None = None) -> tuple[str | None, bool]:
    """Run `module`'s probe in a child Python: (reason or None, whether to cache the verdict)."""
    code, _ = PROBES[module]
    body = "\n".join("    " + line for line in code.strip().splitlines())
    src = _PRELUDE.format(body=body, mark=_MARK)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # what this process sees
    env["LAYERZERO_PROBE"] = "0"                                    # no probes inside probes
    if timeout is None:
        timeout = float(os.environ.get("LAYERZERO_PROBE_TIMEOUT", "300"))
    try:
        p = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True,
                           timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return f"{module} probe timed out after {timeout:g} s (not cached; retried next process)", False
    except OSError:
        return None, False  # can't spawn: don't block the backend on our own failure
    out = p.stdout.splitlines()
    if p.returncode == 0 and f"{_MARK}_OK" in out:
        return None, True
    fail = [line[len(_MARK) + 6:] for line in out if line.startswith(f"{_MARK}_FAIL ")]
    if fail:
        detail = fail[-1]
    elif p.returncode < 0:
        try:
            name = signal.Signals(-p.returncode).name
        except ValueError:
            name = f"signal {-p.returncode}"
        detail = f"crashed ({name})"
    else:
        detail = f"exited with code {p.returncode}"
    tail = [line for line in p.stderr.strip().splitlines() if line.strip()]
    if not fail and tail:
        detail += f": {tail[-1][:300]}"
    return f"{module} failed its subprocess probe: {detail}", True


def _no_gpu_reason(module: str) -> str | None:
    need = NEEDS.get(module)
    if need is None:
        return None
    if need == "cuda_or_interpreter" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    import torch

    if torch.cuda.is_available():
        return None
    return (f"{module} needs a CUDA GPU and none is visible (torch {torch.__version__}, "
            f"torch.cuda.is_available() is False)")


def reason(module: str) -> str | None:
    """Why `module` can't be used: no GPU for a GPU-only module, or its (cached) probe failed.
    None when it passed, has no probe, is already imported here, or probing is off."""
    if module not in PROBES or module in sys.modules:
        return None
    why = _no_gpu_reason(module)
    if why or not enabled():
        return why
    with _lock:
        k = key(module)
        cached = _load().get(k)
        if isinstance(cached, dict) and "reason" in cached:
            return cached["reason"]
        why, persist = run(module)
        if persist:
            _store(k, why)
        return why


def clear() -> None:
    """Forget every cached verdict (the next use of each backend probes again)."""
    try:
        os.remove(cache_path())
    except OSError:
        pass
