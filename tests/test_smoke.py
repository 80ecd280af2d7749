import subprocess
import sys

import torch

import layerzero as lz


def test_import_needs_only_torch():
    code = ("import sys, layerzero; bad = [m for m in ('transformers', 'diffusers', 'flash_attn', "
            "'flashinfer', 'xformers', 'liger_kernel', 'triton', 'yaml') if m in sys.modules]; "
            "print(bad); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_attention_runs_the_chosen_kernel():
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    kid = lz.which("attention", q, k, v, is_causal=True)
    out = lz.attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert lz.metrics()["calls"]["attention"] == {kid: 1}
