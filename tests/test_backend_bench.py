"""benchmarks/attention.py stays runnable: its --smoke mode times three tiny CPU calls through
the same code path the GPU run uses (kernel timings, lz pick, oracle, SDPA baseline, JSON)."""
from __future__ import annotations

import importlib.util
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def test_attention_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_attention", os.path.join(HERE, "..", "benchmarks", "attention.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert len(bench.CALLS) >= 30
    assert {c[1] for c in bench.CALLS} == {"prefill", "decode", "feature"}
    res = bench.main(["--smoke", "--skip", "torch.flex", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "attention.json").read_text())
    assert data["summary"]["calls"] == 4 == len(res["calls"])
    for row in data["calls"]:
        assert row["lz_pick"] in row["kernels"] and row["oracle"] in row["kernels"]
        assert row["lz_ms"] > 0 and row["sdpa_ms"] > 0 and row["lz_over_oracle"] > 0
        assert row["skipped"] == {"torch.flex": "--skip"} or "torch.flex" not in row["kernels"]
    assert data["calls"][2]["sdpa_is"] == "eager"                    # softcap: SDPA can't express it
    pad = data["calls"][3]                                             # a caller's mask: same semantics
    assert pad["sdpa_is"] == "sdpa+mask+zero-rows" and pad["sdpa_without_zero_rows_ms"] > 0
    assert pad["lz_ran"] and not pad["lz_fallbacks"]
    has_mpl = importlib.util.find_spec("matplotlib") is not None   # on the GPU host; not in dev
    assert (tmp_path / "attention.png").exists() == has_mpl
