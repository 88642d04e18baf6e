"""The layering docs/ARCHITECTURE.md promises, read from the code's imports (every import statement,
including those inside functions and under TYPE_CHECKING): no stage imports another stage, and nothing
below the stages imports a stage or an application (cli, serve, platform)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "embedtune"
STAGES = {"corpus", "sdg", "prep", "train", "evaluate", "export", "deploy"}
APPS = {"cli", "serve", "platform", "demo", "__main__"}
LIBRARIES = {"retrieval", "models", "convert"}
GROUND = {"config", "artifacts", "schemas", "console", "cpu", "cpu_share", "events", "pipeline"}


def floor_of(part: str) -> str:
    for name, members in (("stage", STAGES), ("app", APPS), ("library", LIBRARIES), ("ground", GROUND)):
        if part in members:
            return name
    return "other"


#: What each floor may not import: a stage no other stage; libraries and the ground floor no stage or app;
#: the ground floor also no library (``pipeline`` names the stages by string, which is not an import).
FORBIDDEN = {"library": STAGES | APPS, "ground": STAGES | APPS | LIBRARIES}


def imported_parts(path: Path) -> list[tuple[int, str]]:
    """(line, first component under ``embedtune``) of every absolute or relative import in the file."""
    module = path.relative_to(PACKAGE.parent).with_suffix("").parts  # ("embedtune", "sdg", "filters")
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's own package
                base = list(module[: len(module) - node.level])
                names = [".".join([*base, *(node.module.split(".") if node.module else [])])]
            else:
                names = [node.module or ""]
            if names[0] == "embedtune":  # from embedtune import x: x is the part
                names = [f"embedtune.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "embedtune" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


def violations() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = path.relative_to(PACKAGE).with_suffix("").parts[0]
        forbidden = STAGES - {own} if own in STAGES else FORBIDDEN.get(floor_of(own), set())
        for line, part in imported_parts(path):
            if part in forbidden:
                out.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {own} ({floor_of(own)}) imports {part} "
                           f"({floor_of(part)})")
    return out


def test_no_stage_imports_another_and_nothing_below_the_stages_imports_one():
    assert violations() == []


def test_every_top_level_part_has_a_floor():
    parts = {p.name.removesuffix(".py") for p in PACKAGE.iterdir()
             if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert {p for p in parts if floor_of(p) == "other"} <= {"__init__"}


@pytest.mark.parametrize(("own", "source", "expected"), [
    ("sdg", "from embedtune.export.cached import x\n", "sdg (stage) imports export (stage)"),
    ("retrieval", "def f():\n    from embedtune.deploy import stage\n", "retrieval (library) imports deploy (stage)"),
    ("prep", "from ..train import plan\n", "prep (stage) imports train (stage)"),
    ("config.py", "from embedtune import retrieval\n", "config (ground) imports retrieval (library)"),
])
def test_the_walk_catches_a_planted_import(tmp_path, monkeypatch, own, source, expected):
    root = tmp_path / "embedtune"
    target = root / own if own.endswith(".py") else root / own / "planted.py"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(source)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", root)
    assert [v.split(": ", 1)[1] for v in violations()] == [expected]


# ------------------------------------------------------------------------------------------ import circles


def module_imports(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, inside functions too (an import deferred into a function
    still closes a circle); ``if TYPE_CHECKING:`` imports are left out (they never run). ``from pkg import
    sub`` of a submodule counts as importing ``pkg.sub``, not ``pkg``'s ``__init__``."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(node.test) for stmt in node.body for n in ast.walk(stmt)}
        package_of = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package_of.split(".")[: len(package_of.split(".")) - node.level + 1] if node.level else []
                mod = ".".join([*base, *([node.module] if node.module else [])])
                subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in modules]
                targets = subs if len(subs) == len(node.names) else [mod, *subs]
            else:
                continue
            deps |= {o for t in targets if (o := owner(t)) and o != name}
        graph[name] = deps
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while (w := stack.pop()) != v:
                group.append(w)
            if group:
                circles.append(sorted([v, *group]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_no_import_circle():
    assert import_circles(module_imports(PACKAGE)) == []


def test_the_circle_walk_catches_one_closed_inside_a_function(tmp_path):
    root = tmp_path / "embedtune"
    (root / "platform").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "platform" / "__init__.py").write_text("")
    (root / "platform" / "a.py").write_text("from embedtune.platform.b import f\n")
    (root / "platform" / "b.py").write_text("def f():\n    from embedtune.platform import a\n")
    (root / "platform" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                             "    from embedtune.platform import a\n")
    (root / "platform" / "d.py").write_text("from embedtune.platform import c\n")
    assert import_circles(module_imports(root)) == [["embedtune.platform.a", "embedtune.platform.b"]]
