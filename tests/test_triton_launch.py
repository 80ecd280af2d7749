"""`_triton_launch.Launch`: the first call of a specialisation goes through Triton's JIT, later
ones call the compiled kernel's launcher directly, with the argument convention the launcher
takes; anything it can't be sure of (hooks set, an interpreted kernel, a launcher that takes
neither convention) goes through the JIT. Stand-ins for the kernel and its launcher record what
they receive (the real direct path runs in the GPU tests)."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.runtime.jit import JITFunction  # noqa: E402

from layerzero.backends import _triton_launch as L  # noqa: E402


class Param:
    def __init__(self, name, constexpr=False):
        self.name, self.is_constexpr, self.do_not_specialize = name, constexpr, False


class Compiled:
    """A compiled kernel: its launcher records the arguments or rejects a convention."""

    def __init__(self, log, takes):
        self.function, self.packed_metadata, self.log, self.takes = "fn", "meta", log, takes

    def run(self, *a):
        if self.takes is None or len(a) - 9 != self.takes:
            raise TypeError(f"launcher takes {self.takes} kernel arguments, got {len(a) - 9}")
        self.log.append(("direct", a[:4], a[9:]))


class Kernel(JITFunction):
    """Stands in for a @triton.jit function: X, Y, n, then the constexpr BLOCK."""

    def __init__(self, takes=4):
        self.params = [Param("X"), Param("Y"), Param("n"), Param("BLOCK", True)]
        self.log, self.takes, self.compiled = [], takes, []

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.log.append(("jit", grid, args, meta))
            c = Compiled(self.log, self.takes)
            self.compiled.append(c)
            return c
        return run


@pytest.fixture(autouse=True)
def _no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def _launch(kernel):
    la = L.Launch(kernel, tensors=2)
    la.stream = lambda dev: 1234
    return la


def test_second_call_is_direct_with_all_parameters():
    k = _launch(Kernel(takes=4))
    x, y = torch.zeros(8), torch.zeros(8)
    for _ in range(3):
        k((2,), (x, y, 8), {"BLOCK": 4, "num_warps": 4})
    kinds = [e[0] for e in k.kernel.log]
    assert kinds == ["jit", "direct", "direct"] and k.all_params is True and k.direct == 2
    _, head, args = k.kernel.log[1]
    assert head == (2, 1, 1, 1234) and args[:2] == (x, y) and args[2:] == (8, 4)


def test_launcher_without_constexprs_is_found():
    k = _launch(Kernel(takes=3))
    x = torch.zeros(8)
    for _ in range(2):
        k((1, 2), (x, x, 8), {"BLOCK": 4})
    assert k.all_params is False and k.kernel.log[-1] == ("direct", (1, 2, 1, 1234), (x, x, 8))


def test_launcher_taking_neither_turns_direct_path_off():
    k = _launch(Kernel(takes=None))
    x = torch.zeros(8)
    for _ in range(3):
        k((1,), (x, x, 8), {"BLOCK": 4})
    assert "neither" in k.off and [e[0] for e in k.kernel.log] == ["jit", "jit", "jit"]


def test_new_specialisation_goes_through_the_jit():
    k = _launch(Kernel())
    buf = torch.zeros(64)
    x, misaligned = buf[:8], buf[1:9]          # 4-byte offset: Triton specialises on alignment
    k((1,), (x, x, 8), {"BLOCK": 4})
    k((1,), (misaligned, x, 8), {"BLOCK": 4})   # other alignment
    k((1,), (x, x, 16), {"BLOCK": 4})          # other int
    k((1,), (x, x, 8), {"BLOCK": 8})           # other constexpr
    k((1,), (x.half(), x, 8), {"BLOCK": 4})    # other dtype
    k((1,), (x, x, 8), {"BLOCK": 4})           # seen before
    assert [e[0] for e in k.kernel.log] == ["jit"] * 5 + ["direct"]


def test_hooks_send_every_launch_through_the_jit(monkeypatch):
    k = _launch(Kernel())
    x = torch.zeros(8)
    k((1,), (x, x, 8), {"BLOCK": 4})
    monkeypatch.setattr(k, "hooks", type("H", (), {"launch_enter_hook": print, "launch_exit_hook": None})())
    k((1,), (x, x, 8), {"BLOCK": 4})
    assert [e[0] for e in k.kernel.log] == ["jit", "jit"]


def test_interpreted_or_uncompiled_kernels_stay_on_the_jit():
    class Interpreted:
        def __getitem__(self, grid):
            return lambda *a, **kw: None
    assert "not a compiled Triton kernel" in L.Launch(Interpreted(), tensors=0).off
    k = _launch(Kernel())
    k.kernel.__class__ = type("K2", (Kernel,), {"__getitem__": lambda self, g: (lambda *a, **kw: None)})
    k((1,), (torch.zeros(1), torch.zeros(1), 1), {"BLOCK": 1})
    assert "not a compiled kernel" in k.off


def test_a_plan_key_stands_for_the_other_arguments():
    """With `static` (a caller's per-shape plan key) the key reads only the tensors' dtypes and
    alignment: same plan and tensors -> direct; other alignment -> the JIT again."""
    k = _launch(Kernel())
    buf = torch.zeros(64)
    x, misaligned = buf[:8], buf[1:9]
    plan = ("shape", (8,), "strides", (1,))
    k((1,), (x, x, 8), {"BLOCK": 4}, plan)
    k((1,), (x, x, 8), {"BLOCK": 4}, plan)
    k((1,), (misaligned, x, 8), {"BLOCK": 4}, plan)
    k((1,), (x, x, 8), {"BLOCK": 4}, ("other plan",))
    assert [e[0] for e in k.kernel.log] == ["jit", "direct", "jit", "jit"]
    assert k.kernel.log[1][2] == (x, x, 8, 4)     # constexpr tail cached with the entry
