"""`lz.doctor()`: the machine, torch, and every backend's state with the reason when unusable."""
from __future__ import annotations

import importlib.metadata
import platform
from dataclasses import dataclass, field

import torch

from . import registry
from .inspect import kernels

# Optional packages LayerZero knows how to use (distribution name, import name).
OPTIONAL = (("flash-attn", "flash_attn"), ("flash-attn-4", "flash_attn.cute"),
            ("flashinfer-python", "flashinfer"), ("xformers", "xformers"),
            ("liger-kernel", "liger_kernel"), ("triton", "triton"),
            ("transformers", "transformers"), ("diffusers", "diffusers"))


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
    packages = []
    for dist, mod in OPTIONAL:
        version = _version(dist)
        if version is None:
            state = "not installed"
        else:
            reason = registry.module_reason(mod)
            state = "importable" if reason is None else reason
        packages.append((dist, version, state))
    return Report(system, packages, kernels())
