"""Selection and its controls: register, lock/unlock, use, explain, kernels, caching, errors."""
from __future__ import annotations

import pytest
import torch

import layerzero as lz
from layerzero import registry


@pytest.fixture
def qkv():
    return tuple(torch.randn(1, 4, 8, 16) for _ in range(3))




def test_explain_lists_every_kernel_with_status_and_reasons(qkv):
    e = lz.explain("attention", *qkv, softcap=20.0)
    ids = [c.kernel for c in e.candidates]
    assert sorted(ids) == sorted(k.id for k in registry.op_kernels("attention"))
    by = {c.kernel: c for c in e.candidates}
    assert e.chosen == "reference.attention" and by["reference.attention"].status == "chosen"
    assert by["torch.sdpa"].status == "rejected" and "softcap" in by["torch.sdpa"].reasons[0]
    assert by["torch.flex"].status == "eligible" and by["torch.flex"].reasons == []
    assert by["torch.flex"].score < by["reference.attention"].score
    for c in e.candidates:
        assert (c.reasons == []) == (c.status in ("chosen", "eligible"))
        assert (c.score is not None) == (c.status in ("chosen", "eligible"))
    text = str(e)
    assert "torch.flex" in text and "chosen: reference.attention" in text and "softcap has no SDPA" in text


def test_which_matches_the_kernel_that_runs(qkv):
    for kw in ({}, {"is_causal": True}, {"softcap": 5.0}, {"sinks": torch.randn(4)}):
        lz.reset_metrics()
        kid = lz.which("attention", *qkv, **kw)
        lz.attention(*qkv, **kw)
        assert lz.metrics()["calls"]["attention"] == {kid: 1}


def test_register_priority_wins_and_really_runs(qkv, temp_kernel):
    calls = []

    def mine(q, k, v, *rest):
        calls.append(q.shape)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    temp_kernel("attention", "mine.attn", mine, priority=1000, supports=lambda s: [] if s.layout == "bhsd" else ["bhsd only"])
    assert lz.which("attention", *qkv) == "mine.attn"
    lz.attention(*qkv)
    assert calls == [qkv[0].shape] and lz.metrics()["calls"]["attention"] == {"mine.attn": 1}
    qb = [t.transpose(1, 2) for t in qkv]
    e = lz.explain("attention", *qb, layout="bshd")
    assert e.chosen != "mine.attn" and "bhsd only" in {c.kernel: c for c in e.candidates}["mine.attn"].reasons


def test_register_as_decorator_and_errors(temp_kernel):
    @lz.register("swiglu", "mine.swiglu", priority=99)
    def fused(gate, up):
        return torch.nn.functional.silu(gate) * up

    try:
        assert lz.which("swiglu", torch.randn(2, 4), torch.randn(2, 4)) == "mine.swiglu"
        with pytest.raises(ValueError, match="already registered"):
            lz.register("swiglu", "mine.swiglu", fused)
    finally:
        registry.unregister("mine.swiglu")
    with pytest.raises(ValueError, match="unknown op 'softmax'.*attention"):
        lz.register("softmax", "x.y", fused)
    with pytest.raises(ValueError, match="<backend>.<name>"):
        lz.register("swiglu", "nodot", fused)
    with pytest.raises(TypeError, match="fn must be callable"):
        lz.register("swiglu", "x.y", 3)


def test_register_replace_invalidates_cached_decisions(qkv, temp_kernel):
    temp_kernel("attention", "mine.a", lambda *a: reference_attention(*a), priority=1000)
    assert lz.which("attention", *qkv) == "mine.a"
    lz.register("attention", "mine.a", lambda *a: reference_attention(*a), priority=-5, replace=True)
    assert lz.which("attention", *qkv) == "torch.sdpa"


def reference_attention(*args):
    from layerzero import reference
    return reference.attention(*args)


def test_lock_forces_and_unlock_restores(qkv):
    lz.lock("attention", "torch.sdpa_math")
    assert lz.which("attention", *qkv) == "torch.sdpa_math"
    lz.attention(*qkv)
    assert lz.metrics()["calls"]["attention"] == {"torch.sdpa_math": 1}
    assert "locked to torch.sdpa_math" in str(lz.explain("attention", *qkv))
    lz.unlock("attention")
    assert lz.which("attention", *qkv) == "torch.sdpa"


