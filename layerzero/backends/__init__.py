"""Built-in backends: importing this module registers their kernels. Each backend module imports
only torch at import time; optional packages are named in `requires` and imported on first use
(after a subprocess probe, see layerzero.probe)."""
from . import reference, torch_flex, torch_norm, torch_sdpa  # noqa: F401
from . import flash_attn, flashinfer, liger, triton_kernels, xformers  # noqa: F401
from . import flashinfer_paged, triton_paged  # noqa: F401  (lz.paged_attention)
