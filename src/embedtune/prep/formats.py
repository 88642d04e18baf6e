"""Training files in two formats (inline JSONL, NeMo AutoModel corpus-ID) and BEIR eval files.

Inline (``prep/train.jsonl``): one :class:`~embedtune.schemas.TrainExample` per line, i.e. NeMo AutoModel's
inline ``{"query","pos_doc","neg_doc"}`` plus chunk ids and scores.

AutoModel corpus-ID (``prep/train.automodel.json`` + ``prep/corpus/``)::

    {"corpus": [{"path": "./corpus/"}],
     "data": [{"question_id": "q0", "question": "...", "corpus_id": "<id>",
               "pos_doc": [{"id": "d_..."}], "neg_doc": [{"id": "d_..."}]}]}

with ``corpus/train.parquet`` (columns ``id``, ``text``) and ``corpus/merlin_metadata.json``
(``{"corpus_id": "<id>", "class": "TextQADataset"}``). Document ids are ``"d_" + sha256(text)[:16]`` as in
NVIDIA's recipe, so identical texts share one id.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from embedtune.artifacts import (
    ArtifactError,
    atomic_open,
    read_json,
    read_jsonl_lines,
    write_json,
    write_jsonl,
)
from embedtune.retrieval.ids import passage_id
from embedtune.schemas import Chunk, SyntheticQuery, TrainExample

CORPUS_ID = "embedtune"
AUTOMODEL_FILE = "train.automodel.json"
INLINE_FILE = "train.jsonl"


@dataclass(frozen=True)
class TrainingRecord:
    """What both training formats carry: a query with its positive and negative passage texts."""

    query_id: str
    query: str
    pos_doc: tuple[str, ...]
    neg_doc: tuple[str, ...]


# ------------------------------------------------------------------------------------------ writers


def write_inline(path: Path, examples: Iterable[TrainExample]) -> int:
    return write_jsonl(path, examples)


def write_automodel(out_dir: Path, examples: list[TrainExample], corpus_id: str = CORPUS_ID) -> list[Path]:
    """Write the corpus-ID JSON and its parquet corpus of every passage the examples use."""
    texts: dict[str, str] = {}
    data = []
    for ex in examples:
        pos = [_register(texts, t) for t in ex.pos_doc]
        neg = [_register(texts, t) for t in ex.neg_doc]
        data.append({"question_id": ex.query_id, "question": ex.query, "corpus_id": corpus_id,
                     "pos_doc": [{"id": i} for i in pos], "neg_doc": [{"id": i} for i in neg]})
    corpus_dir = out_dir / "corpus"
    parquet = corpus_dir / "train.parquet"
    table = pa.table({"id": list(texts), "text": list(texts.values())})
    with atomic_open(parquet, "wb", encoding=None) as fh:
        pq.write_table(table, fh)
    meta = write_json(corpus_dir / "merlin_metadata.json", {"corpus_id": corpus_id, "class": "TextQADataset"})
    spec = write_json(out_dir / AUTOMODEL_FILE, {"corpus": [{"path": "./corpus/"}], "data": data})
    return [spec, parquet, meta]


def _register(texts: dict[str, str], text: str) -> str:
    i = passage_id(text)
    texts.setdefault(i, text)
    return i


def write_beir(out_dir: Path, chunks: list[Chunk], queries: list[SyntheticQuery]) -> list[Path]:
    """``corpus.jsonl`` (all chunks), ``queries.jsonl`` and ``qrels/test.tsv`` (graded 1 per positive)."""
    corpus = out_dir / "corpus.jsonl"
    write_jsonl(corpus, (c.beir() for c in chunks))
    qfile = out_dir / "queries.jsonl"
    write_jsonl(qfile, ({"_id": q.id, "text": q.text} for q in queries))
    qrels = out_dir / "qrels" / "test.tsv"
    with atomic_open(qrels) as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        for q in queries:
            for pid in q.positive_ids:
                fh.write(f"{q.id}\t{pid}\t1\n")
    return [corpus, qfile, qrels]


# ------------------------------------------------------------------------------------------ readers


def read_training(path: str | Path) -> list[TrainingRecord]:
    """Read either training format: a ``.json`` AutoModel corpus-ID file or an inline ``.jsonl``.

    The inline reader also accepts NeMo's plain rows, where ``pos_doc``/``neg_doc`` may be a single string
    and ``query_id`` may be absent (the line number stands in).
    """
    path = Path(path)
    if path.suffix == ".json":
        return read_automodel(path)
    return read_inline(path)


def read_inline(path: Path) -> list[TrainingRecord]:
    out = []
    for lineno, row in read_jsonl_lines(path):
        for key in ("query", "pos_doc"):
            if key not in row:
                raise ArtifactError(f"{path}:{lineno}: missing key {key!r}")
        out.append(TrainingRecord(str(row.get("query_id", lineno)), row["query"],
                                  _texts(row["pos_doc"]), _texts(row.get("neg_doc", []))))
    return out


def _texts(value: str | list[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def read_automodel(path: Path) -> list[TrainingRecord]:
    spec = read_json(path)
    if not isinstance(spec, dict) or "data" not in spec or "corpus" not in spec:
        raise ArtifactError(f"{path}: not an AutoModel corpus-ID file (needs 'corpus' and 'data')")
    texts: dict[str, str] = {}
    for entry in spec["corpus"]:
        folder = (path.parent / entry["path"]).resolve()
        table = pq.read_table(folder / "train.parquet", columns=["id", "text"])
        texts.update(zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True))
    out = []
    for i, row in enumerate(spec["data"]):
        try:
            pos = tuple(texts[d["id"]] for d in row["pos_doc"])
            neg = tuple(texts[d["id"]] for d in row.get("neg_doc", []))
        except KeyError as exc:
            qid = row.get("question_id")
            raise ArtifactError(f"{path}: data[{i}] ({qid}): id {exc} not in the corpus") from None
        out.append(TrainingRecord(str(row["question_id"]), row["question"], pos, neg))
    return out
