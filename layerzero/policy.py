"""Selection policy: locks, allow, deny and boosts, each optionally under `when` conditions.

A policy is a dict, or a YAML file holding one (docs/policy.md has the full reference)::

    version: 1
    locks:                        # force a kernel for an op (the last matching lock wins)
      - op: attention
        kernel: torch.sdpa_flash
        when: {head_dim: ">=64", dtype: {in: [bfloat16, float16]}}
    allow:                        # if present, only these are eligible for the ops they cover
      - backend: torch
      - kernel: "reference.*"
    deny:
      - kernel: torch.sdpa_math
    boosts:                       # added to a kernel's priority
      - kernel: torch.flex
        priority_add: 20
        when: {seq_len_q: ">1"}

`when` maps a call property (a `CallSpec` field, or `has_mask`) to a condition: a scalar means
`==`; a string may start with `==`, `!=`, `>`, `>=`, `<`, `<=`; a mapping takes `in`, `not_in` or
`match` (a glob). `kernel` and `backend` accept globs. Every name is checked when the policy is
loaded: an unknown op, kernel, backend, property or operator raises ValueError naming the file,
the line and the key, and listing what is allowed.

Several policies merge in order and the later one wins: the last lock that matches a call decides;
for each kernel, the last file with an allow or deny rule matching it decides (within one file deny
beats allow); allow lists and boosts add up.
"""
from __future__ import annotations

import fnmatch
import logging
import operator
import os
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

from . import registry
from .call import CallSpec

log = logging.getLogger("layerzero")

SECTIONS = ("version", "locks", "allow", "deny", "boosts")
KEYS = {"locks": ("op", "kernel", "when"),
        "allow": ("op", "kernel", "backend", "when"),
        "deny": ("op", "kernel", "backend", "when"),
        "boosts": ("op", "kernel", "backend", "when", "priority_add")}
_CMP = {"==": operator.eq, "!=": operator.ne, ">=": operator.ge, "<=": operator.le,
        ">": operator.gt, "<": operator.lt}
_PREFIXES = (">=", "<=", "==", "!=", ">", "<")   # longest first
_MAP_TESTS = ("in", "not_in", "match")
OPERATORS = "==, !=, >, >=, <, <= (as a string prefix, e.g. \">=64\"), or a mapping {in: [...]}, " \
            "{not_in: [...]}, {match: glob}"

# What a property holds, which decides the values and operators a condition on it may use.
_INT, _BOOL, _DTYPE, _DEVICE, _WINDOW, _STR = "int", "bool", "dtype", "device", "window", "str"
KINDS: dict[str, object] = {
    "op": "ops", "device": _DEVICE, "sm": _INT, "dtype": _DTYPE, "batch": _INT, "num_heads": _INT,
    "num_kv_heads": _INT, "seq_len_q": _INT, "seq_len_k": _INT, "head_dim": _INT,
    "head_dim_v": _INT, "layout": ("bhsd", "bshd"), "causal": _BOOL,
    "causal_align": ("top_left", "bottom_right"), "mask": ("none", "bool", "float"),
    "has_mask": _BOOL, "window": _WINDOW, "softcap": _BOOL, "alibi": _BOOL, "sinks": _BOOL,
    "dropout": _BOOL, "grad": _BOOL, "page_size": _INT,
}
# Every CallSpec field but `flags` (a set, not a value), plus has_mask. Fields added to CallSpec
# later become properties too, compared as strings until KINDS says more.
PROPERTIES = tuple(f for f in CallSpec._fields if f != "flags") + ("has_mask",)


def spec_value(spec, prop: str):
    """The value of property `prop` for a call, as policies compare it."""
    if prop == "has_mask":
        return spec.mask != "none"
    if prop == "dtype":
        return str(spec.dtype).replace("torch.", "")
    return getattr(spec, prop)


# ---- where a value came from: file, line and key path ---------------------------------------

class Source(NamedTuple):
    """A policy's origin: `name` (a file path or "policy dict") and the line of each key path
    (YAML only)."""
    name: str
    lines: dict

    def at(self, path: tuple) -> str:
        """'policy file p.yaml, line 7 (locks[0].when.head_dim)' for a key path."""
        dotted = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p))
                         for i, p in enumerate(path))
        line = next((self.lines[path[:n]] for n in range(len(path), -1, -1)
                     if path[:n] in self.lines), None)
        place = self.name + (f", line {line}" if line else "")
        return f"{place} ({dotted})" if dotted else place


