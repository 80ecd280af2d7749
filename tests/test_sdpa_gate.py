"""torch's SDPA gate functions are asked for reasons without printing them (CUDA-only in use; the
capture and parsing run anywhere)."""
import ctypes
import os
import sys

from layerzero.backends import torch_sdpa


def test_fd2_writes_become_reasons_not_output(capfd):
    line = ("[W1130 03:26:12.378659264 sdp_utils_cpp.h:418] Warning: For dense input, both fused "
            "kernels require query, key and value to have the same num_heads. (function "
            "check_batch_size_and_num_heads_dense)\n")
    with torch_sdpa._stderr_captured() as printed:
        os.write(2, line.encode())                 # as C++ writes: straight to the descriptor
        libc = ctypes.CDLL(None) if sys.platform != "win32" else None
        if libc is not None:
            libc.dprintf(2, b"[W1 x.h:1] Warning: second one\n")
    assert capfd.readouterr().err == ""
    assert torch_sdpa._cpp_warnings(printed[0]) == [
        "For dense input, both fused kernels require query, key and value to have the same "
        "num_heads.", "second one"][: 1 + (libc is not None)]
    os.write(2, b"after\n")                        # the descriptor is restored
    assert capfd.readouterr().err == "after\n"


def test_native_gqa_answer_traces_without_the_gate(monkeypatch):
    """The efficient adapter's "does torch's kernel take enable_gqa?" is a gate call (an
    SDPAParams, which dynamo can't trace: a graph break in every layer, and lz.generate's CUDA step
    fell back to eager). Traced code reads the kept answer, or repeats K/V heads without one."""
    import torch

    def gate(*a):
        raise AssertionError("the gate ran while tracing")

    def f(x):
        return x + 1 if torch_sdpa._efficient_native_gqa(0) else x - 1

    monkeypatch.setattr(torch_sdpa, "_torch_gate", gate)
    monkeypatch.setattr(torch_sdpa, "_NATIVE_GQA", {})
    x = torch.ones(2)
    torch._dynamo.reset()
    assert torch.compile(f, backend="eager", fullgraph=True)(x).tolist() == [0.0, 0.0]
    monkeypatch.setattr(torch_sdpa, "_NATIVE_GQA", {0: True})
    torch._dynamo.reset()
    assert torch.compile(f, backend="eager", fullgraph=True)(x).tolist() == [2.0, 2.0]
    monkeypatch.setattr(torch_sdpa, "_torch_gate", lambda *a: ())   # eager: asked once, kept
    monkeypatch.setattr(torch_sdpa, "_NATIVE_GQA", {})
    assert torch_sdpa._efficient_native_gqa(0) and torch_sdpa._NATIVE_GQA == {0: True}
