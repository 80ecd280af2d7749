"""The patching stack imports one way (issue 14): the mechanics at the bottom, the recognisers
above them, the public verbs (`layerzero.patch`) above those, and the framework integrations on
top, registering themselves with `lz.patch` instead of being imported by it."""
import ast
from pathlib import Path

import layerzero
from layerzero.patching import frameworks

ROOT = Path(layerzero.__file__).parent

# layerzero.patching, bottom to top: each module may import only those before it
PATCHING = ("hooks", "record", "swap", "rebind", "probes", "norms", "mlps", "residual", "frameworks")


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The absolute names of the modules `path` imports (`from a import b` counts a and a.b)."""
    name = _name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


def _is(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def test_only_the_package_init_imports_the_integrations():
    allowed = {ROOT / "__init__.py"} | set((ROOT / "integrations").rglob("*.py"))
    bad = {_name(p): sorted(n for n in imports(p) if _is(n, "layerzero.integrations"))
           for p in ROOT.rglob("*.py") if p not in allowed}
    assert not {k: v for k, v in bad.items() if v}


def test_patching_imports_only_the_layers_below_it():
    for i, mod in enumerate(PATCHING):
        names = imports(ROOT / "patching" / f"{mod}.py")
        above = {f"layerzero.patching.{m}" for m in PATCHING[i:]}
        assert not [n for n in names if n in above], mod
        assert not [n for n in names if _is(n, "layerzero.patch") or _is(n, "layerzero.integrations")], mod
    assert imports(ROOT / "patching" / "__init__.py") == set()   # importing the package imports nothing


def test_the_public_verbs_import_the_patching_layers_and_no_integration():
    names = imports(ROOT / "patch.py")
    assert {"layerzero.patching.frameworks", "layerzero.patching.norms"} <= names   # imports() sees them
    assert not [n for n in names if _is(n, "layerzero.integrations")]
    assert "layerzero.patch" in imports(ROOT / "integrations" / "diffusers.py")   # the integrations sit above


def test_the_integrations_registered_themselves():
    assert [i.name for i in frameworks.registered()] == ["transformers", "diffusers"]  # in asking order
    hf, df = frameworks.registered()
    assert hf.interface_items is not None and hf.auto_patch is not None and hf.is_pipeline is None
    assert df.is_pipeline is not None and df.patch_pipeline is not None