def _fail(src: Source, path: tuple, msg: str):
    raise ValueError(f"{src.at(path)}: {msg}")


# ---- conditions -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Condition:
    prop: str
    test: str      # an operator of _CMP, "in", "not_in" or "match"
    value: object

    def __call__(self, spec) -> bool:
        v = spec_value(spec, self.prop)
        if self.test == "in":
            return v in self.value
        if self.test == "not_in":
            return v not in self.value
        if self.test == "match":
            return fnmatch.fnmatchcase(str(v), self.value)
        try:
            return _CMP[self.test](v, self.value)
        except TypeError:  # e.g. None > 3 for a property a call doesn't set: the condition fails
            return False

    def describe(self) -> str:
        return f"{self.prop} {self.test} {self.value!r}"


def _typed(prop: str, value, src: Source, path: tuple):
    """`value` checked (and normalised) against what property `prop` holds."""
    kind = KINDS.get(prop, _STR)
    if kind == "ops":
        kind = registry.OPS
    if kind == _INT:
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(src, path, f"{prop} takes an integer, got {value!r}")
        return value
    if kind == _BOOL:
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if not isinstance(value, bool):
            _fail(src, path, f"{prop} takes true or false, got {value!r}")
        return value
    if kind == _WINDOW:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            return None
        if isinstance(value, str):
            value = [p.strip() for p in value.split(",")]
            value = [int(p) if p.lstrip("-").isdigit() else p for p in value]
        if (not isinstance(value, (list, tuple)) or len(value) != 2
                or any(isinstance(x, bool) or not isinstance(x, int) or x < -1 for x in value)):
            _fail(src, path, f"window takes null or a [left, right] pair of ints >= -1, got {value!r}")
        return tuple(value)
    if not isinstance(value, str):
        _fail(src, path, f"{prop} takes a string, got {value!r}")
    value = value.strip()
    if kind == _DTYPE:
        name = value.replace("torch.", "")
        dt = getattr(torch, name, None)
        if not isinstance(dt, torch.dtype):
            _fail(src, path, f"unknown dtype {value!r}; known: float16, bfloat16, float32, float64 "
                             f"(or any torch dtype name)")
        return str(dt).replace("torch.", "")
    if kind == _DEVICE:
        try:
            dev = torch.device(value)
        except (RuntimeError, ValueError):
            dev = None
        if dev is None or dev.index is not None:
            _fail(src, path, f"device takes a device type such as cpu, cuda, mps, xpu (no index), "
                             f"got {value!r}")
        return dev.type
    if isinstance(kind, tuple) and value not in kind:
        _fail(src, path, f"{prop}={value!r} is unknown; known: {', '.join(kind)}")
    return value


def _parse_condition(prop: str, cond, src: Source, path: tuple) -> Condition:
    kind = KINDS.get(prop, _STR)
    if isinstance(cond, dict):
        if len(cond) != 1:
            _fail(src, path, f"a mapping condition holds exactly one operator; allowed: {OPERATORS}")
        test, value = next(iter(cond.items()))
        if test not in _MAP_TESTS:
            _fail(src, path + (test,), f"unknown operator {test!r}; allowed: {OPERATORS}")
        if test == "match":
            if not isinstance(value, str):
                _fail(src, path + (test,), f"'match' takes a glob string, got {value!r}")
            if kind in (_INT, _BOOL, _WINDOW):
                _fail(src, path + (test,), f"'match' needs a string property; {prop} is {kind}")
            return Condition(prop, "match", value)
        if not isinstance(value, list) or not value:
            _fail(src, path + (test,), f"{test!r} takes a non-empty list, got {value!r}")
        return Condition(prop, test, tuple(_typed(prop, x, src, path + (test, i))
                                           for i, x in enumerate(value)))
    if isinstance(cond, str) and cond.strip()[:1] in ("=", "!", "<", ">"):
        text = cond.strip()
        test = next((o for o in _PREFIXES if text.startswith(o)), None)
        rest = text[len(test):].strip() if test else ""
        if test is None or not rest or rest[:1] in ("=", "!", "<", ">"):
            _fail(src, path, f"unknown operator in {cond!r}; allowed: {OPERATORS}")
        if test in ("<", "<=", ">", ">=") and kind != _INT:
            _fail(src, path, f"operator {test!r} needs a numeric property "
                             f"({', '.join(p for p, k in KINDS.items() if k == _INT)}); {prop} is not")
        return Condition(prop, test, _typed(prop, rest, src, path))
    if isinstance(cond, list) and kind != _WINDOW:
        _fail(src, path, f"a list needs an operator: {{in: {cond!r}}} or {{not_in: {cond!r}}}")
    return Condition(prop, "==", _typed(prop, cond, src, path))


