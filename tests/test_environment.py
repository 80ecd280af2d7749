"""LAYERZERO_POLICY / LAYERZERO_STRICT / LAYERZERO_LOG: a bad value never makes `import layerzero`
raise. Each variable is applied on its own; a bad one is not applied, its message is kept in
`control.environment_error` and logged once at ERROR level; an explicit `lz.configure` of the same
setting clears it; `lz.doctor()` / `layerzero doctor` report it, every other command refuses."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

import layerzero as lz
from layerzero import cli, control

VARS = ("LAYERZERO_POLICY", "LAYERZERO_STRICT", "LAYERZERO_LOG")


@pytest.fixture
def env(monkeypatch):
    """Set environment variables for `control.load_environment()`; everything it changes (the
    kept errors, strict, the policy, the logger) is put back afterwards."""
    log = logging.getLogger("layerzero")
    level, handlers = log.level, list(log.handlers)
    monkeypatch.setattr(control, "environment_errors", {})
    monkeypatch.setattr(control, "environment_error", None)
    for name in VARS:
        monkeypatch.delenv(name, raising=False)

    def set_env(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        control.load_environment()
    yield set_env
    log.setLevel(level)
    log.handlers[:] = handlers
    lz.configure(policy={}, strict=False)


def test_each_variable_applies_on_its_own_and_a_bad_one_is_kept_not_raised(env, caplog, tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("deny:\n  - kernel: torch.sdpa_fast\n")
    gen, before = control.generation, control.file_policy
    with caplog.at_level(logging.ERROR, logger="layerzero"):
        env(LAYERZERO_LOG="info", LAYERZERO_STRICT="maybe", LAYERZERO_POLICY=str(bad))
        assert logging.getLogger("layerzero").level == logging.INFO  # the good one is applied
    assert control.strict is False and control.file_policy is before
    err = control.environment_error
    assert "LAYERZERO_STRICT='maybe'" in err and "allowed: 0, 1, true, false, yes, no" in err
    assert f"LAYERZERO_POLICY={str(bad)!r}" in err and "line 2 (deny[0].kernel)" in err
    assert "LAYERZERO_LOG" not in err
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "LAYERZERO_STRICT='maybe'" in errors[0].getMessage()

    lz.configure(strict=True)                       # an explicit setting replaces the bad one
    assert control.strict is True and "LAYERZERO_STRICT" not in control.environment_error
    assert control.generation > gen
    lz.configure(policy={})
    assert control.environment_error is None


def test_bad_log_level_is_kept(env):
    env(LAYERZERO_LOG="chatty")
    assert control.environment_error == ("LAYERZERO_LOG='chatty' is not a log level; "
                                         "allowed: debug, info, warning, error, critical")
    env(LAYERZERO_LOG="debug")                      # reading the environment again clears it
    assert control.environment_error is None
    assert logging.getLogger("layerzero").isEnabledFor(logging.DEBUG)


def test_a_failed_configure_keeps_the_error(env):
    env(LAYERZERO_POLICY="/nonexistent/p.yaml")
    with pytest.raises(ValueError, match="unknown op"):
        lz.configure(policy={"deny": [{"op": "attn", "kernel": "torch.sdpa"}]})
    assert "LAYERZERO_POLICY='/nonexistent/p.yaml'" in control.environment_error


def test_doctor_reports_it_and_other_commands_refuse(env, capsys):
    env(LAYERZERO_STRICT="maybe")
    report = lz.doctor()
    assert report.problems == [control.environment_error]        # one line per variable
    assert "\nproblems (every op call raises" in str(report) and "LAYERZERO_STRICT='maybe'" in str(report)
    assert cli.main(["doctor", "--json"]) == 1      # the full report, and a status scripts see
    out, _ = capsys.readouterr()
    d = json.loads(out)
    assert d["problems"] == report.problems and d["kernels"]
    for argv in (["kernels"], ["explain", "rms_norm", "--device", "cpu"]):
        assert cli.main(argv) == 2
        out, err = capsys.readouterr()
        assert out == "" and err == f"layerzero: error: {control.environment_error}\n"


def test_import_never_raises_and_the_cli_reports(tmp_path):
    """A fresh process with all three variables bad: `import layerzero` works, the error is
    logged once, `layerzero doctor` prints its report with the problems and exits 1."""
    env = dict(os.environ, LAYERZERO_LOG="chatty", LAYERZERO_STRICT="maybe",
               LAYERZERO_POLICY=str(tmp_path / "missing.yaml"), LAYERZERO_CACHE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "layerzero", "doctor", "--json"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("LAYERZERO_STRICT='maybe'") == 1, r.stderr
    problems = json.loads(r.stdout)["problems"]
    assert [p.split("=")[0] for p in problems] == ["LAYERZERO_LOG", "LAYERZERO_STRICT",
                                                   "LAYERZERO_POLICY"]
