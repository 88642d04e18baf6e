"""The run directory: the contract between stages.

Every file is written under a temporary name and renamed into place, and a stage's ``manifest.json`` is
written last. So a stage that was killed midway has no manifest and is never mistaken for a finished one,
and a file that is present is whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, Field

from embedtune import __version__

MANIFEST = "manifest.json"
log = logging.getLogger("embedtune")
_UMASK = os.umask(0)
os.umask(_UMASK)


class ArtifactError(ValueError):
    """A stage's input is missing or malformed."""


# ------------------------------------------------------------------------------------------ atomic I/O


_PATH_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,255}$")


def check_path_name(name: str, what: str = "name") -> str:
    """``name`` if it is safe to join into a path as one component: ``[A-Za-z0-9_.-]+``, not ``.`` or ``..``.

    Checked where a name is joined (defence in depth: the recipe checks it too), so an absolute path, a
    ``../`` or a separator can never make the join leave its folder.
    """
    if not isinstance(name, str) or not _PATH_NAME.fullmatch(name) or name in (".", ".."):
        shown = name[:80] if isinstance(name, str) else type(name).__name__
        raise ValueError(f"{what} {shown!r} is not a plain name: use letters, digits, '_', '.', '-' "
                         "(no path separators, not '.' or '..')")
    return name


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success fsync and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The writer's pid in the name: a file left by a process that was killed (kill -9 skips the cleanup
    # below) can be told from one another process is still writing; see remove_orphan_temp_files.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a published artifact gets the usual permissions
    binary = "b" in mode
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


_TEMP_NAME = re.compile(r"^\..+\.(?P<pid>\d+)\.[^.]+\.tmp$")


def remove_orphan_temp_files(root: str | Path) -> list[Path]:
    """Delete :func:`atomic_open` temp files under ``root`` whose writing process no longer exists."""
    removed = []
    for tmp in Path(root).rglob(".*.tmp"):
        match = _TEMP_NAME.match(tmp.name)
        if match and tmp.is_file() and not _process_alive(int(match["pid"])):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except (OverflowError, ValueError):
        return False
    return True


def write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path) as fh:
        fh.write(text)
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any] | BaseModel]) -> int:
    """Write rows (dicts or pydantic models) atomically; returns the row count."""
    n = 0
    with atomic_open(path) as fh:
        for row in rows:
            if isinstance(row, BaseModel):
                row = row.model_dump(mode="json", by_alias=True)
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield JSON objects; a malformed line raises :class:`ArtifactError` naming the file and line."""
    for _, obj in read_jsonl_lines(path):
        yield obj


def read_jsonl_lines(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Like :func:`read_jsonl`, with each object's 1-based line number (blank lines are skipped).

    Every way a line can be unusable (not UTF-8, not JSON, nested too deep to decode, not an object) is
    an :class:`ArtifactError` naming the file and line, never a bare decoder exception.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"file not found: {path}")
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark, as some Windows editors write
            if not raw.strip():
                continue
            obj = _parse_json(decode_utf8(raw, path, lineno), path, lineno)
            if not isinstance(obj, dict):
                raise ArtifactError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise ArtifactError(f"{path} is a directory, expected a JSON file") from None
    return _parse_json(decode_utf8(data.removeprefix(b"\xef\xbb\xbf"), path), path)


def decode_utf8(data: bytes, path: str | Path, first_line: int = 1) -> str:
    """``data`` as text; invalid UTF-8 is an :class:`ArtifactError` naming the file, line and column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + data.count(b"\n", 0, exc.start)
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ArtifactError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {column}); "
                            "save the file as UTF-8") from None


def _parse_json(text: str, path: Path, line: int | None = None) -> Any:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        where = line if line is not None else exc.lineno
        raise ArtifactError(f"{path}:{where}: malformed JSON ({exc.msg})") from None
    except RecursionError:  # the stdlib decoder recurses once per nesting level
        where = line if line is not None else 1
        raise ArtifactError(f"{path}:{where}: JSON nested too deeply to decode") from None
    if _ESCAPED_SURROGATE.search(text):
        _check_no_lone_surrogate(obj, path, line)
    return obj


# JSON may escape half of a UTF-16 pair ("\\ud800"): Python decodes it into a string no UTF-8 writer or
# tokenizer accepts, so it would fail stages later, far from the file that holds it.
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_no_lone_surrogate(obj: Any, path: Path, line: int | None) -> None:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        where = f"{path}:{line}" if line is not None else str(path)
        raise ArtifactError(f"{where}: text holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), which is "
                            "not valid Unicode") from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_path(path: str | Path) -> str:
    """Hash of a file, or of a folder's files (relative names and contents) in sorted order."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(os.fsencode(f.relative_to(path)))  # the name's bytes: same as .encode() for UTF-8 names
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def config_hash(config: Any) -> str:
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


# ------------------------------------------------------------------------------------------ manifests


class Manifest(BaseModel):
    stage: str
    version: str = __version__
    config: dict[str, Any] = Field(default_factory=dict)
    inputs: dict[str, str] = Field(default_factory=dict, description="path -> sha256")
    outputs: dict[str, str] = Field(default_factory=dict, description="path -> sha256")
    counts: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    seconds: float = 0.0
    peak_rss_mb: float | None = Field(
        None, description="highest resident memory of the process and its children while the stage ran "
                          "(sampled every 0.25 s, so a spike shorter than that can be missed)")
    finished_at: str = ""
    skipped: bool = Field(False, exclude=True, description="set when a rerun found the stage up to date")


class PeakRss:
    """Peak resident memory (MB) of this process plus its children between :meth:`start` and :meth:`stop`.

    Sampled by a daemon thread: ``ru_maxrss`` would be the whole process's lifetime peak, so a stage run
    after a hungrier one would inherit that one's figure; sampling gives each stage its own."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PeakRss:
        self.peak = _tree_rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _tree_rss())

    def stop(self) -> float:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.peak = max(self.peak, _tree_rss())
        return round(self.peak / 2**20, 1)


