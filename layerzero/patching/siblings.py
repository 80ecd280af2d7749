"""Sibling projections (q/k/v, gate/up) as one matrix product, for lz.generate's CUDA decode step.

A decode step multiplies a few rows of activations by each projection's weights. Small products
run far below the memory bandwidth, and each is a launch of its own: on the H200 (1B llama,
bf16) k and v (512 x 2048) take 5.8 us each as cuBLAS GEMMs at batch 8 (0.36 TB/s) where q, k and
v as one (3072 x 2048) product take 6.4 us (benchmarks/RESULTS.md, issue 13, third session).

`fuse(model, report, undo)`: in every module holding a whole group of sibling projections
(`GROUPS`) that are plain `nn.Linear`s reading the same features (same in_features, dtype and
device, biases all present or all absent, no hooks), the weights are concatenated once into one
matrix, and each projection's weight (and bias) becomes a view of its rows (the same Parameter
objects, their data swapped, so their own storage is freed): no memory is added and every value
stays as it was. Each projection then gets a forward that, for an input it has
not seen, computes the whole group's product once and keeps it with its input on the group; a
sibling called with that same input object (as attention and MLP forwards do) takes its slice;
any other input runs the projection's own product. The kept product is dropped once every
sibling has taken its slice, so a traced graph holds none of it between steps.

One row (a batch-1 decode step) keeps the separate products: inductor's coordinate-descent
tuning (lz.generate's batch-1 step) already reads sibling weights in one horizontally fused
reduction there, and the fused form measured no faster (1.103 vs 1.091 ms a step, 271 kernels
instead of 223); at batch 8 it made the step 1.188 ms instead of 1.428 (6,471 vs 5,403 tok/s;
results/generate_gpu_explore_h200_fuse_b*.json).

A fused product rounds like any GEMM of that shape: results may differ from the separate
products in the last bits (cuBLAS picks its algorithm by shape). lz.generate uses this only for
steps it captures as CUDA graphs (`layerzero.generation`), where it is measured; `lz.unpatch`
puts the separate weights back (copies of the rows, values unchanged).

Recogniser layer of `layerzero.patching`: imports the mechanics (swap, record) only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .record import Report
from .swap import swap_forward

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Group:
    """The fused weight (and bias) of one group, and the product last computed with it."""

    def __init__(self, weight, bias, rows, members):
        self.weight, self.bias, self.rows = weight, bias, rows
        self.members = members
        self.ptrs = [m.weight.data_ptr() for m in members]
        self.x = self.out = None
        self.served = 0

    def intact(self) -> bool:
        """Do the projections still hold views of the fused weight? (Not after `param.data = ...`
        or a conversion of the model.) Checked on eager calls; a traced or captured step, like
        any CUDA graph, assumes the model's weights stay where they were."""
        return torch.compiler.is_compiling() or all(
            m.weight.data_ptr() == p for m, p in zip(self.members, self.ptrs))

    def take(self, i: int, x):
        if self.x is not x:
            self.x, self.out, self.served = x, F.linear(x, self.weight, self.bias), 0
        lo, hi = self.rows[i]
        out = self.out[..., lo:hi]
        self.served += 1
        if self.served == len(self.rows):
            self.x = self.out = None
            self.served = 0
        return out


def _fused(lin) -> bool:
    return getattr(lin.__dict__.get("forward"), "__name__", "") == "lz_sibling_forward"


def _plain(lin) -> bool:
    return (type(lin) is nn.Linear and "forward" not in lin.__dict__
            and not (lin._forward_hooks or lin._forward_pre_hooks)
            and lin.weight.device.type != "meta" and lin.weight.dim() == 2)


def _fusable(members) -> str:
    """Why these linears can't be one product ("" when they can)."""
    if not all(_plain(m) for m in members):
        return "not all plain nn.Linear without hooks or a patched forward"
    w0 = members[0].weight
    if any(m.weight.shape[1] != w0.shape[1] or m.weight.dtype != w0.dtype or m.weight.device != w0.device
           for m in members):
        return "in_features, dtype or device differ"
    if len({m.bias is None for m in members}) != 1:
        return "some have a bias, some not"
    if len({id(m) for m in members}) != len(members):
        return "one module under two names"
    return ""


def _forward(group: _Group, i: int):
    def make(original):
        def forward(self, x):
            if (x.numel() <= x.shape[-1] or (torch.is_grad_enabled() and self.weight.requires_grad)
                    or not group.intact()):
                return original(x)            # one row (see ONE_ROW); training: each its own graph
            return group.take(i, x)
        forward.__name__ = "lz_sibling_forward"
        return forward
    return make


def _fuse_group(parent: nn.Module, names: tuple, undo: list) -> None:
    members = [getattr(parent, n) for n in names]
    weights = [m.weight for m in members]
    biases = [m.bias for m in members]
    with torch.no_grad():
        w = torch.cat([t.detach() for t in weights])
        b = None if biases[0] is None else torch.cat([t.detach() for t in biases])
    rows, lo = [], 0
    for t in weights:
        rows.append((lo, lo + t.shape[0]))
        lo += t.shape[0]
    for wt, bt, (r0, r1) in zip(weights, biases, rows):
        # the same Parameter objects, now views of the fused matrix: their own storage is freed
        wt.data = w[r0:r1]
        if bt is not None:
            bt.data = b[r0:r1]

        def restore(wt=wt, bt=bt):
            wt.data = wt.data.clone()              # separate storage again, current values
            if bt is not None:
                bt.data = bt.data.clone()
        undo.append(restore)
    group = _Group(w, b, rows, members)
    for i, m in enumerate(members):
        swap_forward(m, _forward(group, i), undo)


def fuse(model: nn.Module, report: Report, undo: list) -> int:
    """Fuse every whole group of sibling projections in `model`; the number of groups fused.
    Each group is noted in `report` (kind "projections"), fused or skipped with the reason."""
    done = 0
    for name, parent in model.named_modules():
        for names in GROUPS:
            if not all(isinstance(getattr(parent, n, None), nn.Module) for n in names):
                continue
            where = f"{name}.{{{','.join(names)}}}" if name else "{" + ",".join(names) + "}"
            if any(_fused(getattr(parent, n)) for n in names):
                continue
            why = _fusable([getattr(parent, n) for n in names])
            if why:
                report.add(where, "projections", "skipped", detail=f"not fused: {why}")
                continue
            _fuse_group(parent, names, undo)
            report.add(where, "projections", "patched", detail=f"{len(names)} projections as one product")
            done += 1
    return done