def test_lock_with_conditions(qkv):
    lz.lock("attention", "reference.attention", seq_len_q=">=16")
    assert lz.which("attention", *qkv) == "torch.sdpa"                     # seq 8
    long = [torch.randn(1, 4, 16, 16) for _ in range(3)]
    assert lz.which("attention", *long) == "reference.attention"


def test_lock_that_cannot_run_raises_with_reasons(qkv):
    lz.lock("attention", "torch.sdpa")
    with pytest.raises(ValueError, match="locked to torch.sdpa.*softcap has no SDPA equivalent"):
        lz.attention(*qkv, softcap=3.0)
    with pytest.raises(ValueError, match="implements op 'rms_norm'"):
        lz.lock("attention", "torch.rms_norm")
    with pytest.raises(ValueError, match="unknown kernel 'torch.nope'.*torch.sdpa"):
        lz.lock("attention", "torch.nope")
    with pytest.raises(ValueError, match="unknown op"):
        lz.unlock("attn")


def test_use_scopes_and_nests(qkv):
    with lz.use("torch.sdpa_math"):
        assert lz.which("attention", *qkv) == "torch.sdpa_math"
        with lz.use("reference"):
            assert lz.which("attention", *qkv) == "reference.attention"
            assert lz.which("rms_norm", torch.randn(2, 8), torch.randn(8)) == "reference.rms_norm"
        assert lz.which("attention", *qkv) == "torch.sdpa_math"
        # a backend with no kernel for an op leaves that op alone
        with lz.use("torch.sdpa_math", op="attention"):
            assert lz.which("rms_norm", torch.randn(2, 8), torch.randn(8)) == "torch.rms_norm"
    assert lz.which("attention", *qkv) == "torch.sdpa"


def test_use_is_thread_local(qkv):
    import threading
    seen = []
    with lz.use("reference"):
        t = threading.Thread(target=lambda: seen.append(lz.which("attention", *qkv)))
        t.start()
        t.join()
        assert lz.which("attention", *qkv) == "reference.attention"
    assert seen == ["torch.sdpa"]


def test_use_never_silently_ignored(qkv):
    with lz.use("torch.sdpa"), pytest.raises(ValueError, match="lz.use\\('torch.sdpa'\\).*softcap"):
        lz.attention(*qkv, softcap=2.0)
    with pytest.raises(ValueError, match="unknown backend 'nonesuch'.*torch"):
        with lz.use("nonesuch"):
            pass
    with pytest.raises(ValueError, match="unknown kernel"):
        with lz.use("torch.nonesuch"):
            pass
    with pytest.raises(ValueError, match="implements op 'attention', not 'rms_norm'"):
        with lz.use("torch.sdpa", op="rms_norm"):
            pass


def test_policy_dict_allow_deny_boost(qkv):
    lz.configure(policy={"deny": [{"kernel": "torch.sdpa"}]})
    assert lz.which("attention", *qkv) == "torch.sdpa_flash"
    e = {c.kernel: c for c in lz.explain("attention", *qkv).candidates}
    assert e["torch.sdpa"].status == "denied" and "denied by policy" in e["torch.sdpa"].reasons[0]
    lz.configure(policy={"allow": [{"backend": "reference"}]})
    assert lz.which("attention", *qkv) == "reference.attention"
    lz.configure(policy={"boosts": [{"kernel": "torch.sdpa_math", "priority_add": 100,
                                     "when": {"causal": True}}]})
    assert lz.which("attention", *qkv, is_causal=True) == "torch.sdpa_math"
    assert lz.which("attention", *qkv) == "torch.sdpa"
    lz.configure(policy={})
    assert lz.which("attention", *qkv, is_causal=True) == "torch.sdpa"


def test_nothing_eligible_lists_every_kernel(qkv):
    lz.configure(policy={"deny": [{"backend": "*"}]})
    with pytest.raises(ValueError) as err:
        lz.attention(*qkv)
    msg = str(err.value)
    assert "no kernel can run this attention call" in msg
    for k in registry.op_kernels("attention"):
        assert k.id in msg


