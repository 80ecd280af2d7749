"""Policies: every clause (locks, allow, deny, boosts) and every `when` operator changes selection
as documented; bad policies raise naming the file, line and key; changes apply on the next call;
several files merge with the later one winning."""
from __future__ import annotations

import fnmatch
import os
import textwrap

import pytest
import torch

import layerzero as lz
from layerzero import control, ops, policy, registry
from layerzero.select import select


def qkv(b=1, h=2, s=4, d=16, hk=None, sk=None, dtype=torch.float32, layout="bhsd"):
    hk, sk = hk or h, sk or s
    shapes = [(b, h, s, d), (b, hk, sk, d), (b, hk, sk, d)]
    if layout == "bshd":
        shapes = [(x[0], x[2], x[1], x[3]) for x in shapes]
    return tuple(torch.randn(*x, dtype=dtype) for x in shapes)


def write(tmp_path, text, name="policy.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def _split(kw):
    shape = {n: kw.pop(n) for n in ("b", "h", "s", "d", "hk", "sk", "dtype", "layout") if n in kw}
    if "layout" in shape:
        kw["layout"] = shape["layout"]
    return qkv(**shape), kw


def which(**kw):
    args, kw = _split(dict(kw))
    return lz.which("attention", *args, **kw)


def best(skip=(), keep="*", op="attention", args=None, **kw):
    """The kernel the backends alone would pick (no policy), among those matching the glob `keep`
    and not in `skip`: what a policy test expects once its rule has removed the others. Computed,
    not written down, so new backends or priorities don't break these tests."""
    if args is None:
        args, kw = _split(dict(kw))
    spec, _ = ops.describe(op, args, kw)
    order = select(spec, registry.op_kernels(op), policy.Policy()).order
    return next(k.id for k in order if k.id not in skip and fnmatch.fnmatchcase(k.id, keep))


def rms_args():
    return torch.randn(2, 8), torch.randn(8)


# ---- clauses ----------------------------------------------------------------------------------

def test_no_policy_picks_by_priority():
    assert which() == best() != "reference.attention"


def test_lock_forces_a_kernel_only_when_its_conditions_hold():
    lz.configure(policy={"locks": [{"op": "attention", "kernel": "torch.sdpa_math",
                                    "when": {"head_dim": ">=16", "dtype": {"in": ["float32"]}}}]})
    e = lz.explain("attention", *qkv(d=16))
    assert e.chosen == "torch.sdpa_math" and "locked to torch.sdpa_math" in e.note
    assert which(d=8) == best(d=8) != "torch.sdpa_math"      # head_dim 8: the lock doesn't apply
    assert which(d=16, dtype=torch.float64) == best(d=16, dtype=torch.float64)  # dtype not listed


def test_lock_op_is_inferred_from_the_kernel():
    lz.configure(policy={"locks": [{"kernel": "reference.attention"}]})
    assert which() == "reference.attention"
    assert lz.which("rms_norm", *rms_args()) == best(op="rms_norm", args=rms_args())


def test_allow_limits_the_ops_it_covers_and_no_others():
    lz.configure(policy={"allow": [{"kernel": "reference.attention"}]})
    e = lz.explain("attention", *qkv())
    assert e.chosen == "reference.attention"
    by = {c.kernel: c for c in e.candidates}
    assert by["torch.sdpa"].status == "denied"
    assert "not in the policy's allow list" in by["torch.sdpa"].reasons[0]
    # rms_norm has no kernel the allow list names: it is not restricted
    assert lz.which("rms_norm", *rms_args()) == best(op="rms_norm", args=rms_args()) != "reference.rms_norm"


def test_allow_and_deny_take_globs_and_deny_beats_allow_within_a_file():
    lz.configure(policy={"allow": [{"kernel": "torch.sdpa_*"}]})   # not torch.sdpa itself
    assert which() == best(keep="torch.sdpa_*")
    lz.configure(policy={"allow": [{"kernel": "torch.sdpa*"}], "deny": [{"kernel": "torch.sdpa"}]})
    assert which() == best(keep="torch.sdpa*", skip=("torch.sdpa",))
    lz.configure(policy={"allow": [{"backend": "torch"}],
                         "deny": [{"kernel": "torch.sdpa"}, {"kernel": "torch.sdpa_flash"}]})
    e = lz.explain("attention", *qkv())
    assert e.chosen == best(keep="torch.*", skip=("torch.sdpa", "torch.sdpa_flash"))
    by = {c.kernel: c for c in e.candidates}
    assert by["reference.attention"].status == "denied"   # not in allow
    assert by["torch.sdpa"].status == "denied" and "denied by policy" in by["torch.sdpa"].reasons[0]


def test_allow_under_when_restricts_only_matching_calls():
    lz.configure(policy={"allow": [{"backend": "reference", "when": {"seq_len_q": 1}}]})
    assert which(s=1, sk=8) == "reference.attention"
    assert which(s=4) == best(s=4) != "reference.attention"


def test_deny_with_when_and_op():
    top = best(is_causal=True)
    lz.configure(policy={"deny": [{"op": "attention", "kernel": top, "when": {"causal": True}}]})
    assert which(is_causal=True) == best(skip=(top,), is_causal=True)
    assert which(is_causal=False) == best(is_causal=False) == top


def test_boost_adds_priority_under_conditions():
    lz.configure(policy={"boosts": [{"kernel": "reference.*", "priority_add": 100,
                                     "when": {"seq_len_q": "<=1"}}]})
    e = lz.explain("attention", *qkv(s=1, sk=8))
    assert e.chosen == "reference.attention"
    assert {c.kernel: c.score for c in e.candidates}["reference.attention"] == 100
    assert which(s=4) == best(s=4) != "reference.attention"
    lz.configure(policy={"boosts": [{"backend": "torch", "priority_add": -100}]})
    assert which() == "reference.attention"


def test_lock_beats_deny_and_allow():
    lz.configure(policy={"locks": [{"op": "attention", "kernel": "torch.sdpa_math"}],
                         "deny": [{"kernel": "torch.sdpa_math"}], "allow": [{"backend": "reference"}]})
    assert which() == "torch.sdpa_math"


# ---- every operator and property -------------------------------------------------------------

@pytest.mark.parametrize("cond, holds", [
    (16, True), (8, False), ("16", True),
    ("==16", True), ("== 8", False), ("!=16", False), ("!=8", True),
    (">8", True), (">16", False), (">=16", True), (">=17", False),
    ("<32", True), ("<16", False), ("<=16", True), ("<=15", False),
    ({"in": [8, 16]}, True), ({"in": [8, 32]}, False),
    ({"not_in": [8, 32]}, True), ({"not_in": [16]}, False),
])
def test_every_operator(cond, holds):
    lz.configure(policy={"locks": [{"op": "attention", "kernel": "reference.attention",
                                    "when": {"head_dim": cond}}]})
    assert which(d=16) == ("reference.attention" if holds else best(d=16))


@pytest.mark.parametrize("prop, cond, call, other", [
    ("op", "attention", {}, None),
    ("device", "cpu", {}, None),
    ("device", {"match": "cu*"}, None, {}),
    ("sm", 0, {}, None),
    ("dtype", "float64", {"dtype": torch.float64}, {}),
    ("dtype", {"match": "float*"}, {}, None),
    ("dtype", {"match": "bfloat*"}, {"dtype": torch.bfloat16}, {}),
    ("batch", ">1", {"b": 2}, {}),
    ("num_heads", 4, {"h": 4}, {}),
    ("num_kv_heads", "<2", {"h": 4, "hk": 1}, {"h": 4}),
    ("seq_len_q", "<=1", {"s": 1, "sk": 8}, {}),
    ("seq_len_k", ">=8", {"sk": 8}, {}),
    ("head_dim", ">=16", {}, {"d": 8}),
    ("head_dim_v", 16, {}, {"d": 8}),
    ("layout", "bshd", {"layout": "bshd"}, {}),
    ("causal", True, {"is_causal": True}, {}),
    ("causal_align", "bottom_right", {"is_causal": True, "causal_align": "bottom_right", "sk": 8},
     {"is_causal": True, "sk": 8}),
    ("mask", "bool", {"attn_mask": torch.ones(4, 4, dtype=torch.bool)}, {}),
    ("has_mask", True, {"attn_mask": torch.zeros(4, 4)}, {}),
    ("window", [2, 0], {"window": (2, 0)}, {"window": (3, 0)}),
    ("window", None, {}, {"window": (2, 0)}),
    ("softcap", True, {"softcap": 5.0}, {}),
    ("alibi", True, {"alibi_slopes": torch.rand(2)}, {}),
    ("sinks", True, {"sinks": torch.randn(2)}, {}),
    ("dropout", True, {"dropout_p": 0.1}, {}),
])
def test_every_property(prop, cond, call, other):
    lz.configure(policy={"locks": [{"op": "attention", "kernel": "reference.attention",
                                    "when": {prop: cond}}]})
    if call is not None:
        assert which(**call) == "reference.attention"
    if other is not None:
        assert which(**other) != "reference.attention"


def test_grad_property():
    lz.configure(policy={"locks": [{"op": "attention", "kernel": "reference.attention",
                                    "when": {"grad": True}}]})
    q, k, v = (t.requires_grad_() for t in qkv())
    assert lz.which("attention", q, k, v) == "reference.attention"
    assert which() == best() != "reference.attention"


def test_every_documented_property_is_known():
    documented = ("op", "dtype", "device", "sm", "batch", "num_heads", "num_kv_heads", "head_dim",
                  "seq_len_q", "seq_len_k", "causal", "has_mask", "window", "softcap")
    assert set(documented) <= set(policy.PROPERTIES)


# ---- a lock that can't run the call raises, never silently ignored -------------------------

def test_policy_lock_that_cannot_run_the_call_raises_its_reasons():
    lz.configure(policy={"locks": [{"op": "attention", "kernel": "torch.sdpa"}]})
    q, k, v = qkv()
    with pytest.raises(ValueError, match="locked to torch.sdpa.*softcap has no SDPA equivalent"):
        lz.attention(q, k, v, softcap=5.0)
    with pytest.raises(ValueError, match="softcap has no SDPA equivalent"):
        lz.which("attention", q, k, v, softcap=5.0)
    e = lz.explain("attention", q, k, v, softcap=5.0)
    assert e.chosen is None and "locked to torch.sdpa" in e.error


def test_lz_lock_takes_when_conditions_and_raises_when_it_cannot_run():
    lz.lock("attention", "torch.sdpa_math", head_dim=">=16")
    assert which(d=16) == "torch.sdpa_math" and which(d=8) == best(d=8) != "torch.sdpa_math"
    with pytest.raises(ValueError, match="softcap has no SDPA equivalent"):
        lz.attention(*qkv(d=16), softcap=5.0)
    lz.unlock("attention")
    with pytest.raises(ValueError, match=r"lz.lock\('attention', 'torch.sdpa_math'\) \(head_dim\).*unknown operator"):
        lz.lock("attention", "torch.sdpa_math", head_dim="=>16")
    with pytest.raises(ValueError, match="unknown property 'headdim'; known: op, device"):
        lz.lock("attention", "torch.sdpa_math", headdim=16)


@pytest.mark.parametrize("kernel", ["torch.*", "torch.sdpa_?ath", "[t]orch.sdpa"])
def test_lz_lock_with_a_glob_says_so_as_the_policy_file_does(kernel):
    with pytest.raises(ValueError, match="not a glob") as file_error:
        lz.configure(policy={"locks": [{"op": "attention", "kernel": kernel}]})
    with pytest.raises(ValueError) as e:
        lz.lock("attention", kernel)
    assert str(e.value) == (f"lz.lock('attention', {kernel!r}): "
                            f"a lock names one kernel id, not a glob: {kernel!r}")
    assert str(file_error.value).endswith(str(e.value).split(": ", 1)[1])
    assert control.lock_rules == ()


def test_version_may_be_written_as_a_string():
    for version in (1, "1", " 1 "):
        assert policy.from_dict({"version": version}).sources == ("policy dict",)


# ---- errors name the place -----------------------------------------------------------------

@pytest.mark.parametrize("data, where, fragment", [
    ({"lock": []}, "policy dict (lock)", "unknown key 'lock'; allowed: version, locks, allow, deny, boosts"),
    ({"version": 2}, "(version)", "unsupported version 2; the only version is 1"),
    ({"version": "v1"}, "(version)", "unsupported version 'v1'; the only version is 1"),
    ({"version": True}, "(version)", "unsupported version True; the only version is 1"),
    ({"locks": {"op": "attention"}}, "(locks)", "takes a list"),
    ({"locks": ["torch.sdpa"]}, "(locks[0])", "each locks entry is a mapping"),
    ({"locks": [{"op": "attn", "kernel": "torch.sdpa"}]}, "(locks[0].op)",
     "unknown op 'attn'; known ops: attention, rms_norm"),
    ({"locks": [{"op": "attention", "kernel": "flash.fa9"}]}, "(locks[0].kernel)",
     "unknown kernel 'flash.fa9'; known kernels: "),
    ({"locks": [{"op": "rms_norm", "kernel": "torch.sdpa"}]}, "(locks[0].op)",
     "kernel 'torch.sdpa' implements op 'attention', not 'rms_norm'"),
    ({"locks": [{"kernel": "torch.*"}]}, "(locks[0].kernel)", "not a glob"),
    ({"locks": [{"op": "attention"}]}, "(locks[0])", "a lock needs 'kernel'"),
    ({"allow": [{"backend": "nosuch"}]}, "(allow[0].backend)",
     "backend 'nosuch' matches no known backend; known backends: "),
    ({"deny": [{"kernel": "torch.nothing*"}]}, "(deny[0].kernel)", "matches no known kernel"),
    ({"deny": [{"op": "rms_norm", "kernel": "torch.sdpa"}]}, "(deny[0].kernel)",
     "matches no known kernel of op 'rms_norm'"),
    ({"deny": [{"when": {"causal": True}}]}, "(deny[0])", "needs 'kernel' or 'backend'"),
    ({"deny": [{"kernel": "torch.sdpa", "priority_add": 3}]}, "(deny[0].priority_add)",
     "unknown key 'priority_add' in deny; allowed: op, kernel, backend, when"),
    ({"deny": [{"kernel": 5}]}, "(deny[0].kernel)", "'kernel' takes a string, got 5"),
    ({"boosts": [{"kernel": "torch.sdpa", "priority_add": "10"}]}, "(boosts[0].priority_add)",
     "an integer; got '10'"),
    ({"boosts": [{"kernel": "torch.sdpa"}]}, "(boosts[0].priority_add)", "needs 'priority_add'"),
    ({"deny": [{"kernel": "torch.sdpa", "when": [1]}]}, "(deny[0].when)", "'when' takes a mapping"),
    ({"deny": [{"kernel": "torch.sdpa", "when": {"heads": 2}}]}, "(deny[0].when.heads)",
     "unknown property 'heads'; known: op, device, sm, dtype"),
    ({"deny": [{"kernel": "torch.sdpa", "when": {"head_dim": "=>64"}}]}, "(deny[0].when.head_dim)",
     "unknown operator in '=>64'; allowed: ==, !=, >, >=, <, <="),
    ({"deny": [{"kernel": "torch.sdpa", "when": {"head_dim": "<>64"}}]}, "(deny[0].when.head_dim)",
     "unknown operator"),
    ({"deny": [{"kernel": "torch.sdpa", "when": {"head_dim": {"gt": 64}}}]},
     "(deny[0].when.head_dim.gt)", "unknown operator 'gt'; allowed"),
    ({"deny": [{"kernel": "torch.sdpa", "when": {"head_dim": {"in": 64}}}]},
     "(deny[0].when.head_dim.in)", "'in' takes a non-empty list"),
    ({"deny": [{"kernel": "torch.sdpa", "when": {"head_dim": [64, 128]}}]},
     "(deny[0].when.head_dim)", "a list needs an operator: {in: [64, 128]}"),
    ({"deny": [{"kernel": "torch.sdpa", "when": {"head_dim": "big"}}]}, "(deny[0].when.head_dim)",
     "head_dim takes an integer, got 'big'"),
    ({"deny": [{"kernel": "torch.sdpa", "when": {"head_dim": True}}]}, "(deny[0].when.head_dim)",
     "takes an integer"),
    ({"deny": [{"kernel": "torch.sdpa", "when": {"causal": 1}}]}, "(deny[0].when.causal)",
     "causal takes true or false"),
    ({"deny": [{"kernel": "torch.sdpa", "when": {"dtype": "bf16"}}]}, "(deny[0].when.dtype)",
     "unknown dtype 'bf16'; known: float16, bfloat16"),
    ({"deny": [{"kernel": "torch.sdpa", "when": {"dtype": ">float16"}}]}, "(deny[0].when.dtype)",
     "operator '>' needs a numeric property"),
    ({"deny": [{"kernel": "torch.sdpa", "when": {"layout": "bhds"}}]}, "(deny[0].when.layout)",
     "layout='bhds' is unknown; known: bhsd, bshd"),
    ({"deny": [{"kernel": "torch.sdpa", "when": {"device": "gpu"}}]}, "(deny[0].when.device)",
     "device takes a device type such as cpu, cuda"),
    ({"deny": [{"kernel": "torch.sdpa", "when": {"op": "attn"}}]}, "(deny[0].when.op)",
     "op='attn' is unknown; known: attention, rms_norm"),
    ({"deny": [{"kernel": "torch.sdpa", "when": {"head_dim": {"match": "6*"}}}]},
     "(deny[0].when.head_dim.match)", "'match' needs a string property"),
    ({"deny": [{"kernel": "torch.sdpa", "when": {"window": [1]}}]}, "(deny[0].when.window)",
     "window takes null or a [left, right] pair"),
])
def test_bad_policy_dict_names_the_place(data, where, fragment):
    with pytest.raises(ValueError) as err:
        lz.configure(policy=data)
    msg = str(err.value)
    assert where in msg and fragment in msg, msg
    if "known kernels" in fragment:
        assert "reference.attention" in msg and "torch.sdpa_math" in msg
    if "known backends" in fragment:
        assert "reference" in msg and "torch" in msg


def test_policy_of_the_wrong_type():
    with pytest.raises(TypeError, match="policy must be a dict, a path to a YAML file"):
        lz.configure(policy=3)


YAML_ERRORS = [
    # (file text, line, fragment)
    ("locks:\n  - op: attention\n    kernel: torch.sdpa\n    when: {head_dim: [64\n", 5, "malformed YAML"),
    ("locks:\n  - op: attention\n    kernel: torch.sdpa_flash\n    when:\n      head_dim: >=64\n", 5,
     'quote it, e.g. ">=64"'),
    ("version: 1\nboosts:\n  - kernel: torch.sdpa\n    priority_add: ten\n", 4,
     "(boosts[0].priority_add): a boost needs 'priority_add', an integer; got 'ten'"),
    ("deny:\n  - kernel: torch.sdpa\n  - kernel: torch.sdpa_math\n    when:\n      dtype: bf16\n", 5,
     "(deny[1].when.dtype): unknown dtype 'bf16'"),
    ("allow:\n  - backend: flash_attnx\n", 2, "(allow[0].backend): backend 'flash_attnx' matches no known backend; known backends:"),
    ("locks:\n  - op: atention\n    kernel: torch.sdpa\n", 2, "(locks[0].op): unknown op 'atention'; known ops: attention"),
    ("locks:\n\n  - op: attention\n    kernel: torch.sdpa_fast\n", 4,
     "(locks[0].kernel): unknown kernel 'torch.sdpa_fast'; known kernels:"),
    ("deny:\n  - kernel: torch.sdpa\n    when: {seq_len_q: '=<1'}\n", 3, "(deny[0].when.seq_len_q): unknown operator"),
    ("deny:\n  - kernel: torch.sdpa\nlocks: []\ndeny: []\n", 4, "key 'deny' appears twice (lines 1 and 4)"),
    ("- kernel: torch.sdpa\n", 1, "a policy is a mapping with keys version, locks"),
    ("boost:\n  - kernel: torch.sdpa\n", 1, "(boost): unknown key 'boost'"),
    ("a: 1\n---\nb: 2\n", 2, "malformed YAML"),
]


@pytest.mark.parametrize("text, line, fragment", YAML_ERRORS)
def test_bad_yaml_names_file_line_and_key(tmp_path, text, line, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ValueError) as err:
        lz.configure(policy=path)
    msg = str(err.value)
    assert msg.startswith(f"policy file {path}, line {line}"), msg
    assert fragment in msg, msg


def test_missing_policy_file(tmp_path):
    with pytest.raises(ValueError, match="cannot be read"):
        lz.configure(policy=str(tmp_path / "nope.yaml"))


def test_a_failed_configure_keeps_the_previous_policy(tmp_path):
    lz.configure(policy={"deny": [{"kernel": "torch.sdpa"}]})
    with pytest.raises(ValueError):
        lz.configure(policy={"deny": [{"kernel": "nope.x"}]})
    assert which() == best(skip=("torch.sdpa",))


# ---- YAML end to end, explain shows where a rule came from -----------------------------------

ISSUE_EXAMPLE = """\
version: 1
locks:                      # force a kernel for an op, optionally only when conditions hold
  - op: attention
    kernel: torch.sdpa_math
    when: {head_dim: ">=64", dtype: {in: [bfloat16, float16]}}
allow:                      # if present, only these are eligible
  - backend: reference
  - kernel: "torch.sdpa*"
deny:
  - kernel: torch.sdpa_flash
boosts:
  - kernel: "reference.*"
    priority_add: 100
    when: {seq_len_q: "<=1"}
"""


def test_the_issue_example_policy_file(tmp_path):
    path = write(tmp_path, ISSUE_EXAMPLE)
    lz.configure(policy=path)
    assert which(d=64, dtype=torch.bfloat16) == "torch.sdpa_math"     # lock
    assert which(d=64) == best(keep="torch.sdpa*", skip=("torch.sdpa_flash",), d=64)  # float32: no lock
    assert which(s=1, sk=8) == "reference.attention"                   # boost
    e = lz.explain("attention", *qkv())
    by = {c.kernel: c for c in e.candidates}
    assert by["torch.flex"].status == "denied"                         # not in allow
    assert by["torch.sdpa_flash"].reasons == [
        f"denied by policy (kernel=torch.sdpa_flash; policy file {path}, line 10 (deny[0]))"]


def test_environment_variable_loads_policy(tmp_path, monkeypatch):
    path = write(tmp_path, "deny:\n  - kernel: torch.sdpa\n")
    monkeypatch.setenv("LAYERZERO_POLICY", path)
    control.load_environment()
    assert which() == best(skip=("torch.sdpa",))


# ---- changes apply on the next call ----------------------------------------------------------

def test_a_policy_change_takes_effect_on_the_next_call(tmp_path):
    q, k, v = qkv()
    top = best(args=(q, k, v))
    second = best(skip=(top,), args=(q, k, v))
    assert top.startswith("torch.") and second.startswith("torch.sdpa")  # no compile needed
    lz.attention(q, k, v)
    lz.attention(q, k, v)                                  # now served from the cache
    assert lz.metrics()["calls"]["attention"] == {top: 2}
    path = write(tmp_path, f"deny:\n  - kernel: {top}\n")
    lz.configure(policy=path)
    lz.attention(q, k, v)
    assert lz.metrics()["calls"]["attention"] == {top: 2, second: 1}
    write(tmp_path, "deny:\n  - backend: torch\n")        # the file changed: configure re-reads it
    lz.configure(policy=path)
    lz.attention(q, k, v)
    assert lz.metrics()["calls"]["attention"]["reference.attention"] == 1
    lz.configure(policy={})
    lz.attention(q, k, v)
    assert lz.metrics()["calls"]["attention"][top] == 3


# ---- several files: later wins --------------------------------------------------------------

def test_several_files_merge_and_the_later_wins(tmp_path):
    base = write(tmp_path, """\
        locks:
          - {op: attention, kernel: torch.sdpa_math}
        allow:
          - backend: torch
        """, "base.yaml")
    override = write(tmp_path, """\
        locks:
          - {op: attention, kernel: reference.attention, when: {seq_len_q: 1}}
        deny:
          - kernel: torch.sdpa
        """, "override.yaml")
    lz.configure(policy=[base, override])
    assert which(s=4) == "torch.sdpa_math"                 # only base's lock matches
    assert which(s=1, sk=8) == "reference.attention"       # both match: the later lock wins
    lz.configure(policy={})
    lz.configure(policy=os.pathsep.join([base, override]))  # LAYERZERO_POLICY's form
    assert which(s=1, sk=8) == "reference.attention"

    # allow/deny: for each kernel, the last file with a rule matching it decides
    allow_torch = {"allow": [{"kernel": "torch.*"}]}
    deny_sdpa = {"deny": [{"kernel": "torch.sdpa"}]}
    lz.configure(policy=[allow_torch, deny_sdpa])
    assert which() == best(keep="torch.*", skip=("torch.sdpa",))
    lz.configure(policy=[deny_sdpa, allow_torch])
    assert which() == best(keep="torch.*")
    assert "torch.sdpa" in [c.kernel for c in lz.explain("attention", *qkv()).candidates
                            if c.status in ("chosen", "eligible")]
    # allow lists add up across files
    lz.configure(policy=[{"allow": [{"kernel": "torch.sdpa_math"}]},
                         {"allow": [{"kernel": "reference.attention"}]}])
    e = lz.explain("attention", *qkv())
    assert e.chosen == "torch.sdpa_math"
    assert sorted(c.kernel for c in e.candidates if c.status in ("chosen", "eligible")) == [
        "reference.attention", "torch.sdpa_math"]


def test_lz_lock_wins_over_policy_file_locks():
    lz.configure(policy={"locks": [{"op": "attention", "kernel": "torch.sdpa_math"}]})
    lz.lock("attention", "reference.attention")
    assert which() == "reference.attention"
    lz.unlock("attention")
    assert which() == "torch.sdpa_math"
