"""The import layering of docs/architecture.md, enforced on the source: nothing imports upward."""

import ast
from pathlib import Path

import pytest

import srdiff

PACKAGE = Path(__file__).resolve().parents[1] / "srdiff"
# The op modules that dispatch to srdiff.reference as their documented fallback.
REFERENCE_USERS = {"srdiff.attention", "srdiff.noise", "srdiff.gradcam"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every srdiff module ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name == "srdiff" or name.startswith("srdiff.")}


MODULES = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _importers(prefix: str) -> dict[str, set[str]]:
    """module -> the modules under ``prefix`` it imports (a package counts as its own prefix)."""
    hits = {}
    for module, imports in MODULES.items():
        names = {name for name in imports if name == prefix or name.startswith(prefix + ".")}
        if names:
            hits[module] = names
    return hits


def _inside(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_scan_sees_the_package():
    assert "srdiff.diffusion.repaint" in MODULES and "srdiff.trainer.trainer" in MODULES
    assert "srdiff.diffusion.repaint" in MODULES["srdiff.repair"]


@pytest.mark.parametrize("lower, upper", [
    ("srdiff.diffusion", ("srdiff.trainer", "srdiff.repair", "srdiff.repair_cli", "srdiff.repair_pipeline",
                          "srdiff.highlighter", "srdiff.refiner", "srdiff.cli")),
    ("srdiff.kernels", ("srdiff.attention", "srdiff.noise", "srdiff.gradcam", "srdiff.processors",
                        "srdiff.diffusion", "srdiff.highlighter", "srdiff.repair", "srdiff.trainer", "srdiff.models",
                        "srdiff.reference", "srdiff.cli")),
    ("srdiff.reference", ("srdiff.attention", "srdiff.noise", "srdiff.gradcam", "srdiff.kernels",
                          "srdiff.processors", "srdiff.trainer", "srdiff.repair", "srdiff.highlighter")),
    ("srdiff.processors", ("srdiff.diffusion", "srdiff.highlighter", "srdiff.repair", "srdiff.trainer", "srdiff.cli")),
    ("srdiff.highlighter", ("srdiff.diffusion", "srdiff.repair", "srdiff.refiner", "srdiff.trainer", "srdiff.cli")),
    ("srdiff.repair", ("srdiff.trainer", "srdiff.refiner", "srdiff.cli")),
    ("srdiff.refiner", ("srdiff.trainer", "srdiff.repair", "srdiff.cli")),
    ("srdiff._collectives", ("srdiff",)),
])
def test_no_upward_imports(lower, upper):
    """A layer imports only what lies below it (docs/architecture.md)."""
    offenders = {module: sorted(name for name in imports if _inside(name, upper))
                 for module, imports in MODULES.items() if _inside(module, (lower,))}
    assert not {m: names for m, names in offenders.items() if names}


def test_reference_is_imported_only_by_the_ops_that_fall_back_to_it():
    users = {module for module in _importers("srdiff.reference") if not module.startswith("srdiff.reference")}
    assert users == REFERENCE_USERS


def _lazy_uses(path: Path) -> list[str]:
    """``import srdiff`` and ``from srdiff import <name>`` of a name ``srdiff`` resolves lazily from the
    module that defines it: the public entry, which hides what a module depends on."""
    uses = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            uses += [alias.name for alias in node.names if alias.name == "srdiff"]
        elif isinstance(node, ast.ImportFrom) and node.module == "srdiff" and node.level == 0:
            uses += [alias.name for alias in node.names if alias.name in srdiff._PUBLIC]
    return uses


def test_internal_code_imports_from_defining_modules():
    lazy = {_module_name(p): _lazy_uses(p) for p in sorted(PACKAGE.rglob("*.py"))}
    assert not {module: uses for module, uses in lazy.items() if uses}


def test_tasks_never_branch_on_backbone_names():
    """A task asks its backbone (options, export, pretrained weights), never which backbone it has."""
    task_files = [PACKAGE / "trainer" / "task.py", *sorted((PACKAGE / "trainer" / "tasks").glob("*.py"))]
    for path in task_files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                names = {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
                assert "backbone_name" not in names, f"{path.name}:{node.lineno} compares backbone_name"


def test_examples_are_scripts_that_nothing_imports():
    """``examples/`` holds scripts run by accelerate (``examples`` is a distribution name on PyPI): no package,
    and no module of srdiff, its tests or its benchmarks imports it."""
    root = PACKAGE.parent
    assert sorted(p.name for p in (root / "examples").iterdir() if p.suffix == ".py")
    assert not (root / "examples" / "__init__.py").exists()
    for path in [*PACKAGE.rglob("*.py"), *(root / "tests").rglob("*.py"), *(root / "benchmarks").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "examples" or n.startswith("examples.") for n in names), f"{path} imports examples"
