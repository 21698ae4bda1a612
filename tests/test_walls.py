"""The walls between the node's parts, as an executable contract.

Every module of the project is parsed with `ast` (nothing is imported) and every `import` and
`from … import` in it is an edge, wherever it stands: at the top, inside a function, under
`if TYPE_CHECKING:`. Relative imports are resolved; importing `a.b.c` also runs the packages `a`
and `a.b`, so those are edges too. A module that imports dynamically (`importlib.import_module`,
`__import__`) is taken to import every project module it names in a string literal, such as the
restorer registry's list of built-in restorers; names computed at run time cannot be seen. The walls are then checked transitively through the project's
own modules; a module outside the project (the standard library included) is recorded by its
top-level name and not followed. A violation names the whole chain, e.g.
`dicom_node.receive.scp → dicom_node.config → dicom_node.restore.noise`.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("dicom_node", "trainer")


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name → source file, for every .py file under the given top-level packages."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _parents(name: str) -> list[str]:
    """`a.b.c` → [`a`, `a.b`]: the packages Python runs before the module itself."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imported_names(module: str, is_package: bool, tree: ast.AST) -> set[str]:
    """Every absolute module name an import statement in `tree` may load, wherever it stands."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                if node.level - 1 > len(package) - 1:
                    raise ValueError(f"{module}: relative import beyond the top-level package")
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names.add(target)
            # `from package import name` loads package.name when that is a submodule.
            names.update(f"{target}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def _imports_dynamically(tree: ast.AST) -> bool:
    return any(
        isinstance(node, ast.Call)
        and (
            isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            or isinstance(node.func, ast.Name)
            and node.func.id in ("import_module", "__import__")
        )
        for node in ast.walk(tree)
    )


def _string_literals(tree: ast.AST) -> set[str]:
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}


@dataclass
class ImportGraph:
    """Project module → the project modules and external top-level packages it imports."""

    modules: dict[str, Path]
    project_edges: dict[str, set[str]] = field(default_factory=dict)
    external_edges: dict[str, set[str]] = field(default_factory=dict)

    @classmethod
    def build(cls, root: Path, packages: tuple[str, ...] = PROJECT_PACKAGES) -> ImportGraph:
        graph = cls(module_files(root, packages))
        for module, path in graph.modules.items():
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            project, external = set(), set()
            if _imports_dynamically(tree):  # e.g. importlib.import_module("dicom_node.restore.deep")
                project.update(n for n in _string_literals(tree) if "." in n and n in graph.modules)
            for name in _imported_names(module, path.name == "__init__.py", tree):
                if name.split(".")[0] in packages:
                    # The module itself if it is one of ours (`from pkg import function` names none),
                    # and every package above it, which Python runs first.
                    project.update(n for n in (*_parents(name), name) if n in graph.modules)
                else:
                    external.add(name.split(".")[0])
            project.update(p for p in _parents(module) if p in graph.modules)  # a module runs its packages
            project.discard(module)
            graph.project_edges[module] = project
            graph.external_edges[module] = external
        return graph

    def chains_from(self, start: str) -> dict[str, list[str]]:
        """Everything `start` reaches, each with its shortest import chain (start first).

        Project modules are keyed by their dotted name, external packages by their top-level name.
        """
        chains = {start: [start]}
        queue = deque([start])
        while queue:
            module = queue.popleft()
            for external in sorted(self.external_edges[module]):
                chains.setdefault(external, [*chains[module], external])
            for imported in sorted(self.project_edges[module]):
                if imported not in chains:
                    chains[imported] = [*chains[module], imported]
                    queue.append(imported)
        return chains

    def under(self, prefix: str) -> list[str]:
        return sorted(m for m in self.modules if _within(m, prefix))


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(graph: ImportGraph, starts: list[str], forbidden: tuple[str, ...]) -> list[str]:
    """`a → b → c` for every forbidden module or package some start module reaches."""
    found = []
    for start in starts:
        for reached, chain in graph.chains_from(start).items():
            if reached != start and any(_within(reached, f) for f in forbidden):
                found.append(" → ".join(chain))
    return sorted(found)


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return ImportGraph.build(REPO)


NOT_IN_RESTORATION = (
    # DICOM, network, database and configuration code, external …
    "pydicom",
    "pynetdicom",
    "sqlalchemy",
    "alembic",
    "apscheduler",
    "socket",
    "http",
    "urllib",
    "fastapi",
    # … and the node's own.
    "dicom_node.config",
    "dicom_node.imaging",
    "dicom_node.joblog",
    "dicom_node.receive",
    "dicom_node.forward",
    "dicom_node.pipeline",
    "dicom_node.node",
    "dicom_node.cli",
    "dicom_node.tools",
    "dicom_node.detectors",
)

WALLS = {
    # The science runs without DICOM, a network, a database or a configuration file (the trainer uses it too).
    "restore-and-sim-know-no-dicom-network-database-or-config": (
        ("dicom_node.restore", "dicom_node.sim"),
        NOT_IN_RESTORATION,
    ),
    # The modality is answered in milliseconds: no torch and no restorer on the receive path.
    "receive-imports-neither-torch-nor-restore": (("dicom_node.receive",), ("torch", "dicom_node.restore")),
    # The trainer builds on the node, never the other way round.
    "node-never-imports-the-trainer": (("dicom_node",), ("trainer",)),
}


@pytest.mark.parametrize("wall", WALLS)
def test_wall(graph: ImportGraph, wall: str) -> None:
    prefixes, forbidden = WALLS[wall]
    starts = [m for prefix in prefixes for m in graph.under(prefix)]
    assert starts, f"no modules under {prefixes}"
    reached = sorted(
        {name for start in starts for name, chain in graph.chains_from(start).items() if name not in graph.modules}
    )
    print(f"{wall}: {len(starts)} modules; external packages reached: {', '.join(reached)}")
    found = violations(graph, starts, forbidden)
    assert not found, f"{wall}: {len(found)} forbidden imports:\n" + "\n".join(found)


def test_walker_sees_the_project_imports(graph: ImportGraph) -> None:
    """The walls are not vacuous: the walker finds imports that are known to be there."""
    assert {"dicom_node.restore.noise", "dicom_node.receive.scp", "trainer.cli"} <= set(graph.modules)
    pipeline = {
        name: chain for start in graph.under("dicom_node.pipeline") for name, chain in graph.chains_from(start).items()
    }
    restoration = sorted(name for name in pipeline if _within(name, "dicom_node.restore"))
    print("dicom_node.pipeline reaches", restoration)
    assert "dicom_node.restore.registry" in restoration, "the pipeline must reach the restorers"
    # The registry loads its built-in restorers with importlib.import_module, by name.
    assert "dicom_node.restore.gat_bm3d" in graph.project_edges["dicom_node.restore.registry"]
    assert violations(graph, graph.under("dicom_node.pipeline"), ("dicom_node.restore",))
    assert "pydicom" in {n for start in graph.under("dicom_node.imaging") for n in graph.chains_from(start)}
    assert violations(graph, graph.under("trainer"), ("dicom_node",)), "the trainer builds on the node"


def test_walker_follows_function_level_and_relative_imports(tmp_path: Path) -> None:
    """A tiny package whose only way to `socket` is a function-body import, then relative ones."""
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": "import json\n\ndef later():\n    from .sub import b\n    return b\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/b.py": "from .. import c\n",
        "pkg/c.py": "class C:\n    def method(self):\n        import socket.whatever\n",
        "pkg/d.py": "import pkg.sub.b as alias\nfrom pkg import *\n",
        "pkg/e.py": "",
        "pkg/f.py": "import importlib\nPLUGINS = ('pkg.e',)\nfor name in PLUGINS:\n    importlib.import_module(name)\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = ImportGraph.build(tmp_path, ("pkg",))
    assert graph.project_edges["pkg.a"] == {"pkg", "pkg.sub", "pkg.sub.b"}
    assert graph.project_edges["pkg.sub.b"] == {"pkg", "pkg.sub", "pkg.c"}
    assert graph.external_edges["pkg.c"] == {"socket"}
    assert graph.project_edges["pkg.d"] == {"pkg", "pkg.sub", "pkg.sub.b"}
    assert violations(graph, ["pkg.a"], ("socket",)) == ["pkg.a → pkg.sub.b → pkg.c → socket"]
    assert violations(graph, ["pkg.a"], ("json",)) == ["pkg.a → json"]
    assert violations(graph, ["pkg.a", "pkg.e"], ("pkg.c",)) == ["pkg.a → pkg.sub.b → pkg.c"]
    assert violations(graph, ["pkg.e"], ("socket", "json")) == []
    assert graph.project_edges["pkg.f"] == {"pkg", "pkg.e"}  # a dynamic import by a literal name
