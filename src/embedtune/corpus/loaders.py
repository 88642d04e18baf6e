"""Read documents from a folder (recursive), a single file, or a BEIR ``corpus.jsonl``."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from embedtune.artifacts import ArtifactError, decode_utf8, read_json, read_jsonl_lines
from embedtune.console import log
from embedtune.corpus.clean import html_to_text, pdf_to_text
from embedtune.corpus.markdown import markdown_to_text

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst"}
MARKDOWN_SUFFIXES = {".md", ".markdown"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | JSON_SUFFIXES | {".pdf"}
TEXT_FIELDS = ("text", "content", "body", "passage", "document")


@dataclass
class Document:
    id: str
    text: str
    title: str = ""
    source: str = ""
    sections: list[tuple[int, str]] = field(default_factory=list)  # (offset in text, heading path)


# Why a file was not read: the keys of the corpus manifest's ``skipped_by_reason``.
UNSUPPORTED = "unsupported extension"
HIDDEN = "hidden file"
EMPTY = "empty file"
BINARY = "binary content"
UNREADABLE = "unreadable"  # not UTF-8, a broken PDF, an unusable file name, an OS error


@dataclass
class LoadStats:
    files: int = 0  # files opened as documents
    skipped_files: list[str] = field(default_factory=list)  # "path: reason" of files that could not be read
    unsupported_files: int = 0
    not_read: list[tuple[str, str, str]] = field(default_factory=list)  # (path, reason, detail), every file

    def by_reason(self) -> dict[str, int]:
        return dict(Counter(reason for _, reason, _ in self.not_read).most_common())

    def summary(self) -> str:
        """One line: how many files were not read, by reason (and by extension for unsupported ones)."""
        exts = Counter(Path(p).suffix.lower() or "(none)" for p, r, _ in self.not_read if r == UNSUPPORTED)
        parts = []
        for reason, n in self.by_reason().items():
            extra = f" ({', '.join(f'{e} {k}' for e, k in exts.most_common(8))})" if reason == UNSUPPORTED else ""
            parts.append(f"{n} {reason}{extra}")
        return f"{len(self.not_read)} files not read: " + "; ".join(parts)


def iter_documents(path: str | Path, stats: LoadStats | None = None) -> Iterator[Document]:
    """Every document under ``path``; unreadable files are warned about, counted and skipped."""
    root = Path(path).expanduser()
    stats = stats if stats is not None else LoadStats()
    if not root.exists():
        raise FileNotFoundError(f"corpus path does not exist: {root}")
    if is_beir_folder(root):  # its queries and qrels are not documents
        log.info("%s is a BEIR folder: reading its corpus.jsonl only", root)
        root = root / "corpus.jsonl"
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for file in files:
        rel = file.name if root.is_file() else str(file.relative_to(root))
        if (reason := _not_a_document(file)) is not None:
            stats.unsupported_files += reason == UNSUPPORTED
            stats.not_read.append((_printable(Path(rel)), reason, ""))
            continue
        stats.files += 1
        if not _valid_utf8(rel):  # ids and sources are written to UTF-8 files: a name like b"caf\xe9" can't be
            _skip(stats, rel, f"{_printable(file)}: the file name is not valid UTF-8; rename the file")
            continue
        try:
            yield from _read_file(file, rel)
        except UnreadableDocument as exc:
            _skip(stats, rel, str(exc), exc.reason)
        except ArtifactError:
            raise  # a malformed JSON record is an error the user must fix, not a skip
        except (OSError, ValueError) as exc:
            _skip(stats, rel, f"{file}: {type(exc).__name__}: {exc}")
    if stats.not_read:
        log.info("%s", stats.summary())


def is_beir_folder(path: Path) -> bool:
    """A BEIR dataset folder: ``corpus.jsonl`` beside ``queries.jsonl`` or ``qrels/``."""
    return path.is_dir() and (path / "corpus.jsonl").is_file() and (
        (path / "queries.jsonl").is_file() or (path / "qrels").is_dir())


class UnreadableDocument(ValueError):
    """A text, HTML or PDF document that cannot be read: skipped with a warning, the rest goes on."""

    def __init__(self, message: str, reason: str = UNREADABLE):
        super().__init__(message)
        self.reason = reason


def _not_a_document(file: Path) -> str | None:
    """Why ``file`` is not opened as a document (an image, a hidden file, an empty file), else None."""
    if file.name.startswith("."):
        return HIDDEN
    if file.suffix.lower() not in SUFFIXES:
        return UNSUPPORTED
    try:
        return EMPTY if file.stat().st_size == 0 else None
    except OSError:
        return None  # reading it will say why


def _skip(stats: LoadStats, rel: str, message: str, reason: str = UNREADABLE) -> None:
    log.warning("skipped %s", message)
    stats.skipped_files.append(message)
    stats.not_read.append((_printable(Path(rel)), reason, message))


def _valid_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # the OS handed over undecodable bytes as lone surrogates
        return False
    return True


def _printable(path: Path) -> str:
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _pdf_text(file: Path) -> str:
    try:
        return pdf_to_text(file)
    except (OSError, ValueError):
        raise
    except Exception as exc:  # noqa: BLE001 - a hostile PDF can break the parser in any way (recursion too)
        raise UnreadableDocument(f"{file}: unreadable PDF ({type(exc).__name__})") from None


def _decode(file: Path) -> str:
    data = file.read_bytes()
    if b"\0" in data[:8192]:  # UTF-8 text never holds NUL: an image or archive under a text name
        raise UnreadableDocument(f"{file}: binary content (a NUL byte), not text", BINARY)
    try:
        return decode_utf8(data, file)
    except ArtifactError as exc:  # names file, line and column
        raise UnreadableDocument(str(exc)) from None


def _read_file(file: Path, rel: str) -> Iterator[Document]:
    suffix = file.suffix.lower()
    if suffix in JSON_SUFFIXES:
        yield from _read_json_records(file, rel)
    elif suffix == ".pdf":
        yield Document(rel, _pdf_text(file), title=file.stem, source=rel)
    elif suffix in HTML_SUFFIXES:
        title, text = html_to_text(_decode(file))
        yield Document(rel, text, title=title or file.stem, source=rel)
    elif suffix in MARKDOWN_SUFFIXES:
        md = markdown_to_text(_decode(file))
        yield Document(rel, md.text, title=md.title or file.stem, source=rel, sections=md.sections)
    else:
        yield Document(rel, _decode(file), source=rel)


def _read_json_records(file: Path, rel: str) -> Iterator[Document]:
    """JSONL (BEIR corpus or any records with a text field), or a .json list of records."""
    if file.suffix.lower() == ".json":
        data = read_json(file)
        records = enumerate(data if isinstance(data, list) else [data], 1)
    else:
        records = read_jsonl_lines(file)
    for n, rec in records:
        if not isinstance(rec, dict):
            raise ArtifactError(f"{file}:{n}: expected a JSON object")
        text = next((rec[k] for k in TEXT_FIELDS if isinstance(rec.get(k), str)), None)
        if text is None:
            raise ArtifactError(f"{file}:{n}: no text field (one of {', '.join(TEXT_FIELDS)})")
        doc_id = rec.get("_id", rec.get("id"))
        yield Document(str(doc_id) if doc_id is not None else f"{rel}:{n}", text,
                       title=str(rec.get("title") or ""), source=rel)

