"""LayerZero's own Triton kernels (triton.rms_norm with the residual add fused, triton.rope on q
and k) run for real on the CPU under TRITON_INTERPRET=1, in a subprocess so that no other test
sees the variable. Inputs are non-contiguous on purpose; outputs are checked against the float64
reference under the flash-attention rule, and lz.metrics proves which kernel ran. (The
interpreter truncates fp32 -> bf16 where GPUs round to nearest, so bf16 is left to tests/gpu.)"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import os, torch
    assert os.environ["TRITON_INTERPRET"] == "1"
    import layerzero as lz
    from layerzero import reference
    FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3}
    g = torch.Generator().manual_seed(0)

    def rule(out, ref64, base, what):
        err = (out.double() - ref64).abs().max().item()
        b = (base.double() - ref64).abs().max().item()
        assert out.dtype == base.dtype and err <= 2 * b + FLOOR[out.dtype], f"{what}: {err} vs {b}"

    def run(op, kernel, *args, **kw):
        lz.reset_metrics()
        with lz.use(kernel):
            assert lz.which(op, *args, **kw) == kernel
            out = getattr(lz, op)(*args, **kw)
        assert lz.metrics()["calls"][op] == {kernel: 1}
        return out

    n = 0
    for dt in (torch.float32, torch.float16):
        # rms_norm: transposed 3-D input, strided weight, residual, offset; 5-D input; odd hidden
        x = torch.randn(7, 3, 100, generator=g).to(dt).transpose(0, 1)      # (3, 7, 100), strided
        r = torch.randn(3, 7, 100, generator=g).to(dt)
        w = torch.randn(200, generator=g)[::2]
        for res, off in ((None, 0.0), (r, 0.0), (r, 1.0), (None, 1.0)):
            out = run("rms_norm", "triton.rms_norm", x, w, 1e-6, residual=res, offset=off)
            ref = reference.rms_norm(x.double(), w.double(), 1e-6, None if res is None else res.double(), off)
            xb = x if res is None else x + res
            base = xb * torch.rsqrt(xb.pow(2).mean(-1, keepdim=True) + 1e-6) * (off + w.to(dt))
            if res is None:
                rule(out, ref, base, f"rms {dt} off={off}")
            else:
                rule(out[0], ref[0], base, f"rms+res {dt} off={off}")
                assert torch.equal(out[1], x + res)
            n += 1
        x5 = torch.randn(2, 2, 2, 3, 64, generator=g).to(dt)
        rule(run("rms_norm", "triton.rms_norm", x5, None, 1e-5), reference.rms_norm(x5.double(), None, 1e-5),
             x5 * torch.rsqrt(x5.pow(2).mean(-1, keepdim=True) + 1e-5), "rms 5-D no weight")
        # rope: both layouts, interleaved, partial rotary, per-batch and broadcast cos/sin, GQA
        for layout in ("bhsd", "bshd"):
            for inter in (False, True):
                for cos_b in (1, 2):
                    q = torch.randn(2, 5, 6, 40, generator=g).to(dt).transpose(1, 2)   # non-contiguous
                    k = torch.randn(2, 5, 2, 40, generator=g).to(dt).transpose(1, 2)
                    if layout == "bshd":
                        q, k = q.transpose(1, 2), k.transpose(1, 2)
                    ang = torch.rand(cos_b, 5 if cos_b == 2 else 1, 12, generator=g) * 5   # D_rot 24 < 40
                    ang = ang.repeat_interleave(2, -1) if inter else torch.cat((ang, ang), -1)
                    cos, sin = ang.cos(), ang.sin()
                    if cos_b == 1:
                        cos, sin = cos[0], sin[0]                    # (1, 24): broadcast over S
                    qo, ko = run("rope", "triton.rope", q, k, cos, sin, layout=layout, interleaved=inter)
                    qr, kr = reference.rope(q.double(), k.double(), cos.double(), sin.double(), layout, inter)
                    qb, kb = reference.rope(q, k, cos.to(dt), sin.to(dt), layout, inter)
                    rule(qo, qr, qb, f"rope q {layout} {inter} {dt}")
                    rule(ko, kr, kb, f"rope k {layout} {inter} {dt}")
                    n += 1
    # the custom ops trace under torch.compile (fake implementations), then run the kernels
    x = torch.randn(4, 64, generator=g)
    f = torch.compile(lambda x: torch.ops.layerzero.triton_rms_norm(x, None, 1e-6, None, 0.0)[0] * 2,
                      fullgraph=True, backend="eager")
    torch.testing.assert_close(f(x), reference.rms_norm(x, None, 1e-6) * 2)
    print("OK", n)
""")


def test_own_triton_kernels_under_interpreter(tmp_path):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", LAYERZERO_CACHE_DIR=str(tmp_path), LAYERZERO_PROBE="0")
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]


def test_registered_but_unavailable_without_gpu():
    import layerzero as lz
    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("a GPU (or the interpreter) is here")
    info = {k.id: k for k in lz.kernels()}
    for kid in ("triton.rms_norm", "triton.rope"):
        assert not info[kid].available and "CUDA GPU" in info[kid].reason