def parse_when(when, where: str | Source = "lz.lock", path: tuple = ()) -> tuple[Condition, ...]:
    """Conditions from a `when` mapping (property -> condition); `where` names the place for
    errors (a label such as "lz.lock" or a policy Source)."""
    src = where if isinstance(where, Source) else Source(where, {})
    if when is None:
        return ()
    if not isinstance(when, dict):
        _fail(src, path, f"'when' takes a mapping of property -> condition, got {when!r}")
    conds = []
    for prop, cond in when.items():
        if prop not in PROPERTIES:
            _fail(src, path + (prop,), f"unknown property {prop!r}; known: {', '.join(PROPERTIES)}")
        conds.append(_parse_condition(prop, cond, src, path + (prop,)))
    return tuple(conds)


# ---- rules and the policy ---------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    kernel: str | None = None     # glob over kernel ids (locks: one exact id)
    backend: str | None = None    # glob over backend names
    op: str | None = None
    when: tuple[Condition, ...] = ()
    priority_add: int = 0
    origin: str = ""              # where it was written, for explain's reasons
    layer: int = 0                # index of the policy it came from, in merge order

    def matches_kernel(self, k) -> bool:
        if self.op is not None and k.op != self.op:
            return False
        if self.kernel is not None and not fnmatch.fnmatchcase(k.id, self.kernel):
            return False
        return self.backend is None or fnmatch.fnmatchcase(k.backend, self.backend)

    def applies(self, k, spec) -> bool:
        return self.matches_kernel(k) and all(c(spec) for c in self.when)

    def covers(self, spec) -> bool:
        """Does this (allow) rule speak about this call: its op and conditions hold, and it names
        at least one kernel of the call's op?"""
        return ((self.op is None or self.op == spec.op) and all(c(spec) for c in self.when)
                and any(self.matches_kernel(k) for k in registry.op_kernels(spec.op)))

    def describe(self) -> str:
        parts = [f"{n}={getattr(self, n)}" for n in ("op", "kernel", "backend") if getattr(self, n)]
        parts += [c.describe() for c in self.when]
        return ", ".join(parts) + (f"; {self.origin}" if self.origin else "")


@dataclass(frozen=True)
class Policy:
    locks: tuple[Rule, ...] = ()
    allow: tuple[Rule, ...] = ()
    deny: tuple[Rule, ...] = ()
    boosts: tuple[Rule, ...] = ()
    sources: tuple[str, ...] = field(default=())

    def lock_for(self, spec) -> Rule | None:
        """The lock in force for this call (the last matching one wins), or None."""
        for rule in reversed(self.locks):
            if rule.op == spec.op and all(c(spec) for c in rule.when):
                return rule
        return None

    def denial(self, k, spec) -> str | None:
        """Why the policy keeps kernel `k` from this call, or None if it may run it."""
        verdict = None  # (layer, is_deny, rule): the latest file's word; deny first within one
        for rules, is_deny in ((self.allow, False), (self.deny, True)):
            for r in rules:
                if r.applies(k, spec) and (verdict is None or (r.layer, is_deny) > verdict[:2]):
                    verdict = (r.layer, is_deny, r)
        if verdict is not None:
            return f"denied by policy ({verdict[2].describe()})" if verdict[1] else None
        covering = [r for r in self.allow if r.covers(spec)]
        if covering:
            return (f"not in the policy's allow list for this call "
                    f"({'; '.join(r.describe() for r in covering)})")
        return None

    def boost(self, k, spec) -> int:
        return sum(r.priority_add for r in self.boosts if r.applies(k, spec))

    def merged(self, other: "Policy") -> "Policy":
        """This policy followed by `other`, which wins where they disagree."""
        n = len(self.sources)

        def shift(rules):
            return tuple(replace(r, layer=r.layer + n) for r in rules)

        return Policy(self.locks + shift(other.locks), self.allow + shift(other.allow),
                      self.deny + shift(other.deny), self.boosts + shift(other.boosts),
                      self.sources + other.sources)

    def summary(self) -> str:
        return (f"{len(self.locks)} locks, {len(self.allow)} allow, {len(self.deny)} deny, "
                f"{len(self.boosts)} boosts from {', '.join(self.sources) or 'nothing'}")


