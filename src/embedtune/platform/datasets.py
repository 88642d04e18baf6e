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
import json
import shutil
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable
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


def safe_member_path(name: str) -> PurePosixPath:
    """A member name that stays inside the extraction folder; anything else is refused, not repaired."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise PlatformError(400, f"archive member '{name}' escapes the dataset folder (path traversal)",
                            code="unsafe_archive", param="files")
    return path


def is_archive(filename: str) -> bool:
    return filename.lower().endswith(ARCHIVE_SUFFIXES)


def extract_archive(archive: Path, filename: str, dest: Path, settings: PlatformSettings) -> None:
    """Extract a .tar(.gz)/.zip into ``dest`` after checking every member (names, kinds, total size)."""
    try:
        if filename.lower().endswith(".zip"):
            _extract_zip(archive, dest, settings)
        else:
            _extract_tar(archive, dest, settings)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        if isinstance(exc, PermissionError):
            raise
        raise PlatformError(400, f"'{filename}' is not a readable archive: {exc}", code="bad_archive",
                            param="files") from None


def _check_totals(count: int, size: int, settings: PlatformSettings) -> None:
    if count > settings.max_archive_members:
        raise PlatformError(413, f"archive has more than {settings.max_archive_members:,} members",
                            code="too_large", param="files")
    if size > settings.max_extracted_bytes:
        raise UploadTooLarge("the archive's extracted size", settings.max_extracted_bytes)


def _extract_tar(archive: Path, dest: Path, settings: PlatformSettings) -> None:
    with tarfile.open(archive, "r:*") as tar:
        members, size = [], 0
        for m in tar:
            safe_member_path(m.name)
            if m.issym() or m.islnk():
                raise PlatformError(400, f"archive member '{m.name}' is a link; links are not accepted",
                                    code="unsafe_archive", param="files")
            if not (m.isfile() or m.isdir()):
                raise PlatformError(400, f"archive member '{m.name}' is not a regular file",
                                    code="unsafe_archive", param="files")
            size += m.size
            members.append(m)
            _check_totals(len(members), size, settings)
        # The "data" filter is the standard library's own guard; the checks above already refused worse.
        tar.extractall(dest, members=members, filter="data")


def _extract_zip(archive: Path, dest: Path, settings: PlatformSettings) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        size = 0
        for info in infos:
            safe_member_path(info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise PlatformError(400, f"archive member '{info.filename}' is a link; links are not accepted",
                                    code="unsafe_archive", param="files")
            size += info.file_size
            _check_totals(len(infos), size, settings)
        for info in infos:
            target = dest / safe_member_path(info.filename)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src:
                copy_limited(src, target, settings.max_extracted_bytes, f"archive member '{info.filename}'")


def single_root(folder: Path) -> Path:
    """An archive of ``corpus/`` unpacks to one folder: use it as the dataset root."""
    entries = [p for p in folder.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else folder


def folder_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------ validation


def validate(fmt: str, root: Path, out_dir: Path, label: str) -> tuple[Path, dict[str, Any]]:
    """Check a dataset's files; return the path the pipeline should use and summary stats."""
    if fmt == "corpus":
        return root, validate_corpus(root, label)
    if fmt == "beir":
        folder = find_beir_folder(root, label)
        return folder, validate_beir(folder, label)
    if fmt == "training":
        return normalise_training(root, out_dir / TRAINING_FILE, label)
    raise bad(f"unknown dataset format '{fmt}' (formats: {', '.join(FORMATS)})", param="format")


def _relabel(message: str, root: Path, label: str) -> str:
    """Name files by their place in the dataset, not by server paths."""
    return message.replace(str(root), label)


