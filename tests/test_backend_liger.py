"""Liger adapters. Liger's rope runs for real on the CPU under TRITON_INTERPRET=1 (in a
subprocess, so this process never sees the variable); its norm and gated kernels don't run in
the interpreter (they call `.to()` on Python floats), so they are checked through stand-ins that
mimic Liger's conventions, including the in-place writes the adapter must keep off the inputs."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import layerzero as lz
from layerzero import reference
from backend_standins import module, use_standins

KERNELS = ("liger.rms_norm", "liger.layer_norm", "liger.rope", "liger.swiglu", "liger.geglu")


def _liger(calls):
    class RMS:
        @staticmethod
        def apply(x, w, eps, offset=0.0, casting_mode="llama", in_place=True, row_mode=None):
            calls.append(dict(api="rms_norm", x=x, casting_mode=casting_mode, offset=offset))
            return reference.rms_norm(x, w, eps, offset=offset)

    class FusedAdd:
        @staticmethod
        def apply(x, r, w, eps, offset=0.0, casting_mode="llama", in_place=False):
            calls.append(dict(api="fused_add", casting_mode=casting_mode, offset=offset))
            return reference.rms_norm(x, w, eps, residual=r, offset=offset)

    class LN:
        @staticmethod
        def apply(x, w, b, eps):
            calls.append(dict(api="layer_norm", x=x))
            return reference.layer_norm(x, w, b, eps)

    class Rope:                       # Liger: (B, H, S, D) views of (B, S, H, D), rotated in place
        @staticmethod
        def apply(q, k, cos, sin):
            calls.append(dict(api="rope", q=q, cos=cos))
            if cos.dim() == 2:
                cos, sin = cos[None], sin[None]
            half = cos.shape[-1] // 2
            c = torch.cat((cos[..., :half], cos[..., :half]), -1)   # Liger reads the first half only
            s = torch.cat((sin[..., :half], sin[..., :half]), -1)
            qb, kb = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
            qr, kr = reference.rope(qb, kb, c, s, layout="bshd")
            qb.copy_(qr)
            kb.copy_(kr)
            return qb.transpose(1, 2), kb.transpose(1, 2)

    class SiLUMul:
        @staticmethod
        def apply(a, b):
            calls.append(dict(api="swiglu", a=a))
            return F.silu(a) * b

    class GELUMul:
        @staticmethod
        def apply(a, b):
            calls.append(dict(api="geglu"))
            return F.gelu(a, approximate="tanh") * b

    ops = {"rms_norm": dict(LigerRMSNormFunction=RMS),
           "fused_add_rms_norm": dict(LigerFusedAddRMSNormFunction=FusedAdd),
           "layer_norm": dict(LigerLayerNormFunction=LN), "rope": dict(LigerRopeFunction=Rope),
           "swiglu": dict(LigerSiLUMulFunction=SiLUMul), "geglu": dict(LigerGELUMulFunction=GELUMul)}
    mods = {f"liger_kernel.ops.{n}": module(f"liger_kernel.ops.{n}", **a) for n, a in ops.items()}
    mods["liger_kernel.ops"] = module("liger_kernel.ops", **{n: mods[f"liger_kernel.ops.{n}"] for n in ops})
    mods["liger_kernel"] = module("liger_kernel", ops=mods["liger_kernel.ops"])
    return mods


@pytest.fixture
def calls(monkeypatch):
    calls = []
    use_standins(monkeypatch, _liger(calls), KERNELS)
    return calls


def _run(op, kernel, *args, **kw):
    with lz.use(kernel):
        assert lz.which(op, *args, **kw) == kernel
        out = getattr(lz, op)(*args, **kw)
    assert lz.metrics()["calls"][op] == {kernel: 1}
    return out


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm(calls, residual, offset):
    x = torch.randn(2, 3, 32).half()
    r = torch.randn(2, 3, 32).half() if residual else None
    w = torch.randn(32)
    out = _run("rms_norm", "liger.rms_norm", x, w, 1e-6, residual=r, offset=offset)
    ref = reference.rms_norm(x, w, 1e-6, residual=r, offset=offset)
    for o, e in zip(out if residual else (out,), ref if residual else (ref,)):
        torch.testing.assert_close(o, e)
    assert calls[-1]["api"] == ("fused_add" if residual else "rms_norm")
    assert calls[-1]["casting_mode"] == "gemma" and calls[-1]["offset"] == offset   # fp32 throughout


def test_layer_norm_and_refusal(calls):
    x, w, b = torch.randn(4, 16).half(), torch.randn(16), torch.randn(16)
    torch.testing.assert_close(_run("layer_norm", "liger.layer_norm", x, w, b), reference.layer_norm(x, w, b))
    c = {c.kernel: c for c in lz.explain("layer_norm", x, w, None).candidates}["liger.layer_norm"]
    assert c.status == "rejected" and "bias" in c.reasons[0]


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_rope_leaves_inputs_alone(calls, layout):
    b, s, d = 2, 5, 16
    q = torch.randn(b, s, 4, d).half()                       # contiguous in (B, S, H, D)
    k = torch.randn(b, s, 2, d).half()
    if layout == "bhsd":
        q, k = q.transpose(1, 2), k.transpose(1, 2)          # the views transformers hands over
    ang = torch.rand(s, d // 2)
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    q0, k0 = q.clone(), k.clone()
    qo, ko = _run("rope", "liger.rope", q, k, cos, sin, layout=layout)
    assert torch.equal(q, q0) and torch.equal(k, k0), "Liger rotates in place: the adapter must copy"
    qr, kr = reference.rope(q, k, cos, sin, layout=layout)
    torch.testing.assert_close(qo, qr)
    torch.testing.assert_close(ko, kr)


def test_gated(calls):
    g, u = torch.randn(3, 40).half(), torch.randn(3, 40).half()
    torch.testing.assert_close(_run("swiglu", "liger.swiglu", g, u), F.silu(g) * u)
    torch.testing.assert_close(_run("geglu", "liger.geglu", g, u, "tanh"), F.gelu(g, approximate="tanh") * u)
    c = {c.kernel: c for c in lz.explain("geglu", g, u).candidates}["liger.geglu"]
    assert c.status == "rejected" and "tanh" in c.reasons[0]


INTERPRETED_ROPE = textwrap.dedent("""
    import os, torch
    assert os.environ["TRITON_INTERPRET"] == "1"
    import layerzero as lz
    from layerzero import reference
    torch.manual_seed(0)
    for layout in ("bhsd", "bshd"):
        q = torch.randn(2, 6, 4, 32)                      # (B, S, H, D) memory
        k = torch.randn(2, 6, 2, 32)
        if layout == "bhsd":
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        ang = torch.rand(2, 6, 8)                         # per-batch, partial rotary (16 of 32)
        cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
        q0 = q.clone()
        with lz.use("liger.rope"):
            qo, ko = lz.rope(q, k, cos, sin, layout=layout)
        assert torch.equal(q, q0)
        qr, kr = reference.rope(q, k, cos, sin, layout=layout)
        torch.testing.assert_close(qo, qr)
        torch.testing.assert_close(ko, kr)
    assert lz.metrics()["calls"]["rope"] == {"liger.rope": 2}, lz.metrics()
    print("OK")
""")


def test_real_liger_rope_under_triton_interpreter(tmp_path):
    pytest.importorskip("liger_kernel")
    env = dict(os.environ, TRITON_INTERPRET="1", LAYERZERO_CACHE_DIR=str(tmp_path), LAYERZERO_PROBE="0")
    p = subprocess.run([sys.executable, "-c", INTERPRETED_ROPE], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout + p.stderr


def test_unavailable_reason_names_the_module_each_kernel_needs(monkeypatch):
    """On a machine without CUDA (and no TRITON_INTERPRET), each Liger kernel is unavailable
    because of the module it really needs, not because of the package's rms_norm module."""
    from layerzero import registry

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "liger_kernel", module("liger_kernel"))   # found, not imported
    for name in list(sys.modules):
        if name.startswith("liger_kernel."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(registry, "_module_reasons", {})
    needs = {"liger.rms_norm": "rms_norm", "liger.layer_norm": "layer_norm", "liger.rope": "rope",
             "liger.swiglu": "swiglu", "liger.geglu": "geglu"}
    for kid, mod in needs.items():
        why = registry.unavailable_reason(registry.get(kid))
        assert why.startswith(f"liger_kernel.ops.{mod} needs a CUDA GPU"), (kid, why)
