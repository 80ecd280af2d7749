"""The `layerzero` command: doctor, kernels, explain, bench, tune; JSON output, exit statuses and
messages on bad arguments. The installed console script is run as a user would."""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

import layerzero as lz
from layerzero import cli


def run(capsys, *argv):
    """cli.main(argv) -> (exit status, stdout, stderr); explain/bench describe CPU calls unless
    told otherwise (the default device is cuda where there is one)."""
    argv = list(argv)
    if argv[0] in ("explain", "bench") and "--device" not in argv:
        argv += ["--device", "cpu"]
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def script() -> str:
    """The installed `layerzero` console script (next to this Python, else on PATH). Skips only
    where the project is not installed at all (run from source, as on the GPU host)."""
    try:
        importlib.metadata.distribution("layerzero")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("layerzero is not pip-installed here, so it has no console script")
    path = shutil.which("layerzero", path=os.pathsep.join(
        [os.path.dirname(sys.executable), sysconfig.get_path("scripts"), os.environ.get("PATH", "")]))
    assert path, "the layerzero console script is not installed (pip install -e .)"
    return path


@pytest.mark.parametrize("argv", [
    ["doctor", "--json"],
    ["kernels", "--json"],
    ["explain", "attention", "--q", "1,32,2048,128", "--kv-heads", "8", "--dtype", "bfloat16",
     "--causal", "--json"],
])
def test_console_script_runs_and_prints_json(argv):
    r = subprocess.run([script(), *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    if argv[0] == "doctor":
        assert {"system", "packages", "kernels"} <= set(data)
    elif argv[0] == "kernels":
        assert {"reference.attention", "torch.sdpa"} <= {k["id"] for k in data}
    else:
        assert data["chosen"] and data["spec"]["num_kv_heads"] == 8 and data["spec"]["causal"]


def test_python_dash_m_and_plain_tables():
    r = subprocess.run([sys.executable, "-m", "layerzero", "kernels", "--op", "rms_norm"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "torch.rms_norm" in r.stdout and "reference.rms_norm" in r.stdout
    assert "torch.sdpa" not in r.stdout


def test_explain_agrees_with_lz_which(capsys):
    code, out, _ = run(capsys, "explain", "attention", "--q", "2,4,16,8", "--kv-heads", "2",
                       "--causal", "--softcap", "20", "--json")
    assert code == 0
    d = json.loads(out)
    q, k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    assert d["chosen"] == lz.which("attention", q, k, v, is_causal=True, softcap=20.0)
    by = {c["kernel"]: c for c in d["candidates"]}
    assert by["torch.sdpa"]["status"] == "rejected" and "softcap" in by["torch.sdpa"]["reasons"][0]


def test_explain_plain_table(capsys):
    code, out, _ = run(capsys, "explain", "rms_norm", "--x", "3,64", "--residual")
    assert code == 0
    assert out.splitlines()[0].startswith("rms_norm: device=cpu")
    assert f"chosen: {lz.which('rms_norm', torch.randn(3, 64), torch.randn(64), residual=torch.randn(3, 64))}" in out


@pytest.mark.parametrize("argv, key", [
    (["layer_norm", "--x", "2,32", "--no-bias"], "layer_norm"),
    (["rope", "--q", "1,4,8,16", "--rot-dim", "8", "--layout", "bshd"], "rope"),
    (["swiglu", "--x", "2,16"], "swiglu"),
    (["geglu", "--x", "2,16", "--approximate", "tanh"], "geglu"),
    (["sample", "--x", "2,50", "--top-k", "5"], "sample"),
    (["attention", "--window", "4,0", "--mask", "bool", "--alibi", "--layout", "bshd"], "attention"),
    (["paged_attention", "--q", "2,8,3,64", "--kv-heads", "2", "--page-size", "4", "--window", "15,0",
      "--softcap", "30", "--sinks"], "paged_attention"),
])
def test_explain_every_op(capsys, argv, key):
    code, out, _ = run(capsys, "explain", *argv, "--json")
    assert code == 0
    d = json.loads(out)
    assert d["op"] == key and d["chosen"] is not None


def test_explain_describes_a_gpu_that_is_not_here(capsys):
    code, out, _ = run(capsys, "explain", "attention", "--q", "1,32,2048,128", "--dtype",
                       "bfloat16", "--device", "cuda", "--sm", "90", "--json")
    assert code == 0
    d = json.loads(out)
    assert d["spec"]["device"] == "cuda" and d["spec"]["sm"] == 90
    by = {c["kernel"]: c for c in d["candidates"]}
    assert "needs a CUDA device" not in " ".join(by["torch.sdpa_efficient"]["reasons"])


def test_explain_uses_a_policy_file_and_exits_1_when_nothing_can_run(capsys, tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("locks:\n  - {op: attention, kernel: torch.sdpa}\n")
    code, out, _ = run(capsys, "explain", "attention", "--policy", str(p))
    assert code == 0 and "locked to torch.sdpa" in out
    code, out, _ = run(capsys, "explain", "attention", "--policy", str(p), "--softcap", "5", "--json")
    assert code == 1
    assert "softcap has no SDPA equivalent" in json.loads(out)["error"]


def test_bench_times_every_eligible_kernel_and_the_pick(capsys):
    code, out, _ = run(capsys, "bench", "rms_norm", "--x", "4,64", "--repeat", "3", "--warmup", "1",
                       "--json")
    assert code == 0
    d = json.loads(out)
    e = lz.explain("rms_norm", torch.randn(4, 64), torch.randn(64))
    assert {r["kernel"] for r in d["kernels"]} == {
        c.kernel for c in e.candidates if c.status in ("chosen", "eligible")} >= {"reference.rms_norm"}
    assert all(r["median_s"] > 0 for r in d["kernels"])
    assert d["lz"]["kernel"] == d["chosen"] == e.chosen and d["lz"]["median_s"] > 0
    code, out, _ = run(capsys, "bench", "swiglu", "--x", "4,64", "--repeat", "2")
    assert code == 0 and "lz.swiglu (runs " in out and "fastest:" in out


def test_tune_says_it_is_not_available(capsys):
    code, out, err = run(capsys, "tune")
    assert code == 1 and out == ""
    assert "performance database" in err and "not implemented yet" in err


@pytest.mark.parametrize("argv, fragment", [
    (["explain", "attention", "--q", "1,2,3"], "expected B,H,S,D: 4 comma-separated positive integers"),
    (["explain", "attention", "--q", "1,2,x,4"], "expected B,H,S,D"),
    (["explain", "attn"], "invalid choice: 'attn'"),
    (["explain", "attention", "--dtype", "bf16"], "invalid choice: 'bf16'"),
    (["kernels", "--op", "attn"], "invalid choice: 'attn'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["explain", "rms_norm", "--causal"], "unrecognized arguments: --causal"),
    (["bench", "attention", "--sm", "90"], "unrecognized arguments: --sm 90"),
])
def test_bad_arguments_exit_2_with_a_message(capsys, argv, fragment):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert fragment in capsys.readouterr().err


BAD_CALLS = [
    (["explain", "attention", "--q", "1,6,4,8", "--kv-heads", "4"], "must be a multiple of k/v heads"),
    (["explain", "attention", "--device", "tpu9"], "is not a torch device"),
    (["explain", "attention", "--sm", "90", "--device", "cpu"], "--sm describes a CUDA GPU"),
    (["explain", "attention", "--policy", "/nonexistent/p.yaml"], "cannot be read"),
    (["bench", "rms_norm", "--repeat", "0"], "--repeat must be >= 1"),
]
if not torch.cuda.is_available():
    BAD_CALLS.append((["explain", "attention", "--device", "cuda"], "no CUDA device here; pass --sm"))


@pytest.mark.parametrize("argv, fragment", BAD_CALLS)
def test_bad_calls_exit_2_with_a_message(capsys, argv, fragment):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith(f"layerzero {argv[0]}: error:") and fragment in err, err


def test_rich_table_on_a_terminal(capsys, monkeypatch):
    pytest.importorskip("rich")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    cli.table("title", ["kernel", "reasons"], [["a.b", "needs [x]"]], "footer")
    out = capsys.readouterr().out
    assert "needs [x]" in out and "footer" in out and "─" in out


@pytest.mark.parametrize("argv, option", [
    (["attention", "--kv-heads", "0"], "--kv-heads"),
    (["attention", "--seq-k", "0"], "--seq-k"),
    (["attention", "--head-dim-v", "-3"], "--head-dim-v"),
    (["rope", "--rot-dim", "0"], "--rot-dim"),
])
def test_counts_of_zero_are_rejected_not_replaced(capsys, argv, option):
    with pytest.raises(SystemExit) as e:
        cli.main(["explain", *argv, "--device", "cpu"])
    assert e.value.code == 2
    assert f"argument {option}: expected a positive integer, got '{argv[-1]}'" in capsys.readouterr().err


@pytest.mark.parametrize("window", [["--window", "-1,0"], ["--window=-1,0"], ["--window", "-1,-1"]])
def test_window_takes_a_negative_left_as_a_separate_argument(capsys, window):
    code, out, err = run(capsys, "explain", "attention", *window, "--json")
    assert code == 0, err
    assert json.loads(out)["spec"]["window"] == [int(x) for x in window[-1].split("=")[-1].split(",")]
    with pytest.raises(SystemExit):
        cli.main(["explain", "attention", "--help"])
    assert "--window -1,0" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("argv, usage", [
    (["explain", "rms_norm", "--x", "2,8", "--bogus"], "usage: layerzero explain rms_norm"),
    (["bench", "attention", "--sm", "90"], "usage: layerzero bench attention"),
    (["doctor", "--bogus"], "usage: layerzero doctor"),
])
def test_unknown_option_prints_the_subcommands_usage(capsys, argv, usage):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(usage) and "unrecognized arguments" in err, err


def test_device_must_exist_here(capsys, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)   # as on Linux
    for command in ("explain", "bench"):
        code, _, err = run(capsys, command, "rms_norm", "--device", "mps")
        assert code == 2 and "--device 'mps' is not available here" in err, err
    code, _, err = run(capsys, "explain", "rms_norm", "--device", f"cuda:{torch.cuda.device_count()}",
                       "--sm", "90")
    assert code == 0, err                      # --sm describes a GPU: it need not be here


def test_bench_reports_progress_on_stderr(capsys):
    code, out, err = run(capsys, "bench", "rms_norm", "--x", "4,64", "--repeat", "2", "--warmup", "0",
                         "--json")
    assert code == 0
    d = json.loads(out)
    names = [r["kernel"] for r in d["kernels"]] + ["lz.rms_norm"]
    lines = err.splitlines()
    assert len(lines) == len(names)
    for i, (line, name) in enumerate(zip(lines, names), 1):
        assert line.startswith(f"bench: [{i}/{len(names)}] {name}") and " ms" in line, line


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"layerzero {lz.__version__} (torch {torch.__version__})\n"
