"""The package's layers (docs/architecture.md), checked by parsing every module with ``ast``.

- ``core/`` imports nothing else of the package;
- the techniques (``pruning``, ``distillation``, ``quantization``, ``distributed``) and ``tasks/`` and
  ``callbacks/`` import only ``core/``; ``estimate/`` also the public ``lightning_memopt.distributed``;
- ``deploy/`` may import ``core/``, ``tasks/`` and the techniques;
- ``compress/`` may import ``core/``, ``tasks/``, the techniques and ``deploy/``;
- ``cli/`` may import all of them, and nothing imports ``cli/``;
- no import cycle between modules, function-level imports included.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

PACKAGE = "lightning_memopt"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
TECHNIQUES = {"pruning", "distillation", "quantization", "distributed"}
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    **{technique: {"core"} for technique in TECHNIQUES},
    "tasks": {"core"},
    "callbacks": {"core"},
    "estimate": {"core", "distributed"},
    "deploy": {"core", "tasks", *TECHNIQUES},
    "compress": {"core", "tasks", "deploy", *TECHNIQUES},
    "cli": {"core", "callbacks", "tasks", "estimate", "deploy", "compress", *TECHNIQUES},
}
PUBLIC_ONLY = {("estimate", "distributed")}  # the package's public names, not its modules' internals

Edge = tuple[str, str, int, str]  # importer module, imported module, line, file


def module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> Iterable[Edge]:
    importer = module_name(path)
    package = importer if path.name == "__init__.py" else importer.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            names = [base]
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(f"{PACKAGE}."):
                yield importer, name, node.lineno, str(path.relative_to(ROOT.parent))


def package_edges() -> list[Edge]:
    return [edge for path in sorted(ROOT.rglob("*.py")) for edge in imports_of(path)]


def layer(module: str) -> str | None:
    """The folder a module belongs to (``None`` for the package's top-level ``__init__``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def layering_violations(edges: Iterable[Edge]) -> list[str]:
    problems = []
    for importer, imported, line, file in edges:
        source, target = layer(importer), layer(imported)
        if source is None or source == target:
            continue
        if target is None:
            problems.append(f"{file}:{line}: {importer} imports the top-level package {imported} (a cycle through it)")
        elif target == "cli" or target not in ALLOWED.get(source, set()):
            problems.append(f"{file}:{line}: {source}/ may not import {target}/ ({importer} -> {imported})")
        elif (source, target) in PUBLIC_ONLY and imported != f"{PACKAGE}.{target}":
            problems.append(f"{file}:{line}: {source}/ may import only the public {PACKAGE}.{target} ({imported})")
    return problems


def import_cycles(edges: Iterable[Edge]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each a cycle of imports."""
    graph: dict[str, set[str]] = {}
    for importer, imported, _, _ in edges:
        graph.setdefault(importer, set()).add(imported)
        graph.setdefault(imported, set())
    # "from package import module" names the package; count the package's __init__ as what is imported.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for following in graph[node]:
            if following not in index:
                visit(following)
                low[node] = min(low[node], low[following])
            elif following in on_stack:
                low[node] = min(low[node], index[following])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def internal_edges(edges: Iterable[Edge]) -> list[Edge]:
    """Edges between modules, leaving out the package ``__init__`` re-exports that Python resolves lazily."""
    return [e for e in edges if not (Path(e[3]).name == "__init__.py" and e[1].startswith(e[0]))]


def test_every_import_respects_the_layers() -> None:
    problems = layering_violations(package_edges())
    assert not problems, "\n".join(problems)


def test_no_import_cycles() -> None:
    cycles = import_cycles(internal_edges(package_edges()))
    assert not cycles, "\n".join(" <-> ".join(cycle) for cycle in cycles)


@pytest.mark.parametrize(
    ("importer", "imported", "complaint"),
    [
        ("lightning_memopt.quantization.callback", "lightning_memopt.pruning.selection", "quantization/ may not import pruning/"),
        ("lightning_memopt.distillation.callback", "lightning_memopt.quantization.frozen", "distillation/ may not import quantization/"),
        ("lightning_memopt.estimate.simulation", "lightning_memopt.distributed.fsdp2", "may import only the public"),
        ("lightning_memopt.distillation.teacher", "lightning_memopt.tasks.sources", "distillation/ may not import tasks/"),
        ("lightning_memopt.estimate.report", "lightning_memopt.cli", "estimate/ may not import cli/"),
        ("lightning_memopt.core.checkpoints", "lightning_memopt.tasks.modules", "core/ may not import tasks/"),
        ("lightning_memopt.pruning.callback", "lightning_memopt", "imports the top-level package"),
    ],
)  # fmt: skip
def test_the_check_names_each_kind_of_forbidden_import(importer: str, imported: str, complaint: str) -> None:
    problems = layering_violations([(importer, imported, 7, "somewhere.py")])
    assert len(problems) == 1 and complaint in problems[0] and "somewhere.py:7" in problems[0]


def test_the_check_finds_a_cycle_between_cli_and_a_command() -> None:
    edges = [
        ("lightning_memopt.cli.fit", "lightning_memopt.cli.estimate", 1, "cli/fit.py"),
        ("lightning_memopt.cli.estimate", "lightning_memopt.cli.fit", 1, "cli/estimate.py"),
        ("lightning_memopt.cli.export", "lightning_memopt.core.checkpoints", 1, "cli/export.py"),
    ]
    assert import_cycles(edges) == [["lightning_memopt.cli.estimate", "lightning_memopt.cli.fit"]]