def validate_corpus(root: Path, label: str) -> dict[str, Any]:
    from embedtune.corpus.loaders import JSON_SUFFIXES, SUFFIXES

    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    usable = [f for f in files if f.suffix.lower() in SUFFIXES and not f.name.startswith(".")]
    if not usable:
        raise bad(f"dataset '{label}' holds no documents (supported: {', '.join(sorted(SUFFIXES))})")
    records = 0
    for f in usable:
        if f.suffix.lower() in JSON_SUFFIXES - {".json"}:
            records += _check_jsonl(f, root, label, required=("text",), any_of=True)
    return {"files": len(usable), "jsonl_records": records}


def _check_jsonl(path: Path, root: Path, label: str, required: Iterable[str] = (), any_of: bool = False) -> int:
    from embedtune.artifacts import read_jsonl_lines
    from embedtune.corpus.loaders import TEXT_FIELDS

    n = 0
    try:
        for lineno, obj in read_jsonl_lines(path):
            fields = TEXT_FIELDS if any_of else tuple(required)
            present = [k for k in fields if k in obj]
            if (any_of and not present) or (not any_of and len(present) < len(fields)):
                need = " or ".join(fields) if any_of else ", ".join(k for k in fields if k not in obj)
                raise bad(f"{_relabel(str(path), root, label)}:{lineno}: missing field {need}")
            n += 1
    except ArtifactError as exc:
        raise bad(_relabel(str(exc), root, label)) from None
    return n


def find_beir_folder(root: Path, label: str) -> Path:
    if (root / "corpus.jsonl").is_file():
        return root
    found = sorted(p.parent for p in root.rglob("corpus.jsonl"))
    if len(found) == 1:
        return found[0]
    raise bad(f"dataset '{label}' is not BEIR: expected corpus.jsonl, queries.jsonl and qrels/<split>.tsv"
              + (f" (found {len(found)} corpus.jsonl files)" if found else ""))


def validate_beir(folder: Path, label: str) -> dict[str, Any]:
    from embedtune.retrieval import load_beir

    splits = sorted(p.stem for p in (folder / "qrels").glob("*.tsv")) if (folder / "qrels").is_dir() else []
    if not splits:
        raise bad(f"dataset '{label}' has no qrels/<split>.tsv file")
    stats: dict[str, Any] = {"splits": {}}
    for split in splits:
        try:
            ds = load_beir(folder, split)
        except ArtifactError as exc:
            raise bad(_relabel(str(exc), folder, label)) from None
        stats["documents"] = len(ds.corpus)
        stats["splits"][split] = {"queries": len(ds.queries), "qrels": sum(map(len, ds.qrels.values()))}
    return stats


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


def normalise_training(root: Path, out: Path, label: str) -> tuple[Path, dict[str, Any]]:
    """Customizer/AutoModel inline rows -> embedtune TrainExample rows (ids derived from the texts)."""
    from embedtune.schemas import TrainExample

    files = [root] if root.is_file() else sorted(p for p in root.rglob("*.jsonl") if not p.name.startswith("."))
    if len(files) != 1:
        raise bad(f"dataset '{label}' must hold exactly one .jsonl training file (found {len(files)})")
    src, rows = files[0], []
    name = src.name if root.is_file() else str(src.relative_to(root))
    with src.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            where = f"{name}:{lineno}"
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise bad(f"{where}: malformed JSON ({getattr(exc, 'msg', exc)})") from None
            if not isinstance(obj, dict):
                raise bad(f"{where}: expected a JSON object, got {type(obj).__name__}")
            query = obj.get("query", obj.get("question"))
            if not isinstance(query, str) or not query.strip():
                raise bad(f"{where}: query must be a non-empty string")
            pos = _texts(obj.get("pos_doc"), "pos_doc", where, required=True)
            neg = _texts(obj.get("neg_doc"), "neg_doc", where, required=False)
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


def remove_dataset_files(path: Path, data_dir: Path) -> None:
    """Delete an uploaded dataset's folder; registered server paths are never deleted."""
    with contextlib.suppress(ValueError):
        path.resolve().relative_to((data_dir / "datasets").resolve())
        shutil.rmtree(path, ignore_errors=True)
