"""`lz.doctor()`: the machine, torch, and every backend's state with the reason when unusable."""
from __future__ import annotations

import importlib.metadata
import platform
from dataclasses import dataclass, field

import torch

from . import registry
from .inspect import kernels

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


@dataclass
class Report:
    system: dict = field(default_factory=dict)
    packages: list = field(default_factory=list)   # (package, version or None, state)
    kernels: list = field(default_factory=list)    # KernelInfo

    def as_dict(self) -> dict:
        return {"system": self.system,
                "packages": [dict(zip(("package", "version", "state"), p)) for p in self.packages],
                "kernels": [k._asdict() for k in self.kernels]}

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
    return Report(system, packages, kernels())
