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


def test_e2e_generate_benchmark_tiny(tmp_path):
    bench = runpy.run_path(str(ROOT / "benchmarks" / "e2e_generate.py"))
    path = tmp_path / "gen.json"
    result = bench["main"](["--tiny", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    assert result["same_tokens"] and result["ratio"] > 0
    assert {"attention", "rms_norm", "rope", "swiglu"} <= set(result["kernels"]), result["kernels"]


def test_static_generate_benchmark_tiny(tmp_path):
    """Static-cache generate() auto-compiles the patched model into one frame, no graph break."""
    bench = runpy.run_path(str(ROOT / "benchmarks" / "static_generate.py"))
    path = tmp_path / "static.json"
    result = bench["main"](["--tiny", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    for row in result["variants"].values():
        assert row["unique_graphs"] == 1 and row["graph_breaks"] == 0, row
    assert result["ratio_tok_s"] > 0
