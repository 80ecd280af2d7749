"""`lz.doctor()`: the machine, torch, and every backend's state with the reason when unusable.

A kernel is listed as available when its modules import and it can run on a device this machine
has: its `supports()` accepts an ordinary call of its op (`sample_calls`: a prefill and a decode
attention call, a norm over 64 features, ..., in float32, bfloat16 and float16) on one of the
devices here. So a CUDA-only kernel is not "available" on a machine without CUDA, whatever its
name, and a plugin's kernel states its devices the same way, through its reasons.
"""
from __future__ import annotations

import functools
import importlib.metadata
import platform
from dataclasses import dataclass, field

import torch

from . import control, registry
from .inspect import KernelInfo, kernels

# Optional packages LayerZero knows how to use: (distribution, the module its kernels require,
# GPU compute capabilities its kernels are used on: (min, max) or None).
OPTIONAL = (("flash-attn", "flash_attn.flash_attn_interface", (80, None)),
            ("flash-attn-3", "flash_attn_interface", (90, 90)),
            ("flash-attn-4", "flash_attn.cute", (90, 119)),
            ("flashinfer-python", "flashinfer", (75, None)), ("xformers", "xformers.ops", (60, None)),
            ("liger-kernel", "liger_kernel.ops.rms_norm", None),
            ("triton", "layerzero.backends._triton_impl", None),
            ("transformers", "transformers", None), ("diffusers", "diffusers", None))


def _state(reason: str | None, sms, need) -> str:
    """A package's state in words: importable / ABI mismatch / ops don't load / import error /
    crashed / unsupported GPU / no GPU."""
    if reason is None:
        bad = [sm for sm in sms if need and (sm < need[0] or (need[1] is not None and sm > need[1]))]
        if bad:
            rng = f"sm{need[0]}" + (f"-sm{need[1]}" if need[1] else "+")
            return f"unsupported GPU: sm{bad[0]} (its kernels are used on {rng})"
        return "importable"
    low = reason.lower()
    if "undefined symbol" in low or "abi" in low or "was compiled against" in low:
        return f"ABI mismatch: {reason}"
    if "no operator found" in low:
        return f"installed, but its C++/CUDA ops don't load (built for another torch/Python): {reason}"
    if "crashed" in low:
        return f"crashes on use: {reason}"
    if "needs a cuda gpu" in low:
        return f"no CUDA GPU: {reason}"
    return f"import error: {reason}"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---- which devices a kernel runs on ------------------------------------------------------------

def devices() -> list[tuple[str, int]]:
    """(device type, sm) of each kind of device here: cpu; cuda once per compute capability
    (sm = capability x10); mps and xpu when torch has them."""
    here = [("cpu", 0)]
    if torch.cuda.is_available():
        sms = {a * 10 + b for a, b in map(torch.cuda.get_device_capability,
                                          range(torch.cuda.device_count()))}
        here += [("cuda", sm) for sm in sorted(sms)]
    mps, xpu = getattr(torch.backends, "mps", None), getattr(torch, "xpu", None)
    here += [("mps", 0)] * bool(mps is not None and mps.is_available())
    here += [("xpu", 0)] * bool(xpu is not None and xpu.is_available())
    return here


# op -> ordinary calls of it: (argument shapes, keyword arguments); a (shape, dtype) pair is an
# argument of that dtype (paged attention's int32 page table and lengths), not of the call's
_I32 = torch.int32
_CALLS = {
    "attention": [([(1, 4, 16, 64)] * 3, {"is_causal": True}),                      # prefill
                  ([(1, 4, 1, 64), (1, 4, 16, 64), (1, 4, 16, 64)], {})],            # decode
    "rms_norm": [([(2, 64), (64,)], {})],
    "layer_norm": [([(2, 64), (64,), (64,)], {})],
    "rope": [([(1, 4, 16, 64), (1, 4, 16, 64), (16, 64), (16, 64)], {})],
    "swiglu": [([(2, 64), (2, 64)], {})],
    "geglu": [([(2, 64), (2, 64)], {"approximate": "none"}), ([(2, 64), (2, 64)], {"approximate": "tanh"})],
    "sample": [([(2, 64)], {}), ([(2, 64)], {"top_k": 8})],
    "paged_attention": [([(1, 4, 16, 64), (4, 16, 4, 64), (4, 16, 4, 64), ((1, 4), _I32), ((1,), _I32)], {}),
                        ([(2, 4, 1, 64), (8, 16, 4, 64), (8, 16, 4, 64), ((2, 4), _I32), ((2,), _I32)], {})],
}