def _known(names) -> str:
    return ", ".join(sorted(names))


def _check_names(rule: Rule, src: Source, path: tuple) -> None:
    """Every name in a rule must mean something now: the op exists, the kernel/backend globs
    match a registered kernel (of the op, when one is given)."""
    kernels = registry.all_kernels()
    if rule.op is not None:
        try:
            registry.check_op(rule.op)
        except ValueError as e:
            _fail(src, path + ("op",), str(e))
        kernels = [k for k in kernels if k.op == rule.op]
    of_op = f" of op {rule.op!r}" if rule.op else ""
    if rule.kernel is not None and not any(fnmatch.fnmatchcase(k.id, rule.kernel) for k in kernels):
        _fail(src, path + ("kernel",), f"kernel {rule.kernel!r} matches no known kernel{of_op}; "
                                       f"known kernels: {_known(k.id for k in kernels)}")
    if rule.backend is not None and not any(fnmatch.fnmatchcase(k.backend, rule.backend) for k in kernels):
        _fail(src, path + ("backend",), f"backend {rule.backend!r} matches no known backend{of_op}; "
                                        f"known backends: {_known({k.backend for k in kernels})}")
    if rule.kernel is not None and rule.backend is not None and not any(
            rule.matches_kernel(k) for k in kernels):
        _fail(src, path, f"no kernel matches both kernel {rule.kernel!r} and backend {rule.backend!r}")


def lock_glob_error(kernel: str) -> str | None:
    """Why `kernel` can't be locked (it is a glob, and a lock forces one kernel), or None."""
    if any(c in kernel for c in "*?["):
        return f"a lock names one kernel id, not a glob: {kernel!r}"
    return None


def _parse_rule(entry, section: str, i: int, src: Source, layer: int) -> Rule:
    path = (section, i)
    if not isinstance(entry, dict):
        _fail(src, path, f"each {section} entry is a mapping with keys {', '.join(KEYS[section])}; "
                         f"got {entry!r}")
    for key in entry:
        if key not in KEYS[section]:
            _fail(src, path + (key,), f"unknown key {key!r} in {section}; allowed: "
                                      f"{', '.join(KEYS[section])}")
    for name in ("op", "kernel", "backend"):
        if name in entry and not isinstance(entry[name], str):
            _fail(src, path + (name,), f"{name!r} takes a string, got {entry[name]!r}")
    if section == "locks":
        if "kernel" not in entry:
            _fail(src, path, "a lock needs 'kernel' (one kernel id) and may name 'op' and 'when'")
        if "op" in entry:
            try:
                registry.check_op(entry["op"])
            except ValueError as e:
                _fail(src, path + ("op",), str(e))
        glob = lock_glob_error(entry["kernel"])
        if glob:
            _fail(src, path + ("kernel",), glob)
        try:
            k = registry.get(entry["kernel"])
        except ValueError as e:
            _fail(src, path + ("kernel",), str(e))
        if entry.get("op", k.op) != k.op:
            _fail(src, path + ("op",), f"kernel {k.id!r} implements op {k.op!r}, not {entry['op']!r}")
        entry = {**entry, "op": k.op}
    elif "kernel" not in entry and "backend" not in entry:
        _fail(src, path, f"a {section} entry needs 'kernel' or 'backend' (globs allowed)")
    add = entry.get("priority_add", 0)
    if section == "boosts" and ("priority_add" not in entry or isinstance(add, bool)
                                or not isinstance(add, int)):
        _fail(src, path + ("priority_add",), f"a boost needs 'priority_add', an integer; got {add!r}")
    rule = Rule(entry.get("kernel"), entry.get("backend"), entry.get("op"),
                parse_when(entry.get("when"), src, path + ("when",)), add, src.at(path), layer)
    _check_names(rule, src, path)
    return rule


