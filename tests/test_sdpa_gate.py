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
