"""Moved to `layerzero.patching.residual` (the pre-norm decoder block recogniser); this module
re-exports its names for code that imports `layerzero.patch_residual`."""
from __future__ import annotations

from .patching.residual import CHILDREN, mlp_residual, patch_blocks

__all__ = ["CHILDREN", "mlp_residual", "patch_blocks"]