def from_dict(data, source: str = "policy dict", lines: dict | None = None) -> Policy:
    """A Policy from its dict form; `source`/`lines` name the file and lines in errors."""
    src = Source(source, lines or {})
    if not isinstance(data, dict):
        _fail(src, (), f"a policy is a mapping with keys {', '.join(SECTIONS)}; got {data!r}")
    for key in data:
        if key not in SECTIONS:
            _fail(src, (key,), f"unknown key {key!r}; allowed: {', '.join(SECTIONS)}")
    version = data.get("version", 1)
    if isinstance(version, str):
        version = version.strip()      # `version: "1"` in YAML is the string "1": the same
    if isinstance(version, bool) or version not in (1, "1"):
        _fail(src, ("version",), f"unsupported version {version!r}; the only version is 1")
    parts = {}
    for section in ("locks", "allow", "deny", "boosts"):
        entries = data.get(section)
        if entries is None:
            entries = []
        if not isinstance(entries, list):
            _fail(src, (section,), f"{section!r} takes a list of entries, got {entries!r}")
        parts[section] = tuple(_parse_rule(e, section, i, src, 0) for i, e in enumerate(entries))
    return Policy(**parts, sources=(source,))


# ---- YAML with line numbers ---------------------------------------------------------------

def _index_lines(node, path: tuple, lines: dict, src: str, seen: frozenset = frozenset()) -> None:
    """Record the 1-based line of every key path under a composed YAML node; raise on a key given
    twice (yaml.safe_load would silently keep the last)."""
    import yaml

    if id(node) in seen:   # a recursive alias
        return
    seen = seen | {id(node)}
    if isinstance(node, yaml.MappingNode):
        first: dict = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else str(key.value)
            line = key.start_mark.line + 1
            lines[path + (name,)] = line
            if name in first:
                raise ValueError(f"{Source(src, lines).at(path + (name,))}: key {name!r} appears "
                                 f"twice (lines {first[name]} and {line})")
            first[name] = line
            _index_lines(value, path + (name,), lines, src, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            _index_lines(item, path + (i,), lines, src, seen)


def read_yaml(path: str) -> tuple[object, dict]:
    """(data, {key path: line}) of a YAML file, parsed as yaml.safe_load would."""
    try:
        import yaml
    except ImportError:
        raise ValueError(f"policy file {path}: reading a YAML policy needs PyYAML "
                         f"(pip install pyyaml)") from None
    name = f"policy file {path}"
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{name} cannot be read: {e}") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}, {}
        lines = {(): node.start_mark.line + 1}
        _index_lines(node, (), lines, name)
        return loader.construct_document(node), lines
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{name}, line {mark.line + 1}, column {mark.column + 1}" if mark else name
        problem = " ".join(p for p in (e.context, e.problem) if p)
        bad_line = text.splitlines()[mark.line] if mark and mark.line < len(text.splitlines()) else ""
        hint = ""
        if any(f": {c}" in bad_line for c in (">", "!", "|", "&", "*", "%", "@")):
            hint = ' (YAML reads a value starting with > ! | & * % @ as syntax: quote it, e.g. ">=64")'
        raise ValueError(f"{where}: malformed YAML: {problem}{hint}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{name}: malformed YAML: {e}") from None
    finally:
        loader.dispose()


def load(path_or_dict) -> Policy:
    """A Policy from a dict, a YAML path, a list of those, or paths joined by os.pathsep
    (merged in order: later wins, see the module docstring)."""
    if isinstance(path_or_dict, Policy):
        return path_or_dict
    if isinstance(path_or_dict, dict):
        policy = from_dict(path_or_dict)
    elif isinstance(path_or_dict, (list, tuple)):
        policy = Policy()
        for i, p in enumerate(path_or_dict):
            if not isinstance(p, (dict, str, os.PathLike)):
                raise TypeError(f"policy list item {i} must be a dict or a path, got {type(p).__name__}")
            policy = policy.merged(load(p))
        return policy
    elif isinstance(path_or_dict, (str, os.PathLike)):
        path = os.fspath(path_or_dict)
        if os.pathsep in path and not os.path.exists(path):
            return load([p for p in path.split(os.pathsep) if p])
        data, lines = read_yaml(path)
        policy = from_dict({} if data is None else data, source=f"policy file {path}", lines=lines)
    else:
        raise TypeError(f"policy must be a dict, a path to a YAML file, or a list of those; "
                        f"got {type(path_or_dict).__name__}")
    log.info("layerzero: loaded %s", policy.summary())
    return policy

