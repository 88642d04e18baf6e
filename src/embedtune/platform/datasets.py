"""Dataset files: safe archive extraction, per-format validation, prepared training-set normalisation.

Formats:
- ``corpus``: documents (a folder, a .tar.gz/.zip of one, or single files) for the corpus stage;
- ``beir``: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv`` (evaluation, or a validation set);
- ``training``: prepared training JSONL rows ``{"query", "pos_doc", "neg_doc"}`` (strings or lists of
  strings; NeMo Customizer's embedding format), normalised to embedtune's ``prep/train.jsonl`` rows.

Every problem is a :class:`PlatformError` with a 4xx status and a message that names the file and line.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any

from embedtune.artifacts import ArtifactError, write_jsonl
from embedtune.platform.errors import PlatformError
from embedtune.platform.settings import PlatformSettings
from embedtune.retrieval.ids import passage_id

FORMATS = ("corpus", "beir", "training")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
TRAINING_FILE = "train.jsonl"


class UploadTooLarge(PlatformError):
    def __init__(self, what: str, limit: int):
        super().__init__(413, f"{what} exceeds the limit of {limit:,} bytes", code="too_large")


def bad(message: str, code: str = "invalid_dataset", param: str | None = "files") -> PlatformError:
    return PlatformError(422, message, code=code, param=param)


# ------------------------------------------------------------------------------------------- files in


def copy_limited(src: IO[bytes], dst: Path, limit: int, what: str) -> int:
    """Copy a stream to ``dst``, refusing more than ``limit`` bytes."""
    total = 0
    with dst.open("wb") as out:
        while block := src.read(1 << 20):
            total += len(block)
            if total > limit:
                raise UploadTooLarge(what, limit)
            out.write(block)
    return total


MAX_NAME_BYTES = 255  # one path component, as most filesystems allow
MAX_PATH_CHARS = 1024


def shown(name: str, limit: int = 80) -> str:
    """A user-given name as quoted back in a message: cut, so no message echoes megabytes of input."""
    return name if len(name) <= limit else name[:limit] + "..."


def safe_member_path(name: str, what: str = "archive member") -> PurePosixPath:
    """A member name that stays inside the extraction folder; anything else is refused, not repaired."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise PlatformError(400, f"{what} '{shown(name)}' escapes the dataset folder (path traversal)",
                            code="unsafe_archive", param="files")
    too_long = len(name) > MAX_PATH_CHARS or any(len(p.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES
                                                   for p in path.parts)
    if too_long or "\x00" in name:
        raise PlatformError(400, f"{what} '{shown(name)}' is too long or holds a NUL byte", code="bad_file_name",
                            param="files")
    return path


def safe_file_name(name: str, what: str) -> PurePosixPath:
    """An uploaded file's name: a safe relative path that names a file (not a folder)."""
    path = safe_member_path(name, what)
    if not path.parts or name.endswith(("/", "\\")) or path.name in ("", "."):
        raise PlatformError(400, f"{what} '{shown(name)}' names a folder, not a file", code="bad_file_name",
                            param="files")
    return path


def is_archive(filename: str) -> bool:
    return filename.lower().endswith(ARCHIVE_SUFFIXES)


class Budget:
    """Bytes an extraction may still write: the smaller of the total cap and the compression-ratio cap."""

    def __init__(self, archive: Path, settings: PlatformSettings):
        ratio_cap = int(max(archive.stat().st_size, 1 << 16) * settings.max_compression_ratio)
        self.limit = min(settings.max_extracted_bytes, ratio_cap)
        self.what = ("the archive's extracted size" if self.limit == settings.max_extracted_bytes
                     else f"the archive's extracted size ({settings.max_compression_ratio:g}x its compressed size)")
        self.used = 0

    def take(self, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise UploadTooLarge(self.what, self.limit)


def extract_archive(archive: Path, filename: str, dest: Path, settings: PlatformSettings) -> None:
    """Extract a .tar(.gz)/.zip into ``dest``, checking every member (name, kind) and the bytes written as
    they are written: a bomb is stopped at the cap, not discovered after it filled the disk."""
    budget = Budget(archive, settings)
    try:
        if filename.lower().endswith(".zip"):
            _extract_zip(archive, dest, settings, budget)
        else:
            _extract_tar(archive, dest, settings, budget)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise PlatformError(400, f"'{shown(filename)}' is not a readable archive ({type(exc).__name__})",
                            code="bad_archive", param="files") from None
    except OSError as exc:
        if isinstance(exc, PermissionError):
            raise
        # Never str(exc): it names the server's extraction folder.
        raise PlatformError(400, f"'{shown(filename)}' could not be extracted ({exc.strerror or type(exc).__name__})",
                            code="bad_archive", param="files") from None


def _check_count(count: int, settings: PlatformSettings) -> None:
    if count > settings.max_archive_members:
        raise PlatformError(413, f"archive has more than {settings.max_archive_members:,} members",
                            code="too_large", param="files")


def _write_member(src: IO[bytes], target: Path, budget: Budget) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("xb") as out:
        while block := src.read(1 << 20):
            budget.take(len(block))
            out.write(block)


def _extract_tar(archive: Path, dest: Path, settings: PlatformSettings, budget: Budget) -> None:
    # Stream mode ("r|*"): one pass, each member written as it is decompressed, so the budget counts real bytes.
    with tarfile.open(archive, "r|*") as tar:
        for count, m in enumerate(tar, 1):
            rel = safe_member_path(m.name)
            _check_count(count, settings)
            if m.issym() or m.islnk():
                raise PlatformError(400, f"archive member '{shown(m.name)}' is a link; links are not accepted",
                                    code="unsafe_archive", param="files")
            if m.isdir():
                (dest / rel).mkdir(parents=True, exist_ok=True)
            elif m.isfile():
                if m.size > budget.limit - budget.used:  # a declared bomb stops before a byte is written
                    raise UploadTooLarge(budget.what, budget.limit)
                _write_member(tar.extractfile(m), dest / rel, budget)
            else:
                raise PlatformError(400, f"archive member '{shown(m.name)}' is not a regular file",
                                    code="unsafe_archive", param="files")


def _extract_zip(archive: Path, dest: Path, settings: PlatformSettings, budget: Budget) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        _check_count(len(infos), settings)
        declared = 0
        for info in infos:
            safe_member_path(info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise PlatformError(400, f"archive member '{shown(info.filename)}' is a link; links are not accepted",
                                    code="unsafe_archive", param="files")
            declared += info.file_size
        if declared > budget.limit:
            raise UploadTooLarge(budget.what, budget.limit)
        for info in infos:
            target = dest / safe_member_path(info.filename)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            with zf.open(info) as src:  # zipfile stops at the declared size and checks the CRC
                _write_member(src, target, budget)


def single_root(folder: Path) -> Path:
    """An archive of ``corpus/`` unpacks to one folder: use it as the dataset root."""
    entries = [p for p in folder.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else folder


def walk_files(root: Path, limit: int) -> list[Path]:
    """The files under ``root`` (itself if a file), sorted; at most ``limit`` entries are looked at, so a
    request never walks an unbounded tree. Symbolic links are not followed."""
    if root.is_file():
        return [root]
    found: list[Path] = []
    seen = 0
    for folder, dirs, names in os.walk(root, followlinks=False):
        seen += len(dirs) + len(names)
        if seen > limit:
            raise bad(f"the dataset has more than {limit:,} files and folders")
        found.extend(Path(folder) / n for n in names)
    return sorted(p for p in found if p.is_file())


def refuse_links(root: Path, limit: int) -> None:
    """A registered folder may not hold symbolic links: they could lead the pipeline outside the roots."""
    if root.is_file():
        return
    seen = 0
    for folder, dirs, names in os.walk(root, followlinks=False):
        seen += len(dirs) + len(names)
        if seen > limit:
            raise bad(f"the folder has more than {limit:,} files and folders", param="path")
        if any(os.path.islink(os.path.join(folder, n)) for n in (*dirs, *names)):
            raise bad("the folder holds a symbolic link; links are not accepted", param="path")


def folder_size(path: Path, limit: int = 1_000_000) -> int:
    return sum(p.stat().st_size for p in walk_files(path, limit))


# ------------------------------------------------------------------------------------------ validation


def validate(fmt: str, root: Path, out_dir: Path, label: str, limit: int = 100_000) -> tuple[Path, dict[str, Any]]:
    """Check a dataset's files; return the path the pipeline should use and summary stats."""
    if fmt == "corpus":
        return root, validate_corpus(root, label, limit)
    if fmt == "beir":
        folder = find_beir_folder(root, label, limit)
        return folder, validate_beir(folder, label)
    if fmt == "training":
        return normalise_training(root, out_dir / TRAINING_FILE, label, limit)
    raise bad(f"unknown dataset format '{fmt}' (formats: {', '.join(FORMATS)})", param="format")


def where(path: Path, root: Path, label: str) -> str:
    """A file by its place in the dataset (``label/relative/path``), never by its server path."""
    if path == root:
        return f"{label}/{path.name}" if root.is_file() else label
    try:
        return f"{label}/{path.relative_to(root)}"
    except ValueError:
        return f"{label}/{path.name}"


def json_lines(path: Path, shown_as: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of a JSONL file; bad bytes, bad JSON, absurd nesting -> a 422 naming the line."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise bad(f"{shown_as}:{lineno}: not valid UTF-8") from None
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as exc:
                raise bad(f"{shown_as}:{lineno}: malformed JSON ({exc.msg})") from None
            except RecursionError:
                raise bad(f"{shown_as}:{lineno}: JSON nested too deeply") from None


def json_objects(path: Path, shown_as: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for lineno, obj in json_lines(path, shown_as):
        if not isinstance(obj, dict):
            raise bad(f"{shown_as}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def validate_corpus(root: Path, label: str, limit: int = 100_000) -> dict[str, Any]:
    from embedtune.corpus.loaders import JSON_SUFFIXES, SUFFIXES

    files = walk_files(root, limit)
    usable = [f for f in files if f.suffix.lower() in SUFFIXES and not f.name.startswith(".")]
    if not usable:
        raise bad(f"dataset '{label}' holds no documents (supported: {', '.join(sorted(SUFFIXES))})")
    records = 0
    for f in usable:
        if f.suffix.lower() in JSON_SUFFIXES - {".json"}:
            records += _check_jsonl(f, where(f, root, label))
    return {"files": len(usable), "jsonl_records": records}


def _check_jsonl(path: Path, shown_as: str) -> int:
    from embedtune.corpus.loaders import TEXT_FIELDS

    n = 0
    for lineno, obj in json_objects(path, shown_as):
        if not any(k in obj for k in TEXT_FIELDS):
            raise bad(f"{shown_as}:{lineno}: missing field {' or '.join(TEXT_FIELDS)}")
        n += 1
    return n


def find_beir_folder(root: Path, label: str, limit: int = 100_000) -> Path:
    if (root / "corpus.jsonl").is_file():
        return root
    found = sorted(p.parent for p in walk_files(root, limit) if p.name == "corpus.jsonl")
    if len(found) == 1:
        return found[0]
    raise bad(f"dataset '{label}' is not BEIR: expected corpus.jsonl, queries.jsonl and qrels/<split>.tsv"
              + (f" (found {len(found)} corpus.jsonl files)" if found else ""))


def validate_beir(folder: Path, label: str) -> dict[str, Any]:
    from embedtune.retrieval.beir import load_beir

    splits = sorted(p.stem for p in (folder / "qrels").glob("*.tsv")) if (folder / "qrels").is_dir() else []
    if not splits:
        raise bad(f"dataset '{label}' has no qrels/<split>.tsv file")
    for name in ("corpus.jsonl", "queries.jsonl"):  # bytes and nesting first: the loader assumes sane input
        if (folder / name).is_file():
            for _ in json_objects(folder / name, f"{label}/{name}"):
                pass
    for split in splits:
        _check_utf8_lines(folder / "qrels" / f"{split}.tsv", f"{label}/qrels/{split}.tsv")
    stats: dict[str, Any] = {"splits": {}}
    for split in splits:
        try:
            ds = load_beir(folder, split)
        except ArtifactError as exc:
            raise bad(_relabel(str(exc), folder, label)) from None
        except (ValueError, KeyError, TypeError, RecursionError) as exc:  # a loader surprise is still the input's
            raise bad(f"dataset '{label}' split '{split}' could not be read ({type(exc).__name__})") from None
        stats["documents"] = len(ds.corpus)
        stats["splits"][split] = {"queries": len(ds.queries), "qrels": sum(map(len, ds.qrels.values()))}
    return stats


def _check_utf8_lines(path: Path, shown_as: str) -> None:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                raise bad(f"{shown_as}:{lineno}: not valid UTF-8") from None


def _relabel(message: str, root: Path, label: str) -> str:
    """Name files by their place in the dataset, not by server paths."""
    return message.replace(str(root), label)


def _texts(value: Any, field: str, where: str, required: bool) -> list[str]:
    if value is None:
        if required:
            raise bad(f"{where}: {field} is missing (a training example needs at least one positive)")
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
        raise bad(f"{where}: {field} must be a string or a list of strings")
    items = [t for t in items if t.strip()]
    if required and not items:
        raise bad(f"{where}: {field} is empty (a training example needs at least one positive)")
    return items


def normalise_training(root: Path, out: Path, label: str, limit: int = 100_000) -> tuple[Path, dict[str, Any]]:
    """Customizer/AutoModel inline rows -> embedtune TrainExample rows (ids derived from the texts)."""
    from embedtune.schemas import TrainExample

    files = [p for p in walk_files(root, limit) if p.suffix == ".jsonl" and not p.name.startswith(".")]
    if len(files) != 1:
        raise bad(f"dataset '{label}' must hold exactly one .jsonl training file (found {len(files)})")
    src, rows = files[0], []
    name = src.name if root.is_file() else str(src.relative_to(root))
    for lineno, obj in json_objects(src, name):
        loc = f"{name}:{lineno}"
        query = obj.get("query", obj.get("question"))
        if not isinstance(query, str) or not query.strip():
            raise bad(f"{loc}: query must be a non-empty string")
        pos = _texts(obj.get("pos_doc"), "pos_doc", loc, required=True)
        neg = _texts(obj.get("neg_doc"), "neg_doc", loc, required=False)
        qid = str(obj.get("query_id") or f"q{lineno}")
        rows.append(TrainExample(query=query, pos_doc=pos, neg_doc=neg, query_id=qid,
                                 pos_ids=[passage_id(t) for t in pos], neg_ids=[passage_id(t) for t in neg]))
    if not rows:
        raise bad(f"{name}: no training examples (the file is empty)")
    write_jsonl(out, rows)
    return out, {"examples": len(rows), "with_negatives": sum(bool(r.neg_doc) for r in rows)}


# ------------------------------------------------------------------------------------------ lifecycle


@contextlib.contextmanager
def staging_dir(parent: Path):
    """A temporary folder beside the final one; removed unless the caller moved it into place."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
