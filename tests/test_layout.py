"""The package's layout is its architecture (README, "Layout"): each wing's __init__ docstring ends with
the line "Must not import: ...", and these tests hold every module of the wing to it — module-level,
lazy (inside a function) and TYPE_CHECKING imports alike — and keep the places acyclic."""

import ast
import graphlib
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "agentkd"
WINGS = ["gateway", "store", "training", "lion", "roles", "teachers", "batches"]


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, package: Path) -> set[str]:
    """Every agentkd module `path` imports, wherever the import statement sits."""
    here = module_name(path, package)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = here.split(".")[: len(here.split(".")) - node.level + (path.name == "__init__.py")]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{a.name}" for a in node.names}  # `from agentkd import pools` names a module
    root = package.name
    return {m for m in found if m == root or m.startswith(root + ".")}


def forbidden_by(init: Path) -> list[str]:
    doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
    rule = re.search(r"Must not import:(.*?)(?:\n\s*\n|$)", doc, re.S)
    return re.findall(r"\b[a-z_]+(?:\.[a-z_]+)+\b", rule[1]) if rule else []


def violations(wing: Path, package: Path) -> list[tuple[str, str]]:
    """(module, forbidden import) for every import of the wing's modules that its docstring rules out."""
    banned = forbidden_by(wing / "__init__.py")
    out = []
    for path in sorted(wing.rglob("*.py")):
        for imported in imports_of(path, package):
            if any(imported == b or imported.startswith(b + ".") for b in banned):
                out.append((module_name(path, package), imported))
    return out


@pytest.mark.parametrize("wing", WINGS)
def test_each_wing_states_what_it_must_not_import(wing):
    assert forbidden_by(PACKAGE / wing / "__init__.py"), f"agentkd/{wing}/__init__.py has no 'Must not import:' line"


@pytest.mark.parametrize("wing", WINGS)
def test_no_wing_imports_what_its_docstring_forbids(wing):
    assert violations(PACKAGE / wing, PACKAGE) == []


def test_the_check_catches_a_lazy_forbidden_import(tmp_path):
    """The checker itself: a function-level import the wing's rule forbids is found, a permitted one is not."""
    pkg = tmp_path / "agentkd"
    (pkg / "store").mkdir(parents=True)
    (pkg / "store" / "__init__.py").write_text('"""A wing.\n\nMust not import: agentkd.gateway, agentkd.teachers.\n"""\n')
    (pkg / "store" / "writer.py").write_text(
        "from agentkd.config import RunConfig\n\ndef f():\n    from agentkd.gateway import budget\n"
        "    from . import db\n")
    (pkg / "store" / "db.py").write_text("from agentkd import teachers\n")
    assert sorted(violations(pkg / "store", pkg)) == [
        ("agentkd.store.db", "agentkd.teachers"), ("agentkd.store.writer", "agentkd.gateway"),
        ("agentkd.store.writer", "agentkd.gateway.budget")]


def place(module: str) -> str:
    """A wing, or a top-level module (cli, config, session, ...)."""
    return module.split(".")[1] if module.count(".") else module


def test_places_import_each_other_without_a_cycle():
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        here = module_name(path, PACKAGE)
        if here == "agentkd":
            continue
        src = place(here)
        deps = {place(m) for m in imports_of(path, PACKAGE) if m != "agentkd"} - {src}
        graph.setdefault(src, set()).update(deps)
    order = list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a cycle
    assert order.index("store") < order.index("gateway") < order.index("roles") < order.index("lion") < order.index("cli")
    assert order.index("store") < order.index("training") < order.index("lion")


def test_the_package_root_shows_the_wings():
    for wing in WINGS:
        assert (PACKAGE / wing / "__init__.py").is_file()
    loose = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert len(loose) <= 16, loose  # the commands and what they share; everything else lives in a wing
