"""Small helpers the GPU backends share: device/dtype reasons, Triton's CPU interpreter,
whether a call is plain eager (not traced), modules imported on first use."""
from __future__ import annotations

import functools
import importlib
import os

import torch

HALF = (torch.float16, torch.bfloat16)


# (torch >= 2.3 has torch.compiler.is_compiling; without it every call counts as traced)
_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: True)
_modes = getattr(torch._C, "_len_torch_dispatch_stack", None) or (lambda: 0)


def eager(t) -> bool:
    """A plain eager call: not traced by torch.compile/export, no dispatch mode active (make_fx,
    FakeTensorMode) and `t` a plain tensor (no fake/functional subclass). Only such a call may
    skip a custom op's dispatch, write into a fresh output in place, or use a cached tensor."""
    return type(t) is torch.Tensor and not _compiling() and not _modes()


def lazy_module(name: str):
    """A function returning module `name`, imported on its first call (kernel modules import
    triton, which `import layerzero` must not)."""
    return functools.cache(lambda: importlib.import_module(name))


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton runs kernels on the CPU (for tests; slow)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cuda_reasons(spec, name: str, *, min_sm: int = 80, dtypes=HALF, max_sm: int | None = None) -> list[str]:
    """Reasons a CUDA-only kernel can't run: device, compute capability and dtype."""
    r = []
    if spec.device != "cuda":
        return [f"{name} needs a CUDA device, the call is on {spec.device}"]
    if spec.sm < min_sm or (max_sm is not None and spec.sm > max_sm):
        need = f"sm{min_sm}" + (f"-sm{max_sm}" if max_sm is not None else "+")
        r.append(f"{name} needs {need}, this GPU is sm{spec.sm}")
    if spec.dtype not in dtypes:
        r.append(f"{name} takes {', '.join(map(dtype_name, dtypes))}, got {dtype_name(spec.dtype)}")
    return r


def triton_reasons(spec, name: str, dtypes=(torch.float16, torch.bfloat16, torch.float32)) -> list[str]:
    """Reasons a Triton kernel can't run: it needs CUDA, or the CPU under TRITON_INTERPRET=1."""
    r = []
    if spec.device != "cuda" and not (spec.device == "cpu" and interpreting()):
        r.append(f"{name} (Triton) needs a CUDA device (or TRITON_INTERPRET=1 on CPU), "
                 f"the call is on {spec.device}")
    if spec.dtype not in dtypes:
        r.append(f"{name} takes {', '.join(map(dtype_name, dtypes))}, got {dtype_name(spec.dtype)}")
    if spec.grad:
        r.append(f"{name} is forward-only here (inputs require grad)")
    return r
