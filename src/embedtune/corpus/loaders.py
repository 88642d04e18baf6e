"""Read documents from a folder (recursive), a single file, or a BEIR ``corpus.jsonl``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from embedtune.artifacts import ArtifactError, decode_utf8, read_json, read_jsonl_lines
from embedtune.console import log
from embedtune.corpus.clean import html_to_text, pdf_to_text

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst"}
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


@dataclass
class LoadStats:
    files: int = 0
    skipped_files: list[str] = field(default_factory=list)  # "path: reason"
    unsupported_files: int = 0


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
        if file.suffix.lower() not in SUFFIXES or file.name.startswith("."):
            stats.unsupported_files += root.is_dir()
            continue
        rel = file.name if root.is_file() else str(file.relative_to(root))
        stats.files += 1
        if not _valid_utf8(rel):  # ids and sources are written to UTF-8 files: a name like b"caf\xe9" can't be
            _skip(stats, f"{_printable(file)}: the file name is not valid UTF-8; rename the file")
            continue
        try:
            yield from _read_file(file, rel)
        except UnreadableDocument as exc:
            _skip(stats, str(exc))
        except ArtifactError:
            raise  # a malformed JSON record is an error the user must fix, not a skip
        except (OSError, ValueError) as exc:
            _skip(stats, f"{file}: {type(exc).__name__}: {exc}")


def is_beir_folder(path: Path) -> bool:
    """A BEIR dataset folder: ``corpus.jsonl`` beside ``queries.jsonl`` or ``qrels/``."""
    return path.is_dir() and (path / "corpus.jsonl").is_file() and (
        (path / "queries.jsonl").is_file() or (path / "qrels").is_dir())


class UnreadableDocument(ValueError):
    """A text, HTML or PDF document that cannot be read: skipped with a warning, the rest goes on."""


def _skip(stats: LoadStats, reason: str) -> None:
    log.warning("skipped %s", reason)
    stats.skipped_files.append(reason)


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
    try:
        return decode_utf8(file.read_bytes(), file)
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
    else:
        text = _decode(file)
        yield Document(rel, text, title=_markdown_title(text) if suffix in {".md", ".markdown"} else "",
                       source=rel)


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


def _markdown_title(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return ""
