"""LayerZero's own Triton kernels (triton.rms_norm with the residual add fused, triton.rope on q
and k, triton.swiglu/geglu) run for real on the CPU under TRITON_INTERPRET=1, in a subprocess so that no other test
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
        # swiglu / geglu (both gelu forms): one pass; rows of a fused gate_up output (strided),
        # 3-D, and a width past one block
        for shape in ((5, 2 * 72), (2, 3, 2 * 4100)):
            gu = torch.randn(*shape, generator=g).to(dt)
            gate, up = gu.chunk(2, dim=-1)
            for op, kw, fn in (("swiglu", {}, lambda a: torch.nn.functional.silu(a)),
                               ("geglu", {"approximate": "none"}, lambda a: torch.nn.functional.gelu(a)),
                               ("geglu", {"approximate": "tanh"},
                                lambda a: torch.nn.functional.gelu(a, approximate="tanh"))):
                out = run(op, f"triton.{op}", gate, up, **kw)
                rule(out, fn(gate.double()) * up.double(), fn(gate) * up, f"{op} {kw} {shape} {dt}")
                n += 1
    print("OK", n)
""")

# The rope kernel (one program per token, all q and k heads as 2-D tiles; a second grid dim
# splits heads past _MAX_TILE) against the float64 reference: layouts, non-contiguous, sliced
# and feature-strided q/k, GQA down to one k head, every cos/sin shape (and sin strided unlike
# cos), partial rotary, both pair layouts, head_dim 64/80/96, and the head-block grid. Eager
# calls must not go through the custom op; torch.compile (and a FakeTensorMode) must.
ROPE_SCRIPT = textwrap.dedent("""
    import os, torch
    assert os.environ["TRITON_INTERPRET"] == "1"
    import layerzero as lz
    from layerzero import reference
    from layerzero.backends import triton_kernels as TK, _triton_impl as T
    g = torch.Generator().manual_seed(0)
    FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3}
    grids = []                                   # (grid, kernel name) of each launch

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            grids.append((grid, self.kernel.__name__))
            return self.kernel[grid]
    for launch in (T._rope_launch, T._rope_strided_launch):
        launch.kernel = Spy(launch.kernel)

    def no_op(*a, **kw):
        raise AssertionError("an eager call went through the custom op")
    op, TK.rope_op = TK.rope_op, no_op

    def make(shape, layout, kind, dt):
        \"\"\"A (B, H, S, D) tensor (permuted to the layout): contiguous, a transposed view,
        sliced (heads and features: not dense) or feature-strided (feature stride != 1).\"\"\"
        b, h, s, d = shape
        randn = lambda *size: torch.randn(*size, generator=g).to(dt)   # views are taken after .to
        if kind == "transposed":                 # the other layout's contiguous tensor, viewed
            t = randn(b, s, h, d).transpose(1, 2)
        elif kind == "sliced":
            t = randn(b, 2 * h, s, d + 16)[:, ::2, :, 3:d + 3]
        elif kind == "dstride":
            t = randn(b, h, d, s).transpose(2, 3)
        else:
            t = randn(b, h, s, d)
        return t if layout == "bhsd" else t.transpose(1, 2)

    def angles(kind, b, s, r, inter):
        \"\"\"cos, sin of shape (S, R), (1, R), (1, S, R), (B, S, R) or (B, 1, R); 'sliced' gives cos
        a strided view of a wider tensor (and sin other strides than cos). Every feature has its
        own angle (models repeat each angle twice), so each must be read at its own position.\"\"\"
        shape = {"S": (s,), "1": (1,), "1S": (1, s), "BS": (b, s), "B1": (b, 1), "sliced": (b, s)}[kind]
        ang = torch.rand(*shape, r, generator=g) * 5
        if kind == "sliced":
            wide = torch.zeros(b, s, r + 8)
            wide[..., 4:r + 4] = ang.cos()
            return wide[..., 4:r + 4], ang.sin()
        return ang.cos(), ang.sin()

    def check(q, k, cos, sin, layout, inter, what):
        lz.reset_metrics()
        with lz.use("triton.rope"):
            qo, ko = lz.rope(q, k, cos, sin, layout=layout, interleaved=inter)
        assert lz.metrics()["calls"]["rope"] == {"triton.rope": 1}, what
        qr, kr = reference.rope(q.double(), k.double(), cos.double(), sin.double(), layout, inter)
        qb, kb = reference.rope(q, k, cos.to(q.dtype), sin.to(q.dtype), layout, inter)
        for out, inp, ref, base, name in ((qo, q, qr, qb, "q"), (ko, k, kr, kb, "k")):
            assert out.shape == inp.shape and out.dtype == inp.dtype, what
            # q: empty_like (a dense input's layout is kept: transposed, feature-strided);
            # k: contiguous in its logical shape (a KV cache concatenates it next)
            want = torch.empty_like(inp) if name == "q" else torch.empty(inp.shape)
            assert out.stride() == want.stride(), (what, name, out.stride())
            err = (out.double() - ref).abs().max().item()
            b = (base.double() - ref).abs().max().item()
            assert err <= 2 * b + FLOOR[out.dtype], f"{what} {name}: {err} vs {b}"

    # (B, S, HQ, HK, D, R, q/k kind, cos kind)
    CASES = [
        (2, 3, 4, 2, 64, 64, "contig", "1S"),
        (1, 3, 6, 2, 64, 64, "transposed", "S"),
        (2, 2, 4, 1, 80, 80, "sliced", "BS"),
        (2, 2, 3, 3, 96, 64, "transposed", "B1"),
        (1, 3, 5, 1, 80, 32, "dstride", "1"),
        (2, 2, 8, 2, 96, 96, "contig", "sliced"),
        (1, 2, 2, 2, 64, 16, "sliced", "1S"),
    ]
    n = 0
    for dt in (torch.float32, torch.float16):
        for b, s, hq, hk, d, r, kind, ck in CASES:
            for layout in ("bhsd", "bshd"):
                for inter in (False, True):
                    if dt == torch.float16 and (kind, ck) not in (("transposed", "S"), ("sliced", "BS")):
                        continue
                    q = make((b, hq, s, d), layout, kind, dt)
                    k = make((b, hk, s, d), layout, kind, dt)
                    cos, sin = angles(ck, b, s, r, inter)
                    del grids[:]
                    check(q, k, cos, sin, layout, inter, (dt, b, s, hq, hk, d, r, kind, ck, layout, inter))
                    # one program per token; outputs strided like the inputs and sin like cos
                    # take the kernel with fewer arguments
                    same = kind != "sliced" and ck != "sliced" and k.is_contiguous()
                    assert grids == [((b * s, 1), "_rope_kernel" if same else "_rope_kernel_strided")], grids
                    n += 1

    # the head-block grid dimension: a head tile over _MAX_TILE elements splits over programs
    for max_tile, hq, hk, d, r in ((16, 5, 2, 64, 64), (64, 6, 2, 40, 24), (64, 2, 7, 48, 48)):
        T._MAX_TILE = max_tile
        for layout in ("bhsd", "bshd"):
            for inter in (False, True):
                q = make((2, hq, 2, d), layout, "transposed", torch.float32)
                k = make((2, hk, 2, d), layout, "sliced", torch.float32)
                cos, sin = angles("BS", 2, 2, r, inter)
                del grids[:]
                check(q, k, cos, sin, layout, inter, ("head blocks", max_tile, hq, hk, d, r, layout, inter))
                bh = T._pow2(r // 2)
                per = max(1, max_tile // bh)
                assert [g for g, _ in grids] == [(4, max(-(-hq // per), -(-hk // per)))], grids
                assert grids[0][0][1] > 1, grids
                n += 1
    T._MAX_TILE = 16384
    # ... and at the real limit: 4100 heads of 8 features (tiles of [4096, 4])
    q = make((1, 4100, 1, 8), "bshd", "contig", torch.float32)
    k = make((1, 1, 1, 8), "bshd", "contig", torch.float32)
    cos, sin = angles("S", 1, 1, 8, False)
    del grids[:]
    check(q, k, cos, sin, "bshd", False, "4100 heads")
    assert grids == [((1, 2), "_rope_kernel")], grids

    # torch.compile traces the public function as one custom-op call (fake implementation),
    # then runs the kernel; so does a FakeTensorMode
    TK.rope_op = op
    q = make((1, 4, 3, 64), "bhsd", "transposed", torch.float32)
    k = make((1, 2, 3, 64), "bhsd", "contig", torch.float32)
    cos, sin = angles("1S", 1, 3, 64, False)
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(nd.target) for nd in gm.graph.nodes if nd.op == "call_function")
        return gm.forward
    f = torch.compile(lambda q, k: TK.rope(q, k, cos, sin, "bhsd", False), fullgraph=True, backend=backend)
    qo, ko = f(q, k)
    assert any("triton_rope" in t for t in targets), targets
    qr, kr = reference.rope(q, k, cos, sin, "bhsd", False)
    torch.testing.assert_close(qo, qr)
    torch.testing.assert_close(ko, kr)
    x = torch.randn(4, 64, generator=g)
    targets.clear()
    f = torch.compile(lambda x: TK.rms_norm(x, None, 1e-6, None, 0.0) * 2, fullgraph=True, backend=backend)
    torch.testing.assert_close(f(x), reference.rms_norm(x, None, 1e-6) * 2)
    assert any("triton_rms_norm" in t for t in targets), targets
    f = torch.compile(lambda x: torch.ops.layerzero.triton_rms_norm(x, None, 1e-6, None, 0.0)[0] * 2,
                      fullgraph=True, backend="eager")
    torch.testing.assert_close(f(x), reference.rms_norm(x, None, 1e-6) * 2)
    from torch._subclasses.fake_tensor import FakeTensorMode
    del grids[:]
    with FakeTensorMode() as mode:
        qf, kf = mode.from_tensor(q), mode.from_tensor(k)
        qo, ko = TK.rope(qf, kf, mode.from_tensor(cos), mode.from_tensor(sin), "bhsd", False)
        assert qo.shape == q.shape and qo.stride() == q.stride() and ko.shape == k.shape
        assert ko.stride() == torch.empty(k.shape).stride()     # as the real kernel's output
    assert grids == [], grids                    # the fake implementation ran, not the kernel
    print("OK", n)
""")


def _interpret(script, tmp_path):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", LAYERZERO_CACHE_DIR=str(tmp_path), LAYERZERO_PROBE="0")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]


def test_own_triton_kernels_under_interpreter(tmp_path):
    _interpret(SCRIPT, tmp_path)


def test_rope_kernel_cases_under_interpreter(tmp_path):
    _interpret(ROPE_SCRIPT, tmp_path)


def test_registered_but_unavailable_without_gpu():
    import layerzero as lz
    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("a GPU (or the interpreter) is here")
    info = {k.id: k for k in lz.kernels()}
    for kid in ("triton.rms_norm", "triton.rope"):
        assert not info[kid].available and "CUDA GPU" in info[kid].reason