def _tree_rss() -> int:
    """Resident bytes of this process and all its descendants (e.g. torchrun workers)."""
    import psutil

    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += child.memory_info().rss
    return total


class RunDir:
    """``runs/<name>/``: one folder per stage, each with its artifacts and a manifest."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def path(self, stage: str, *parts: str) -> Path:
        return self.stage_dir(stage).joinpath(*parts)

    def manifest(self, stage: str) -> Manifest | None:
        p = self.path(stage, MANIFEST)
        if not p.is_file():
            return None
        return Manifest.model_validate(read_json(p))

    def require(self, stage: str, *parts: str) -> Path:
        """Path of a finished stage's artifact; a clear error when the stage has not run."""
        if self.manifest(stage) is None:
            raise ArtifactError(f"stage '{stage}' has not completed in {self.root}: run `embedtune {stage}` first")
        p = self.path(stage, *parts)
        if not p.exists():
            raise ArtifactError(f"{p} is missing although stage '{stage}' completed; rerun it with --force")
        return p

    def stage(self, name: str, config: Any, inputs: Iterable[str | Path] = ()) -> Stage:
        return Stage(self, name, config, list(inputs))

    def file_key(self, path: str | Path) -> str:
        """How a manifest names a file: relative to the run folder when inside it, so a run folder that is
        moved, copied (an ablation reusing sdg) or named from another working folder stays up to date;
        a file outside it (the user's corpus) by its absolute path."""
        absolute = Path(path).resolve()
        try:
            return absolute.relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return str(absolute)

    def key_path(self, key: str) -> Path:
        """The file a manifest key names (:meth:`file_key`'s inverse)."""
        path = Path(key)
        return path if path.is_absolute() else self.root / path


class Stage:
    """One execution of a stage: decides whether it is up to date, and writes its manifest last.

    Usage::

        st = run.stage("prep", recipe.prep.model_dump(), inputs=[chunks, queries])
        if (done := st.up_to_date(force)) is not None:
            return done
        ... write artifacts under st.dir ...
        return st.finish(outputs=[...], counts={...})
    """

    def __init__(self, run: RunDir, name: str, config: Any, inputs: list[str | Path]):
        self.run = run
        self.name = name
        self.dir = run.stage_dir(name)
        self.config = config if isinstance(config, dict) else _to_jsonable(config)
        self.inputs = {run.file_key(p): sha256_path(p) for p in map(Path, inputs)}
        self._t0 = time.perf_counter()
        self._rss: PeakRss | None = None

    def up_to_date(self, force: bool = False) -> Manifest | None:
        """The previous manifest if inputs and config are unchanged and outputs intact; else None.

        When the stage must (re)run, its old manifest is removed first, so a crash during the rerun
        cannot leave new partial files next to an old 'completed' marker.
        """
        old = self.run.manifest(self.name)
        if old is not None and not force and self._matches(old):
            old.skipped = True
            return old
        with contextlib.suppress(FileNotFoundError):
            (self.dir / MANIFEST).unlink()
        self.dir.mkdir(parents=True, exist_ok=True)
        # A stage killed mid-write (kill -9, OOM killer) leaves its temp file behind: the rerun clears
        # them from the whole run directory (stage folders and the run-wide caches).
        if removed := remove_orphan_temp_files(self.run.root):
            log.info("removed %d temp file(s) left by a killed run: %s", len(removed), removed[0].name)
        self._t0 = time.perf_counter()
        self._rss = PeakRss().start()
        return None

    def _matches(self, old: Manifest) -> bool:
        if old.version != __version__ or old.inputs != self.inputs:
            return False
        if config_hash(old.config) != config_hash(self.config):
            return False
        return all((p := self.run.key_path(k)).exists() and sha256_path(p) == h for k, h in old.outputs.items())

    def finish(
        self,
        outputs: Iterable[str | Path] = (),
        counts: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> Manifest:
        manifest = Manifest(
            stage=self.name,
            config=self.config,
            inputs=self.inputs,
            outputs={self.run.file_key(p): sha256_path(p) for p in map(Path, outputs)},
            counts=counts or {},
            metrics=metrics or {},
            seconds=round(time.perf_counter() - self._t0, 3),
            peak_rss_mb=self._rss.stop() if self._rss else None,
            finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        write_json(self.dir / MANIFEST, manifest.model_dump(mode="json"))
        return manifest


def _to_jsonable(config: Any) -> Any:
    if isinstance(config, BaseModel):
        return config.model_dump(mode="json")
    return json.loads(json.dumps(config, default=str))
