import os

import pytest
import torch
from hypothesis import settings

# CI explores the same examples every run (no flaky discoveries on main); locally, random.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

import layerzero as lz
from layerzero import control, health, registry


@pytest.fixture(autouse=True)
def clean_state():
    """Every test starts with no policy, no locks, strict off, fresh metrics and breakers."""
    lz.configure(policy={}, strict=False)
    for op in ("attention", "rms_norm", "layer_norm", "rope", "swiglu", "geglu", "sample", "paged_attention"):
        lz.unlock(op)
    health.reset()
    lz.reset_metrics()
    torch.manual_seed(0)
    yield
    assert control.local.prefs == (), "a test leaked an lz.use() block"


@pytest.fixture
def temp_kernel():
    """Register kernels for a test and remove them afterwards."""
    added = []

    def add(op, kid, fn, **kw):
        lz.register(op, kid, fn, **kw)
        added.append(kid)
        return kid

    yield add
    for kid in added:
        registry.unregister(kid)
