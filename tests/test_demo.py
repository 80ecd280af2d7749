"""`make run`'s demo and the overhead benchmark run end to end (no timing assertions: goals
live in the benchmark's printed ratio, not in tests)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_overhead_benchmark_runs(tmp_path):
    out = tmp_path / "overhead.json"
    r = subprocess.run([sys.executable, "benchmarks/overhead.py", "--calls", "200", "--rounds", "2",
                        "--json", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "ratio t(lz)/t(sdpa)" in r.stdout
    data = json.loads(out.read_text())
    assert data["kernel"] == "torch.sdpa" and data["ratio"] > 0


def test_demo_runs():
    r = subprocess.run([sys.executable, "examples/demo.py"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    for text in ("LayerZero doctor", "chosen: reference.attention", "chosen: torch.sdpa_flash",
                 "chosen: torch.rms_norm", "ratio t(lz)/t(sdpa)"):
        assert text in r.stdout
