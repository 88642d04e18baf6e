"""The demo corpus: real text already on every machine — the Python standard library's documentation.

One Markdown file per module: its docstring and the docstrings of its public classes and functions, read
through :mod:`pydoc`. Nothing is fetched and nothing was written for the demo.

    python -m embedtune.demo build demo_corpus
"""

from __future__ import annotations

import importlib
import inspect
import pydoc
import sys
from pathlib import Path

from embedtune.artifacts import write_text

MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "enum", "fractions", "functools", "gzip", "hashlib",
    "heapq", "hmac", "http.client", "inspect", "io", "ipaddress", "itertools", "json", "logging", "math",
    "operator", "pathlib", "pickle", "queue", "random", "re", "secrets", "shutil", "sqlite3", "statistics",
    "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time", "typing",
    "unittest", "urllib.parse", "uuid", "weakref", "zipfile", "zlib",
)
MIN_DOC_CHARS = 80  # one-line docstrings say little a query could be written about


def module_markdown(name: str) -> str:
    module = importlib.import_module(name)
    parts = [f"# {name}", pydoc.getdoc(module)]
    for member_name, member in inspect.getmembers(module):
        if member_name.startswith("_") or getattr(member, "__module__", None) != module.__name__:
            continue
        if not (inspect.isclass(member) or inspect.isfunction(member)):
            continue
        doc = pydoc.getdoc(member)
        if len(doc) >= MIN_DOC_CHARS:
            parts += [f"## {name}.{member_name}", doc]
    return "\n\n".join(p for p in parts if p.strip()) + "\n"


def build(out_dir: str | Path, modules: tuple[str, ...] = MODULES) -> list[Path]:
    out = Path(out_dir)
    written = []
    for name in modules:
        try:
            text = module_markdown(name)
        except ImportError:
            continue  # e.g. sqlite3 missing from a minimal Python build
        written.append(write_text(out / f"{name}.md", text))
    return written


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "build":
        print("usage: python -m embedtune.demo build OUT_DIR", file=sys.stderr)
        return 2
    files = build(argv[1])
    print(f"wrote {len(files)} documents from the Python standard library's docs to {argv[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
