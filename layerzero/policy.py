"""Selection policy: locks, allow, deny and boosts, each optionally under `when` conditions.

A policy is a dict (or a YAML file holding one)::

    version: 1
    locks:  [{op: attention, kernel: torch.sdpa_flash, when: {head_dim: ">=64"}}]
    allow:  [{backend: torch}, {kernel: "reference.*"}]    # if present, only these are eligible
    deny:   [{kernel: torch.sdpa_math}]
    boosts: [{kernel: "torch.flex", priority_add: 20, when: {seq_len_q: ">1"}}]

`when` maps a call property (a `CallSpec` field, or `has_mask`) to a condition: a scalar means
`==`; a string may start with `==`, `!=`, `>`, `>=`, `<`, `<=`; a mapping takes `in`, `not_in` or
`match` (a glob). `kernel` and `backend` accept globs. Several files merge: lists concatenate,
later files' locks win.
"""
from __future__ import annotations

import fnmatch
import operator
import os
from dataclasses import dataclass, field

from . import registry

_CMP = {"==": operator.eq, "!=": operator.ne, ">=": operator.ge, "<=": operator.le,
        ">": operator.gt, "<": operator.lt}
PROPERTIES = ("op", "device", "sm", "dtype", "batch", "num_heads", "num_kv_heads", "seq_len_q",
              "seq_len_k", "head_dim", "head_dim_v", "layout", "causal", "causal_align", "mask",
              "has_mask", "window", "softcap", "alibi", "sinks", "dropout", "grad")
SECTIONS = ("version", "locks", "allow", "deny", "boosts")


def spec_value(spec, prop: str):
    if prop == "has_mask":
        return spec.mask != "none"
    if prop == "dtype":
        return str(spec.dtype).replace("torch.", "")
    return getattr(spec, prop)


def _parse_value(text: str):
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


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
        except TypeError:  # e.g. None > 3: the condition does not hold
            return False


def parse_when(when, where: str) -> tuple[Condition, ...]:
    if when is None:
        return ()
    if not isinstance(when, dict):
        raise ValueError(f"{where}: 'when' must be a mapping of property -> condition, got {when!r}")
    conds = []
    for prop, cond in when.items():
        if prop not in PROPERTIES:
            raise ValueError(f"{where}: unknown property {prop!r} in 'when'; known: {', '.join(PROPERTIES)}")
        if isinstance(cond, dict):
            if len(cond) != 1 or next(iter(cond)) not in ("in", "not_in", "match"):
                raise ValueError(f"{where}: condition on {prop!r} must be one of "
                                 f"{{in: [...]}}, {{not_in: [...]}}, {{match: glob}}; got {cond!r}")
            test, value = next(iter(cond.items()))
            if test in ("in", "not_in"):
                if not isinstance(value, (list, tuple)):
                    raise ValueError(f"{where}: {test!r} on {prop!r} takes a list, got {value!r}")
                value = tuple(tuple(x) if isinstance(x, list) else x for x in value)
            elif not isinstance(value, str):
                raise ValueError(f"{where}: 'match' on {prop!r} takes a glob string, got {value!r}")
            conds.append(Condition(prop, test, value))
        elif isinstance(cond, str) and cond[:1] in "=!<>" and cond:
            test = next((o for o in (">=", "<=", "==", "!=", ">", "<") if cond.startswith(o)), None)
            if test is None:
                raise ValueError(f"{where}: bad operator in {cond!r} for {prop!r}; "
                                 f"allowed: ==, !=, >, >=, <, <=")
            conds.append(Condition(prop, test, _parse_value(cond[len(test):].strip())))
        else:
            conds.append(Condition(prop, "==", tuple(cond) if isinstance(cond, list) else cond))
    return tuple(conds)


@dataclass(frozen=True)
class Rule:
    kernel: str | None = None     # glob over kernel ids
    backend: str | None = None    # glob over backend names
    op: str | None = None
    when: tuple[Condition, ...] = ()
    priority_add: int = 0

    def matches_kernel(self, k) -> bool:
        if self.op is not None and k.op != self.op:
            return False
        if self.kernel is not None and not fnmatch.fnmatchcase(k.id, self.kernel):
            return False
        return self.backend is None or fnmatch.fnmatchcase(k.backend, self.backend)

    def applies(self, k, spec) -> bool:
        return self.matches_kernel(k) and all(c(spec) for c in self.when)

    def describe(self) -> str:
        parts = [f"{n}={getattr(self, n)}" for n in ("op", "kernel", "backend") if getattr(self, n)]
        parts += [f"{c.prop} {c.test} {c.value!r}" for c in self.when]
        return ", ".join(parts)


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
        for rule in self.deny:
            if rule.applies(k, spec):
                return f"denied by policy ({rule.describe()})"
        if self.allow and not any(r.applies(k, spec) for r in self.allow):
            return "not in the policy's allow list"
        return None

    def boost(self, k, spec) -> int:
        return sum(r.priority_add for r in self.boosts if r.applies(k, spec))

    def merged(self, other: "Policy") -> "Policy":
        return Policy(self.locks + other.locks, self.allow + other.allow, self.deny + other.deny,
                      self.boosts + other.boosts, self.sources + other.sources)


