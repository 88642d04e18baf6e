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
GROUND = {"config", "artifacts", "schemas", "console", "cpu", "events", "pipeline"}


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
