"""The transformers quickstart (script and notebook) and the e2e benchmark's --tiny smoke run."""
from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_example_runs(capsys):
    runpy.run_path(str(ROOT / "examples" / "transformers_quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "lz.unpatch: bit-identical" in out and "patched at load" in out


def test_quickstart_notebook_executes():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "bit-identical" in text and "patched at load" in text


def test_e2e_benchmark_tiny(tmp_path):
    bench = runpy.run_path(str(ROOT / "benchmarks" / "e2e_transformers.py"))
    path = tmp_path / "e2e.json"
    result = bench["main"](["--tiny", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    (shape,) = result["shapes"]
    v = shape["variants"]
    assert {"eager", "sdpa", "layerzero", "layerzero-attn"} <= set(v)
    assert all("ms" in v[n] for n in ("eager", "sdpa", "layerzero", "layerzero-attn")), v
    assert v["layerzero"]["max_diff_vs_sdpa"] < 1e-4
    assert set(v["layerzero"]["kernels"]) >= {"attention", "rms_norm", "rope", "swiglu"}
    assert "ratio" in shape and shape["best_other"] in ("eager", "sdpa")
    # the +compile variants, a process each (dynamo with the eager backend on CPU)
    for n in ("sdpa+compile", "layerzero+compile"):
        assert "ms" in v[n] and v[n]["max_diff_vs_sdpa"] < 1e-4, v[n]
        assert v[n]["compile_s"] > 0 and v[n]["compile_backend"] == "eager" and v[n]["unique_graphs"] >= 1, v[n]
    assert set(v["layerzero+compile"]["kernels"]) >= {"attention", "rms_norm", "rope", "swiglu"}
    assert v["layerzero+compile"]["graph_breaks"] <= v["sdpa+compile"]["graph_breaks"]
    assert shape["compile_ratio"] > 0 and shape["compile_goal"] == 0.85


def test_e2e_generate_benchmark_tiny(tmp_path):
    """Every variant in a process of its own, batch 1 and 2: fp32 greedy tokens all sdpa's (the
    benchmark asserts it too), static caches compiled into one frame, LayerZero's kernels ran."""
    import layerzero as lz

    bench = runpy.run_path(str(ROOT / "benchmarks" / "e2e_generate.py"))
    path = tmp_path / "gen.json"
    result = bench["main"](["--tiny", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    ran = {"sdpa", "sdpa-static", "lz-patch", "lz-patch-static"}
    if getattr(lz, "generate", None) is not None:
        ran.add("lz-generate")
    else:
        assert result["variants"]["lz-generate"]["status"] == "not available"
    assert {n for n, s in result["variants"].items() if s["status"] == "ok"} == ran, result["variants"]
    rows = result["rows"]
    assert sorted((r["variant"], r["batch"]) for r in rows) == sorted((n, b) for n in ran for b in (1, 2))
    assert result["copy_bandwidth_GBps"] > 0 and result["weight_bytes"] > 0
    for r in rows:
        assert r["same_tokens_as_sdpa"] and (r["prompt"], r["new_tokens"]) == (8, 4), r
        assert r["tok_per_s"] > 0 and r["roofline_pct"] > 0 and r["ttft_ms"] > 0 and r["warmup_s"] > 0, r
        if r["variant"].endswith("-static"):
            assert r["unique_graphs"] == 1 and r["graph_breaks"] == 0, r
        if r["variant"].startswith("lz-"):
            assert {"attention", "rms_norm", "rope", "swiglu"} <= set(r["kernels"]), r
        else:
            assert r["kernels"] == {}, r
    for k in ("b1 8x4", "b2 8x4"):
        assert result["ratio_vs_sdpa-static"][k]["sdpa-static"] == 1.0 and set(result["ratio_vs_sdpa-static"][k]) == ran


def test_e2e_generate_without_lz_generate(tmp_path, monkeypatch):
    """lz-generate reports "not available" (and starts no process) while layerzero has no lz.generate."""
    import layerzero as lz

    monkeypatch.delattr(lz, "generate", raising=False)
    bench = runpy.run_path(str(ROOT / "benchmarks" / "e2e_generate.py"))
    result = bench["main"](["--tiny", "--variants", "lz-generate", "--json", str(tmp_path / "gen.json")])
    assert result["variants"] == {"lz-generate": {"status": "not available", "why": "this layerzero has no lz.generate"}}
    assert result["rows"] == []


def test_static_generate_benchmark_tiny(tmp_path):
    """Static-cache generate() auto-compiles the patched model into one frame, no graph break."""
    bench = runpy.run_path(str(ROOT / "benchmarks" / "static_generate.py"))
    path = tmp_path / "static.json"
    result = bench["main"](["--tiny", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    for row in result["variants"].values():
        assert row["unique_graphs"] == 1 and row["graph_breaks"] == 0, row
    assert result["ratio_tok_s"] > 0
