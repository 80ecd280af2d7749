"""Built-in backends: importing this module registers their kernels. Each backend module imports
only torch at import time; optional packages are named in `requires` and imported on first use."""
from . import reference, torch_flex, torch_norm, torch_sdpa  # noqa: F401