def _check_names(rule: Rule, where: str) -> None:
    kernels = registry.all_kernels()
    if rule.op is not None:
        try:
            registry.check_op(rule.op)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    if rule.kernel is not None and not any(fnmatch.fnmatchcase(k.id, rule.kernel) for k in kernels):
        raise ValueError(f"{where}: kernel {rule.kernel!r} matches no known kernel; known kernels: "
                         f"{', '.join(k.id for k in kernels)}")
    if rule.backend is not None and not any(fnmatch.fnmatchcase(b, rule.backend) for b in registry.backends()):
        raise ValueError(f"{where}: backend {rule.backend!r} matches no known backend; known "
                         f"backends: {', '.join(registry.backends())}")


def _parse_rule(entry, section: str, i: int, source: str) -> Rule:
    where = f"{source}: {section}[{i}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: each entry must be a mapping, got {entry!r}")
    allowed = {"locks": {"op", "kernel", "when"}, "boosts": {"op", "kernel", "backend", "when", "priority_add"}}
    keys = allowed.get(section, {"op", "kernel", "backend", "when"})
    unknown = set(entry) - keys
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(keys)}")
    for name in ("op", "kernel", "backend"):
        if name in entry and not isinstance(entry[name], str):
            raise ValueError(f"{where}: {name!r} must be a string, got {entry[name]!r}")
    if section == "locks" and ("op" not in entry or "kernel" not in entry):
        raise ValueError(f"{where}: a lock needs 'op' and 'kernel'")
    if section != "locks" and "kernel" not in entry and "backend" not in entry:
        raise ValueError(f"{where}: needs 'kernel' or 'backend'")
    add = entry.get("priority_add", 0)
    if section == "boosts" and (not isinstance(add, int) or isinstance(add, bool)):
        raise ValueError(f"{where}: 'priority_add' must be an integer, got {add!r}")
    rule = Rule(entry.get("kernel"), entry.get("backend"), entry.get("op"),
                parse_when(entry.get("when"), where), add)
    if section == "locks":
        try:
            k = registry.get(rule.kernel)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if k.op != rule.op:
            raise ValueError(f"{where}: kernel {rule.kernel!r} implements {k.op!r}, not {rule.op!r}")
    _check_names(rule, where)
    return rule


def from_dict(data, source: str = "<dict>") -> Policy:
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a policy must be a mapping with keys {', '.join(SECTIONS)}")
    unknown = set(data) - set(SECTIONS)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {sorted(unknown)}; allowed: {', '.join(SECTIONS)}")
    if data.get("version", 1) != 1:
        raise ValueError(f"{source}: unsupported version {data.get('version')!r}; allowed: 1")
    parts = {}
    for section in ("locks", "allow", "deny", "boosts"):
        entries = data.get(section) or []
        if not isinstance(entries, list):
            raise ValueError(f"{source}: {section!r} must be a list, got {entries!r}")
        parts[section] = tuple(_parse_rule(e, section, i, source) for i, e in enumerate(entries))
    return Policy(**parts, sources=(source,))


def load(path_or_dict) -> Policy:
    """A Policy from a dict, a YAML path, or a list of those (merged in order)."""
    if isinstance(path_or_dict, Policy):
        return path_or_dict
    if isinstance(path_or_dict, dict):
        return from_dict(path_or_dict)
    if isinstance(path_or_dict, (list, tuple)):
        out = Policy()
        for p in path_or_dict:
            out = out.merged(load(p))
        return out
    if isinstance(path_or_dict, (str, os.PathLike)):
        path = os.fspath(path_or_dict)
        if os.pathsep in path and not os.path.exists(path):
            return load(path.split(os.pathsep))
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: reading a YAML policy needs PyYAML (pip install pyyaml)") from None
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except OSError as e:
            raise ValueError(f"policy file {path!r} cannot be read: {e}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: malformed YAML: {e}") from None
        return from_dict(data if data is not None else {}, source=path)
    raise TypeError(f"policy must be a dict, a path to a YAML file, or a list of those; "
                    f"got {type(path_or_dict).__name__}")