def test_decision_cache_hits_and_invalidation(qkv):
    for _ in range(5):
        lz.attention(*qkv, is_causal=True)
    m = lz.metrics()
    assert (m["cache_misses"], m["cache_hits"]) == (1, 4)
    lz.configure(policy={"deny": [{"kernel": "torch.sdpa"}]})   # takes effect on the next call
    lz.attention(*qkv, is_causal=True)
    m = lz.metrics()
    assert m["cache_misses"] == 2 and m["calls"]["attention"] == {"torch.sdpa": 5, "torch.sdpa_flash": 1}


def test_decision_cache_is_bounded(monkeypatch):
    from layerzero import dispatch
    monkeypatch.setattr(dispatch, "MAX_ENTRIES", 50)
    for n in range(1, 200):
        lz.swiglu(torch.randn(n, 2), torch.randn(n, 2))
    assert len(dispatch.fast) <= 50 and len(dispatch.decisions) <= 50
    assert lz.metrics()["calls"]["swiglu"] == {"reference.swiglu": 199}


def test_kernels_and_doctor():
    rows = lz.kernels("attention")
    assert {r.id for r in rows} >= {"torch.sdpa", "torch.sdpa_flash", "torch.sdpa_math", "torch.flex",
                                    "reference.attention"}
    assert all(r.op == "attention" and r.backend == r.id.split(".")[0] for r in rows)
    assert all(r.available == (r.reason is None) for r in lz.kernels())
    with pytest.raises(ValueError, match="unknown op"):
        lz.kernels("attn")
    report = lz.doctor()
    text = str(report)
    assert "torch" in text and "flashinfer-python" in text and "reference.attention" in text
    assert report.as_dict()["system"]["torch"] == torch.__version__


def test_cli_doctor_runs():
    import json
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "layerzero", "doctor"], capture_output=True, text=True)
    assert out.returncode == 0 and "kernels:" in out.stdout
    out = subprocess.run([sys.executable, "-m", "layerzero", "kernels", "--json"], capture_output=True, text=True)
    assert out.returncode == 0 and any(r["id"] == "torch.sdpa" for r in json.loads(out.stdout))


def test_environment_variables(tmp_path):
    import subprocess
    import sys
    policy = tmp_path / "p.yaml"
    policy.write_text("deny:\n  - kernel: torch.sdpa\n")
    code = ("import torch, layerzero as lz; q=torch.randn(1,2,4,8); "
            "print(lz.which('attention', q, q, q), lz.control.strict)")
    env = {"LAYERZERO_POLICY": str(policy), "LAYERZERO_STRICT": "1", "PATH": ""}
    import os
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["torch.sdpa_flash", "True"]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "LAYERZERO_STRICT": "maybe"})
    assert out.returncode != 0 and "LAYERZERO_STRICT='maybe'" in out.stderr


def test_entry_point_plugins(tmp_path, monkeypatch, caplog):
    """Third-party packages register through the layerzero.kernels entry-point group; a broken
    plugin is reported, not raised."""
    import importlib.metadata as md

    class EP:
        def __init__(self, name, fn):
            self.name, self._fn = name, fn

        def load(self):
            return self._fn

    def good():
        lz.register("geglu", "plugin.geglu", lambda g, u, a: torch.nn.functional.gelu(g, approximate=a) * u,
                    priority=500)

    def bad():
        raise ImportError("plugin needs a GPU library")

    monkeypatch.setattr(md, "entry_points", lambda group=None: [EP("good", good), EP("bad", bad)])
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(registry, "entry_point_errors", {})
    try:
        with caplog.at_level("WARNING", logger="layerzero"):
            assert lz.which("geglu", torch.randn(2, 4), torch.randn(2, 4)) == "plugin.geglu"
        assert "kernel plugin 'bad' failed to load: plugin needs a GPU library" in caplog.text
        assert "bad" in registry.entry_point_errors and "plugins that failed" in str(lz.doctor())
    finally:
        registry.unregister("plugin.geglu")
