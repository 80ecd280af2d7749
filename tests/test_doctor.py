"""`lz.doctor()` lists a kernel as available only when it can run on a device this machine has:
its modules import, and its `supports()` accepts an ordinary call of its op on one of the devices
here (in some floating dtype)."""
from __future__ import annotations

import importlib
import json

import torch

import layerzero as lz
from layerzero import cli, registry

doctor = importlib.import_module("layerzero.doctor")   # `layerzero.doctor` is also lz.doctor()


def rows():
    return {k.id: k for k in lz.doctor().kernels}


def test_cuda_only_kernels_are_not_available_without_cuda(capsys, monkeypatch):
    monkeypatch.setattr(doctor, "devices", lambda: [("cpu", 0)])     # as on a CPU-only machine
    by = rows()
    for kid in ("torch.sdpa_cudnn", "torch.sdpa_efficient"):
        assert not by[kid].available, by[kid]
        assert by[kid].reason.startswith("runs on none of this machine's devices: cpu: ")
        assert "needs a CUDA device" in by[kid].reason
    assert all(by[k].available for k in ("torch.sdpa", "torch.sdpa_math", "reference.attention",
                                         "torch.rms_norm", "reference.sample"))
    assert cli.main(["kernels", "--op", "attention", "--json"]) == 0
    listed = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert listed["torch.sdpa_cudnn"] == by["torch.sdpa_cudnn"]._asdict()


def test_a_kernel_states_its_devices_through_supports():
    def only(device, dtype):
        return lambda spec: ([] if spec.device == device and spec.dtype == dtype
                             else [f"needs {device} and {dtype}"])
    lz.register("rms_norm", "test.somewhere_else", lambda *a: None, supports=only("xpu", torch.float32))
    lz.register("rms_norm", "test.bf16_cpu", lambda *a: None, supports=only("cpu", torch.bfloat16))
    lz.register("rms_norm", "test.raises", lambda *a: None, supports=lambda spec: 1 / 0)
    try:
        by = rows()
        assert not by["test.somewhere_else"].available
        assert by["test.somewhere_else"].reason.startswith(
            "runs on none of this machine's devices: cpu: needs xpu and torch.float32")
        assert by["test.bf16_cpu"].available and by["test.bf16_cpu"].reason is None
        assert not by["test.raises"].available and "ZeroDivisionError" in by["test.raises"].reason
    finally:
        for kid in ("test.somewhere_else", "test.bf16_cpu", "test.raises"):
            registry.unregister(kid)


def test_every_op_has_ordinary_calls_every_builtin_kernel_on_cpu_would_take():
    """The sample calls are real calls of each op (built by ops.describe), so a kernel that
    runs on the CPU is found available there."""
    for op in ("attention", "rms_norm", "layer_norm", "rope", "swiglu", "geglu", "sample", "paged_attention"):
        specs = doctor.sample_calls(op, "cpu", 0)
        assert specs and all(s.op == op and s.device == "cpu" for s in specs)
        assert {s.dtype for s in specs} == {torch.float32, torch.bfloat16, torch.float16}
    assert rows()["reference.geglu"].available
