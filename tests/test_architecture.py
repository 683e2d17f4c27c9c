"""The import rules of docs/architecture.md: every medpipe module's imports, function-local ones included, parsed
with ast (nothing is imported), and checked against what each part must never import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "medpipe"

LIBRARY = ("io", "data", "nets", "transforms", "inferers", "training", "evaluation", "tracking", "inference")
ALL_PARTS = (*LIBRARY, "cluster", "bundle", "zoo", "export", "serve", "viewer", "cli")


def _parts(*names: str) -> set[str]:
    return {f"medpipe.{n}" for n in names}


# part (a module or package prefix) -> the parts it must never import. Rules of every matching prefix apply, so
# `medpipe.evaluation.metrics` obeys both its own line and `medpipe.evaluation`'s.
FORBIDDEN: dict[str, set[str]] = {
    "medpipe.errors": _parts(*ALL_PARTS, "files", "_lazy"),
    "medpipe.files": _parts(*ALL_PARTS, "_lazy"),  # files may raise MedpipeError, nothing more
    "medpipe.values": _parts(*ALL_PARTS, "files", "_lazy"),  # values may raise MedpipeError, nothing more
    "medpipe.cluster": _parts(*ALL_PARTS, "files", "values", "_lazy") - _parts("cluster"),  # runs any job it is given
    "medpipe.io": _parts(*ALL_PARTS) - _parts("io"),
    "medpipe.data": _parts(*ALL_PARTS) - _parts("data", "io"),
    "medpipe.nets": _parts(*ALL_PARTS) - _parts("nets"),
    "medpipe.transforms": _parts(*ALL_PARTS) - _parts("transforms", "io"),
    "medpipe.inferers": _parts(*ALL_PARTS) - _parts("inferers", "nets"),
    "medpipe.training": _parts(*ALL_PARTS) - _parts("training"),
    "medpipe.evaluation": _parts(
        "nets", "inferers", "training", "tracking", "inference", "zoo", "export", "serve", "cli"
    ),
    "medpipe.evaluation.metrics": _parts(*ALL_PARTS) - _parts("evaluation.metrics"),
    "medpipe.tracking": _parts("io", "data", "inference", "bundle", "zoo", "serve", "cli"),
    "medpipe.inference": _parts("data", "training", "tracking", "bundle", "zoo", "serve", "cli"),
    "medpipe.bundle": _parts("zoo", "serve", "cli"),
    "medpipe.zoo": _parts("serve", "cli"),
    "medpipe.export": _parts("tracking", "zoo", "serve", "cli"),
    "medpipe.serve": _parts("viewer", "cli"),
    "medpipe.viewer": _parts("cli"),
}

# Edges that break a rule today, each with the fix it waits for. The test fails on any edge not listed here, and
# also when a listed edge is gone, so the list can only shrink.
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}


def module_name(path: Path, repo: Path = REPO) -> str:
    parts = path.relative_to(repo).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, repo: Path = REPO) -> set[str]:
    """Every medpipe module `path` imports, at any depth of the file (function-local imports included).

    `from medpipe.x import y` counts as importing `medpipe.x.y` when y is a module, else `medpipe.x`.
    """
    name = module_name(path, repo)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                found.add(candidate if _is_module(candidate, repo) else module)
    return {m for m in found if m == "medpipe" or m.startswith("medpipe.")}


def private_names(path: Path) -> set[tuple[str, str]]:
    """(module, name) of every `_private` name `path` imports from another medpipe module."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("medpipe."):
            out |= {(node.module, a.name) for a in node.names if a.name.startswith("_") and not a.name.startswith("__")}
    return out


def _is_module(dotted: str, repo: Path = REPO) -> bool:
    base = repo.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _matches(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def forbidden_edges(repo: Path = REPO) -> dict[tuple[str, str], str]:
    """(importer, imported) -> the rule it breaks, over every module of the package under `repo`."""
    edges = {}
    for path in sorted((repo / "medpipe").rglob("*.py")):
        importer = module_name(path, repo)
        for imported in imported_modules(path, repo):
            for part, never in FORBIDDEN.items():
                hit = next((n for n in never if _matches(imported, n)), None)
                if _matches(importer, part) and hit and not _matches(imported, part):
                    edges[(importer, imported)] = f"{part} must never import {hit}"
            is_entry_point = _matches(importer, "medpipe.cli") or importer == "medpipe.__main__"
            if _matches(imported, "medpipe.cli") and not is_entry_point:
                edges[(importer, imported)] = "no library module imports medpipe.cli"
        for module, name in private_names(path):
            if module.split(".")[:2] != importer.split(".")[:2]:
                edges[(importer, f"{module}.{name}")] = "a part uses another part's public names only"
    return edges


def test_no_module_imports_what_its_part_must_never_import() -> None:
    edges = forbidden_edges()
    new = {edge: rule for edge, rule in edges.items() if edge not in KNOWN_VIOLATIONS}
    assert not new, "forbidden imports (see docs/architecture.md):\n" + "\n".join(
        f"{a} -> {b}: {rule}" for (a, b), rule in sorted(new.items())
    )
    fixed = [edge for edge in KNOWN_VIOLATIONS if edge not in edges]
    assert not fixed, f"fixed, remove from KNOWN_VIOLATIONS: {fixed}"


def test_the_import_parser_sees_local_relative_and_from_imports(tmp_path: Path) -> None:
    for name in ("__init__", "errors", "io/__init__", "io/images", "cli/__init__", "cli/commands",
                 "tracking/__init__", "tracking/mlflow", "evaluation/__init__", "evaluation/reports"):  # fmt: skip
        (tmp_path / "medpipe" / f"{name}.py").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "medpipe" / f"{name}.py").write_text("")
    probe = tmp_path / "medpipe" / "io" / "probe.py"
    probe.write_text(
        "import os\nfrom medpipe.errors import MedpipeError\nfrom . import images\n"
        "def f():\n    from medpipe.cli import commands\n    import medpipe.tracking.mlflow\n"
        "    from medpipe.evaluation.reports import _as_list\n"
    )
    assert imported_modules(probe, tmp_path) == {
        "medpipe.errors", "medpipe.io.images", "medpipe.cli.commands", "medpipe.tracking.mlflow",
        "medpipe.evaluation.reports",
    }  # fmt: skip
    edges = forbidden_edges(tmp_path)
    assert set(edges) == {
        ("medpipe.io.probe", "medpipe.cli.commands"), ("medpipe.io.probe", "medpipe.tracking.mlflow"),
        ("medpipe.io.probe", "medpipe.evaluation.reports"), ("medpipe.io.probe", "medpipe.evaluation.reports._as_list"),
    }  # fmt: skip
    assert "medpipe.cli" in edges[("medpipe.io.probe", "medpipe.cli.commands")]


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_every_rule_names_a_part_that_exists_or_is_planned(part: str) -> None:
    planned = {"medpipe.serve", "medpipe.export"}  # being built; the rules hold from their first line
    assert _is_module(part) or part in planned, f"{part} is not a module of medpipe: update FORBIDDEN"
