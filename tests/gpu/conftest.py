"""GPU tests: run on the GPU host with `pytest -m gpu tests/gpu` (scripts/gpu_check.sh does).

Every test here is marked `gpu` and skipped where torch sees no CUDA device. Set
LZ_GPU_REPORT=path to get the attention grid's per-kernel table as JSON, and LZ_GPU_GRID=quick
for a smaller grid (one head_dim per dtype)."""
from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    here = __file__.rsplit("/", 1)[0]
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)
