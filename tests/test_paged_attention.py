"""lz.paged_attention: every kernel against a float64 dense reference built row by row from the
pages (random page order, pages shared by rows, stale NaN slots, left-padded queries, GQA,
windows, softcap, sinks), the metadata's FlashInfer form, selection, and the errors."""
from __future__ import annotations

import math

import pytest
import torch

import layerzero as lz
from layerzero import reference, registry
from layerzero.paged import csr
from helpers import assert_fa_rule


def _available():
    return [k.id for k in registry.op_kernels("paged_attention") if registry.unavailable_reason(k) is None]


def _paged(b=3, hq=4, hkv=2, d=16, dv=16, sq=3, page_size=4, lens=(9, 1, 14), dtype=torch.float32,
           seed=0, share=False):
    """Random pages in random order; row b's pages hold its lens[b] keys, the rest of the pool
    (unused pages, the tails of partly filled pages) holds NaN. With `share`, row 1 starts with
    row 0's first page. Returns (q, k_pages, v_pages, page_table, seq_lens, dense K/V per row)."""
    g = torch.Generator().manual_seed(seed)
    per_row = [-(-n // page_size) for n in lens]
    num_pages = sum(per_row) + 3
    order = torch.randperm(num_pages, generator=g).tolist()
    k_pages = torch.full((num_pages, page_size, hkv, d), float("nan"), dtype=dtype)
    v_pages = torch.full((num_pages, page_size, hkv, dv), float("nan"), dtype=dtype)
    table = torch.full((b, max(per_row) + 2), -1, dtype=torch.int32)
    dense = []
    for row, (n, pages) in enumerate(zip(lens, per_row)):
        ids = [order.pop() for _ in range(pages)]
        if share and row == 1 and n >= page_size and lens[0] >= page_size:
            ids[0] = int(table[0, 0])
        k = torch.randn(n, hkv, d, generator=g).to(dtype)
        v = torch.randn(n, hkv, dv, generator=g).to(dtype)
        if share and row == 1 and n >= page_size and lens[0] >= page_size:
            k[:page_size], v[:page_size] = dense[0][0][:page_size], dense[0][1][:page_size]
        for t in range(n):
            k_pages[ids[t // page_size], t % page_size] = k[t]
            v_pages[ids[t // page_size], t % page_size] = v[t]
        table[row, :pages] = torch.tensor(ids, dtype=torch.int32)
        dense.append((k, v))
    q = torch.randn(b, hq, sq, d, generator=g).to(dtype)
    return q, k_pages, v_pages, table, torch.tensor(lens, dtype=torch.int32), dense


def _dense_reference(q, dense, upcast, **kw):
    """Row by row: lz.attention's reference on the row's dense K/V, queries aligned bottom-right
    (queries before the row's first key attend nothing under causal -> zeros)."""
    outs = []
    for row, (k, v) in enumerate(dense):
        qr = q[row:row + 1]
        if k.shape[0] == 0:
            outs.append(torch.zeros(1, q.shape[1], q.shape[2], v.shape[-1], dtype=qr.dtype))
            continue
        kr, vr = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)   # (1, Hkv, n, D)
        if upcast:
            qr, kr, vr = qr.double(), kr.double(), vr.double()
            kw = {n: (x.double() if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}
        outs.append(reference.attention(qr, kr, vr, causal_align="bottom_right", upcast=upcast, **kw))
    return torch.cat(outs)


CASES = {
    "plain": dict(),
    "gqa_window": dict(window=(3, 0)),
    "window_both_sides_noncausal": dict(is_causal=False, window=(2, 1)),
    "softcap_sinks": dict(softcap=5.0, sinks="yes"),
    "mqa_scale": dict(hkv=1, scale=0.3),
    "left_padded_queries": dict(sq=6, lens=(9, 2, 0)),      # rows with fewer keys than queries
    "decode_page1": dict(sq=1, page_size=1, lens=(5, 1, 3)),
    "shared_page_dv": dict(share=True, dv=8, lens=(9, 6, 14)),
}


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kernel", _available())
def test_matches_dense_attention_row_by_row(kernel, case, dtype, layout):
    c = dict(CASES[case])
    op_kw = {n: c.pop(n) for n in ("window", "is_causal", "softcap", "scale") if n in c}
    sinks = c.pop("sinks", None)
    q, kp, vp, table, lens, dense = _paged(dtype=dtype, **c)
    if sinks:
        op_kw["sinks"] = torch.randn(q.shape[1], generator=torch.Generator().manual_seed(3)).to(dtype)
    ref_kw = {"is_causal": op_kw.get("is_causal", True), **{n: v for n, v in op_kw.items() if n != "is_causal"}}
    ref = _dense_reference(q, dense, True, **ref_kw)
    base = _dense_reference(q, dense, False, **ref_kw)
    qq = q if layout == "bhsd" else q.transpose(1, 2)
    lz.reset_metrics()
    with lz.use(kernel):
        assert lz.which("paged_attention", qq, kp, vp, table, lens, layout=layout, **op_kw) == kernel
        out = lz.paged_attention(qq, kp, vp, table, lens, layout=layout, **op_kw)
    assert lz.metrics()["calls"]["paged_attention"] == {kernel: 1}
    out = out if layout == "bhsd" else out.transpose(1, 2)
    assert_fa_rule(out, ref, base, f"{kernel} {case}")
    if op_kw.get("is_causal", True):   # queries before a row's first key: exactly zero
        for row, n in enumerate(lens.tolist()):
            assert not out[row, :, :max(0, q.shape[2] - n)].any()


def test_a_row_holding_nothing_and_unused_table_entries_give_zeros_not_nan():
    q, kp, vp, table, lens, _ = _paged(lens=(0, 0, 0))
    out = lz.paged_attention(q, kp, vp, table, lens)
    assert out.shape == (3, 4, 3, 16) and torch.isfinite(out).all() and not out.any()


def test_grad_flows_to_the_pages_that_were_read():
    q, kp, vp, table, lens, _ = _paged(lens=(5, 3, 2))
    kp, vp = kp.nan_to_num(0.0).requires_grad_(), vp.nan_to_num(0.0).requires_grad_()
    q.requires_grad_()
    lz.paged_attention(q, kp, vp, table, lens).square().sum().backward()
    used = set(table[:, :2].flatten().tolist()) - {-1}
    for page in range(kp.shape[0]):
        assert bool(vp.grad[page].any()) == (page in used)
    assert q.grad.abs().sum() > 0


def test_csr_form_for_flashinfer():
    _, _, _, table, lens, _ = _paged(lens=(9, 1, 0), page_size=4)
    indptr, indices, last = csr(table, lens, 4)
    assert indptr.tolist() == [0, 3, 4, 4]
    assert indices.tolist() == table[0, :3].tolist() + table[1, :1].tolist()
    assert last.tolist() == [1, 1, 0]
    assert indptr.dtype == indices.dtype == last.dtype == torch.int32


def test_selection_explain_and_policy():
    q, kp, vp, table, lens, _ = _paged()
    d = lz.explain("paged_attention", q, kp, vp, table, lens, window=(3, 0))
    assert d.chosen == "reference.paged_attention"
    spec = d.spec.as_dict()
    assert spec["page_size"] == 4 and spec["seq_len_k"] == table.shape[1] * 4 and spec["window"] == (3, 0)
    assert spec["causal_align"] == "bottom_right" and "mask" not in spec
    assert "paged_attention" in str(d).splitlines()[0]
    lz.lock("paged_attention", "reference.paged_attention")
    assert lz.which("paged_attention", q, kp, vp, table, lens) == "reference.paged_attention"
    lz.unlock("paged_attention")
    lz.configure(policy={"deny": [{"kernel": "reference.paged_attention", "when": {"page_size": 4}}]})
    with pytest.raises(ValueError, match="reference.paged_attention"):
        lz.paged_attention(q, kp, vp, table, lens)
    assert lz.which("paged_attention", *_paged(page_size=2)[:5]) == "reference.paged_attention"
    lz.configure(policy={})
    assert [k.id for k in registry.op_kernels("paged_attention")] and lz.kernels("paged_attention")


def _bad(**over):
    q, kp, vp, table, lens, _ = _paged()
    args = dict(q=q, k_pages=kp, v_pages=vp, page_table=table, seq_lens=lens)
    kw = {n: over.pop(n) for n in list(over) if n not in args}
    args.update(over)
    return lambda: lz.paged_attention(*args.values(), **kw)


@pytest.mark.parametrize("over, exc, says", [
    (dict(q=torch.randn(3, 4, 16)), ValueError, "q must be 4-D"),
    (dict(k_pages=torch.randn(11, 4, 3, 16), v_pages=torch.randn(11, 4, 3, 16)), ValueError,
     "multiple of the pages' kv heads"),
    (dict(v_pages=torch.randn(5, 4, 2, 16)), ValueError, "same num_pages, page_size and kv_heads"),
    (dict(k_pages=torch.randn(11, 4, 2, 8)), ValueError, "same head_dim"),
    (dict(k_pages=torch.randn(12, 4, 2, 16, dtype=torch.float64)), TypeError, "must match"),
    (dict(page_table=torch.zeros(3, 4)), TypeError, "page_table has dtype torch.float32; allowed: int32, int64"),
    (dict(page_table=torch.zeros(2, 4, dtype=torch.int32)), ValueError, "page_table has shape (2, 4)"),
    (dict(seq_lens=torch.zeros(3, 1, dtype=torch.int32)), ValueError, "seq_lens must be 1-D"),
    (dict(seq_lens=torch.zeros(2, dtype=torch.int64)), ValueError, "seq_lens has shape (2,)"),
    (dict(seq_lens=[1, 2, 3]), TypeError, "seq_lens must be a torch.Tensor"),
    (dict(sinks=torch.randn(2)), ValueError, "sinks has shape (2,)"),
    (dict(window=(1, -2)), ValueError, "window right=-2"),
    (dict(layout="nhd"), ValueError, "layout='nhd'"),
    (dict(is_causal=1), TypeError, "is_causal must be a bool"),
    (dict(softcap=-1.0), ValueError, "softcap=-1.0"),
    # values the kernel reads: named, never an IndexError or garbage
    (dict(seq_lens=torch.tensor([9, 1, 99], dtype=torch.int32)), ValueError, "seq_lens[2] = 99; allowed: 0..24"),
    (dict(page_table=torch.full((3, 6), 40, dtype=torch.int32)), ValueError, "page_table[0, 0] = 40"),
])
def test_bad_calls_name_the_argument(over, exc, says):
    with pytest.raises(exc) as e:
        _bad(**over)()
    assert says in str(e.value)


def test_unused_table_entries_may_be_anything():
    q, kp, vp, table, lens, dense = _paged()
    want = lz.paged_attention(q, kp, vp, table, lens)
    table2 = table.clone()
    for row, n in enumerate(lens.tolist()):
        table2[row, math.ceil(n / 4):] = 10_000 + row
    assert torch.equal(lz.paged_attention(q, kp, vp, table2, lens), want)
