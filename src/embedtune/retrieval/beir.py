"""Strict BEIR loading: corpus.jsonl, queries.jsonl, qrels/<split>.tsv."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from embedtune.artifacts import ArtifactError, read_jsonl_lines


@dataclass
class BeirDataset:
    corpus: dict[str, dict[str, str]]  # id -> {"title", "text"}
    queries: dict[str, str]  # id -> text (only queries that have qrels)
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance}
    name: str = ""
    warnings: list[str] = field(default_factory=list)

    def passages(self, ids: list[str]) -> list[str]:
        """Title and text joined as BEIR's dense retrievers do."""
        return [_join(self.corpus[i]) for i in ids]


def _join(doc: dict[str, str]) -> str:
    title, text = doc.get("title") or "", doc.get("text") or ""
    return f"{title} {text}".strip() if title else text


def load_beir(folder: str | Path, split: str = "test", queries_folder: str | Path | None = None) -> BeirDataset:
    """Load a BEIR folder. ``queries_folder`` takes queries from another folder (cross-lingual runs:
    e.g. German queries against a Chinese corpus with aligned ids); qrels come from ``folder``.

    A malformed line raises ArtifactError naming file and line. Qrels that point to documents or queries
    that do not exist are reported in ``warnings`` and left out (BEIR silently ignores them).
    """
    folder = Path(folder)
    qfolder = Path(queries_folder) if queries_folder else folder
    for f in (folder / "corpus.jsonl", qfolder / "queries.jsonl", folder / "qrels" / f"{split}.tsv"):
        if not f.is_file():
            raise ArtifactError(f"BEIR file missing: {f}")
    corpus = {}
    for n, row in read_jsonl_lines(folder / "corpus.jsonl"):
        _require(row, ("_id", "text"), folder / "corpus.jsonl", n)
        corpus[str(row["_id"])] = {"title": str(row.get("title") or ""), "text": str(row["text"])}
    queries_all = {}
    for n, row in read_jsonl_lines(qfolder / "queries.jsonl"):
        _require(row, ("_id", "text"), qfolder / "queries.jsonl", n)
        queries_all[str(row["_id"])] = str(row["text"])
    qrels, warnings = _read_qrels(folder / "qrels" / f"{split}.tsv", corpus, queries_all)
    queries = {q: queries_all[q] for q in qrels}
    name = folder.name if qfolder == folder else f"{qfolder.name}->{folder.name}"
    return BeirDataset(corpus, queries, qrels, name=name, warnings=warnings)


def _require(row: dict, keys: tuple[str, ...], path: Path, line: int) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ArtifactError(f"{path}:{line}: missing field(s) {', '.join(missing)}")


def _read_qrels(path: Path, corpus: dict, queries: dict) -> tuple[dict[str, dict[str, int]], list[str]]:
    qrels: dict[str, dict[str, int]] = {}
    warnings: list[str] = []
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        for line, row in enumerate(reader, 1):
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
                raise ArtifactError(f"{path}:{line}: relevance {score!r} is not an integer") from None
            if did not in corpus:
                warnings.append(f"{path}:{line}: document {did!r} is not in the corpus")
                continue
            if qid not in queries:
                warnings.append(f"{path}:{line}: query {qid!r} is not in queries.jsonl")
                continue
            qrels.setdefault(qid, {})[did] = rel
    return qrels, warnings
