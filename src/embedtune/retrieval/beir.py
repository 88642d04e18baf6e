"""Strict BEIR loading: corpus.jsonl, queries.jsonl, qrels/<split>.tsv."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from embedtune.artifacts import ArtifactError, check_path_name, decode_utf8, read_jsonl_lines
from embedtune.schemas import passage_text


@dataclass
class BeirDataset:
    corpus: dict[str, dict[str, str]]  # id -> {"title", "text"}
    queries: dict[str, str]  # id -> text (only queries that have qrels)
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance}
    name: str = ""
    warnings: list[str] = field(default_factory=list)

    def passages(self, ids: list[str]) -> list[str]:
        """Title and text joined as BEIR's dense retrievers do."""
        return [passage_text(self.corpus[i].get("title") or "", self.corpus[i].get("text") or "") for i in ids]


def load_beir(folder: str | Path, split: str = "test", queries_folder: str | Path | None = None) -> BeirDataset:
    """Load a BEIR folder. ``queries_folder`` takes queries from another folder (cross-lingual runs:
    e.g. German queries against a Chinese corpus with aligned ids); qrels come from ``folder``.

    A malformed line, a duplicate id or an empty query raises ArtifactError naming file and line (BEIR
    silently keeps the last of two records with one id). Qrels that point to documents or queries that do
    not exist are reported in ``warnings`` and left out (BEIR silently ignores them).
    """
    check_path_name(split, "BEIR split")  # joined below: '/x' or '../x' would leave the qrels folder
    folder = Path(folder)
    qfolder = Path(queries_folder) if queries_folder else folder
    for f in (folder / "corpus.jsonl", qfolder / "queries.jsonl", folder / "qrels" / f"{split}.tsv"):
        if not f.is_file():
            raise ArtifactError(f"BEIR file missing: {f}")
    corpus = {
        doc_id: {"title": str(row.get("title") or ""), "text": row["text"]}
        for doc_id, row in _read_records(folder / "corpus.jsonl")
    }
    queries_all = {}
    for query_id, row in _read_records(qfolder / "queries.jsonl", non_empty_text=True):
        queries_all[query_id] = row["text"]
    qrels, warnings = _read_qrels(folder / "qrels" / f"{split}.tsv", corpus, queries_all)
    queries = {q: queries_all[q] for q in qrels}
    name = folder.name if qfolder == folder else f"{qfolder.name}->{folder.name}"
    return BeirDataset(corpus, queries, qrels, name=name, warnings=warnings)


def _read_records(path: Path, non_empty_text: bool = False) -> Iterator[tuple[str, dict]]:
    """(id, record) of each line, checked: an id and a text string, each id once, text non-empty if asked."""
    seen: dict[str, int] = {}
    for line, row in read_jsonl_lines(path):
        _require(row, ("_id", "text"), path, line)
        if not isinstance(row["_id"], str | int) or isinstance(row["_id"], bool):
            raise ArtifactError(f"{path}:{line}: _id must be a string or an integer")
        if not isinstance(row["text"], str):
            raise ArtifactError(f"{path}:{line}: text must be a string, got {type(row['text']).__name__}")
        record_id = str(row["_id"])
        if record_id in seen:
            raise ArtifactError(f"{path}:{line}: duplicate _id {clip(record_id)!r} (first on line "
                                f"{seen[record_id]}); ids must be unique")
        if non_empty_text and not row["text"].strip():
            raise ArtifactError(f"{path}:{line}: query {clip(record_id)!r} has empty text")
        seen[record_id] = line
        yield record_id, row


def clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _require(row: dict, keys: tuple[str, ...], path: Path, line: int) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ArtifactError(f"{path}:{line}: missing field(s) {', '.join(missing)}")


def _read_qrels(path: Path, corpus: dict, queries: dict) -> tuple[dict[str, dict[str, int]], list[str]]:
    qrels: dict[str, dict[str, int]] = {}
    warnings: list[str] = []
    reader = csv.reader(io.StringIO(decode_utf8(path.read_bytes(), path), newline=""), delimiter="\t")
    try:
        rows = [(reader.line_num, row) for row in reader]
    except csv.Error as exc:  # e.g. a field over csv's size limit, a NUL byte
        raise ArtifactError(f"{path}:{reader.line_num}: unreadable TSV ({exc})") from None
    for line, row in rows:
        if line == 1 and row and row[0] == "query-id":
            continue
        if not row:
            continue
        if len(row) != 3:
            raise ArtifactError(f"{path}:{line}: expected 3 tab-separated columns, got {len(row)}")
        qid, did, score = row
        try:
            rel = int(score)
        except ValueError:
            raise ArtifactError(f"{path}:{line}: relevance {clip(score)!r} is not an integer") from None
        if did not in corpus:
            warnings.append(f"{path}:{line}: document {clip(did)!r} is not in the corpus")
            continue
        if qid not in queries:
            warnings.append(f"{path}:{line}: query {clip(qid)!r} is not in queries.jsonl")
            continue
        qrels.setdefault(qid, {})[did] = rel
    return qrels, warnings
