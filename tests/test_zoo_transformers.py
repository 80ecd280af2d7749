"""The transformers zoo in CI (issue 14): scripts/zoo_transformers.py on a deterministic sample of
the installed transformers' model families - the families below that are always in, every
SAMPLE_STRIDE-th family of each kind (causal / encoder / seq2seq, in the auto mappings' order) and
every known failure - run in 2 spawned worker processes. ZOO_ALL=1 runs every family.

Per family: the tiny eager model is built; lz.patch gives the same output on the non-padding
positions (atol = rtol = 1e-4) and lz.unpatch gives it back bit-exact; attn_implementation=
"layerzero" gives the same output or is refused on purpose (ValueError from LayerZero); where the
report says attention was patched, or the "layerzero" attention was selected on a model with softmax
attention, LayerZero's attention op really ran (lz.metrics()).

KNOWN_FAILURES are xfail(strict=True): a fix makes them XPASS, which fails, and the entry goes.
NOT_BUILT are families the harness cannot build or feed (a harness limit, not LayerZero's).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "zoo_transformers.py"

# family -> why it fails now (every kind it appears in)
KNOWN_FAILURES: dict = {}

# family -> why the harness cannot run it
NOT_BUILT = {
    "gemma3n": "its vision tower (TimmWrapperModel) needs the timm package",
    "layoutlmv2": "needs detectron2",
    "gemma4_assistant": "a draft model: needs the target model's shared_kv_states",
    "gemma4_unified_assistant": "a draft model: needs the target model's shared_kv_states",
    "perceiver": "PerceiverModel takes `inputs`, not token ids",
    "voxtral_realtime": "needs input_features (audio)",
}

ALWAYS = ["llama", "mistral", "gemma2", "gemma3", "gemma3_text", "qwen2", "qwen3", "mixtral", "phi3",
          "gpt2", "bloom", "falcon", "gpt_neo", "mpt", "bert", "roberta", "t5", "bart", "gemma4_text",
          "deepseek_v3", "mamba2", "bamba", "zamba2", "granitemoehybrid", "qwen4_exp", "git", "gpt_oss"]
SAMPLE_STRIDE = 2
WORKERS = max(1, min(2, os.cpu_count() or 1))


def _zoo():
    spec = importlib.util.spec_from_file_location("zoo_transformers_ci", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


zoo = _zoo()


def _tasks() -> list[tuple[str, str]]:
    everything = os.environ.get("ZOO_ALL") == "1"
    out = []
    for kind in zoo.KINDS:
        fams = zoo.families(kind)
        for i, fam in enumerate(fams):
            if everything or i % SAMPLE_STRIDE == 0 or fam in ALWAYS or fam in KNOWN_FAILURES:
                out.append((kind, fam))
    return out


TASKS = _tasks()


def _param(kind, fam):
    marks = [pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[fam])] if fam in KNOWN_FAILURES else []
    return pytest.param(kind, fam, marks=marks, id=f"{kind}-{fam}")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """Every sampled family through the harness, once (worker processes: one family crashing or
    hanging costs that family, not the run)."""
    out = tmp_path_factory.mktemp("zoo") / "zoo.json"
    cmd = [sys.executable, str(SCRIPT), "--only", *[f"{k}:{f}" for k, f in TASKS], "--json", str(out),
           "--workers", str(WORKERS), "--timeout", "120", "--no-sdpa", "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {(r["kind"], r["family"]): r for r in json.loads(out.read_text())}


def test_sample_covers_families():
    kinds = {k for k, _ in TASKS}
    assert kinds == set(zoo.KINDS)
    names = {f for _, f in TASKS}
    assert set(ALWAYS) <= names, set(ALWAYS) - names
    assert set(KNOWN_FAILURES) <= names, "a known failure is no family of this transformers: remove it"


@pytest.mark.parametrize("kind,family", [_param(k, f) for k, f in TASKS])
def test_family(rows, kind, family):
    row = rows[(kind, family)]
    if not row["built"]:
        if family in NOT_BUILT:
            pytest.skip(f"not built ({NOT_BUILT[family]}): {row['not_built']}")
        pytest.fail(f"the harness could not build {kind} {family}: {row['not_built']}")
    assert family not in NOT_BUILT, f"{family} builds now: remove it from NOT_BUILT"
    p, a = row["patch"], row["attn"]
    detail = {k: p.get(k) for k in ("status", "where", "error", "max_diff", "patched_ops")}
    assert p["status"] == "ok", f"lz.patch route: {detail}"
    assert p["unpatch_exact"], "lz.unpatch did not restore the reference output bit-exact"
    if p.get("attention"):
        assert p["attention_ran"], f"report says attention is patched, but no LayerZero attention ran: {p['ran']}"
    assert a["status"] in ("ok", "refused"), f"attn_implementation='layerzero' route: {a}"
    if a["status"] == "ok" and a.get("attn_implementation") == "layerzero" and row["has_softmax_attention"]:
        assert a["attention_ran"], f"attn_implementation='layerzero' selected, no LayerZero attention ran: {a}"