def _meta(shape, dtype: torch.dtype) -> torch.Tensor:
    if len(shape) == 2 and isinstance(shape[1], torch.dtype):
        shape, dtype = shape
    return torch.empty(shape, dtype=dtype, device="meta")


@functools.lru_cache(maxsize=None)
def sample_calls(op: str, device: str, sm: int) -> tuple:
    """CallSpecs of ordinary `op` calls on `device` (CUDA: of compute capability `sm`), in
    float32, bfloat16 and float16; built by the op's own validation from meta tensors (once:
    every kernel of the op is asked about the same calls)."""
    from . import ops

    specs = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shapes, kwargs in _CALLS[registry.check_op(op)]:
            args = [_meta(s, dtype) for s in shapes]
            spec, _ = ops.describe(op, args, kwargs)
            specs.append(spec._replace(device=device, sm=sm))
    return tuple(specs)


def _device_reason(k, here) -> str | None:
    """None when kernel `k` accepts some ordinary call on one of the devices `here`; else its
    reasons on each (those of the call it objects to least)."""
    per_device = []
    for device, sm in here:
        fewest = None
        for spec in sample_calls(k.op, device, sm):
            try:
                reasons = k.reasons(spec)
            except Exception as e:  # a broken supports() is reported, not raised
                reasons = [f"supports() raised {type(e).__name__}: {e}"]
            if not reasons:
                return None
            if fewest is None or len(reasons) < len(fewest):
                fewest = reasons
        per_device.append(f"{device}{f' sm{sm}' if sm else ''}: {'; '.join(fewest)}")
    return "runs on none of this machine's devices: " + "; ".join(per_device)


def kernel_rows(op: str | None = None) -> list[KernelInfo]:
    """`lz.kernels(op)`, where a kernel whose modules import but that runs on none of the
    devices here is unavailable too, with its reasons per device."""
    here = devices()
    rows = []
    for info in kernels(op):
        if info.available:
            why = _device_reason(registry.get(info.id), here)
            if why:
                info = info._replace(available=False, reason=why)
        rows.append(info)
    return rows


# ---- the report ---------------------------------------------------------------------------------

@dataclass
class Report:
    system: dict = field(default_factory=dict)
    packages: list = field(default_factory=list)   # (package, version or None, state)
    kernels: list = field(default_factory=list)    # KernelInfo
    problems: list = field(default_factory=list)   # what stops LayerZero from running, in words

    def as_dict(self) -> dict:
        return {"system": self.system,
                "packages": [dict(zip(("package", "version", "state"), p)) for p in self.packages],
                "kernels": [k._asdict() for k in self.kernels], "problems": self.problems}

    def __str__(self) -> str:
        lines = ["LayerZero doctor"]
        lines += [f"  {k:<14} {v}" for k, v in self.system.items()]
        lines.append("packages:")
        w = max(len(p[0]) for p in self.packages)
        lines += [f"  {p:<{w}}  {v or '-':<12} {s}" for p, v, s in self.packages]
        lines.append("kernels:")
        w = max(len(k.id) for k in self.kernels)
        for k in self.kernels:
            state = "available" if k.available else f"unavailable: {k.reason}"
            lines.append(f"  {k.id:<{w}}  {k.op:<11} {state}")
        if registry.entry_point_errors:
            lines.append("plugins that failed to load:")
            lines += [f"  {n}: {e}" for n, e in registry.entry_point_errors.items()]
        if self.problems:
            lines.append("problems (every op call raises until they are fixed):")
            lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


def doctor() -> Report:
    import layerzero

    system = {"layerzero": layerzero.__version__, "python": platform.python_version(),
              "platform": platform.platform(terse=True), "torch": torch.__version__,
              "cuda (torch)": torch.version.cuda or "-",
              "cuda available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cc = torch.cuda.get_device_capability(i)
            system[f"gpu {i}"] = f"{torch.cuda.get_device_name(i)} (sm{cc[0]}{cc[1]})"
        system["cudnn"] = torch.backends.cudnn.version()
    sms = [a * 10 + b for a, b in (torch.cuda.get_device_capability(i)
                                   for i in range(torch.cuda.device_count()))] if torch.cuda.is_available() else []
    packages = []
    for dist, mod, need in OPTIONAL:
        version = _version(dist)
        state = "not installed" if version is None else _state(registry.module_reason(mod), sms, need)
        packages.append((dist, version, state))
    return Report(system, packages, kernel_rows(), list(control.environment_errors.values()))
