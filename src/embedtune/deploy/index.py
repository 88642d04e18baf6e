"""Reindexing: every corpus chunk, embedded by the model the release gate chose, into a new Milvus
collection with BM25 on its text; the alias that searches use is swapped to it only once it is complete
(and checked, see :mod:`embedtune.deploy.stage`).

The deploy stage writes ``deploy/index.json`` (:class:`IndexInfo`: where the collection is, which model
filled it, how hybrid search fuses), ``deploy/dense_stats.npz`` (the corpus's embedding mean and covariance,
for exact z-score fusion) and, with the embedded default, the Milvus Lite data in ``deploy/milvus.db``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from embedtune.artifacts import RunDir
from embedtune.config import IndexConfig, Recipe
from embedtune.console import log, progress
from embedtune.retrieval import milvus
from embedtune.retrieval.cache import encode_cached, run_embedding_cache
from embedtune.retrieval.deployment import STATS_FILE, IndexInfo
from embedtune.retrieval.encoders import ServedModel
from embedtune.schemas import Chunk, read_rows

LITE_FILE = "milvus.db"
ENCODE_BLOCK = 1024  # chunks read and encoded at once (length-sorted inside): bounded memory, full batches
INSERT_BATCH = 256  # rows per insert call, well under gRPC's message limit


def swap(client, alias: str, collection: str, keep_previous: int) -> str | None:
    """Point ``alias`` at the complete ``collection``; drop this alias's older collections (keeping the one
    it served before, for rollback, if asked). Returns that previous collection."""
    previous = milvus.point_alias(client, alias, collection)
    _drop_old(client, alias, keep={collection, previous} if keep_previous else {collection})
    return previous


def still_served(client, alias: str | None, collection: str | None, chunks: int | None) -> bool:
    """An up-to-date manifest counts only if its collection is still behind the alias, whole."""
    try:
        return (milvus.resolve_alias(client, alias) == collection
                and milvus.row_count(client, collection) == chunks)
    except Exception:  # noqa: BLE001 - any doubt means rebuild
        return False


def build(client, collection: str, cfg: IndexConfig, recipe: Recipe, model: ServedModel, chunks_path: Path,
          out_dir: Path, weight: float, dimensions: int | None = None,
          mode: str = "hybrid", encoder=None) -> tuple[IndexInfo, float]:
    """Write a fresh collection (any half-built one of the same name is dropped first) and its statistics."""
    if client.has_collection(collection):
        client.drop_collection(collection)  # a build killed midway: never aliased, so never served
    encoder = encoder or model.load(recipe.model, cfg.batch_size)  # the deploy stage passes the one it checks with
    cache = run_embedding_cache(out_dir.parent)
    n_total = sum(1 for _ in read_rows(chunks_path, Chunk))
    analyzer = milvus.analyzer_params(_stopwords(recipe))
    stats: milvus.StatsAccumulator | None = None
    dim = 0
    t0 = time.perf_counter()
    with progress() as bar:
        task = bar.add_task("index: chunks", total=n_total, rate="")
        for batch in _batches(read_rows(chunks_path, Chunk), ENCODE_BLOCK):
            passages = [c.passage for c in batch]  # embedded and BM25-indexed
            # Through the run's embedding cache, block by block: a killed build reruns without re-encoding.
            vectors = _truncate(encode_cached(encoder, passages, "passage", cache, what="index"), dimensions)
            if stats is None:
                dim = int(vectors.shape[1])
                milvus.create_collection(client, collection, dim, analyzer)
                stats = milvus.StatsAccumulator(dim)
            stats.add(vectors)
            rows = [_row(c, p, v) for c, p, v in zip(batch, passages, vectors, strict=True)]
            for start in range(0, len(rows), INSERT_BATCH):
                client.insert(collection, rows[start:start + INSERT_BATCH])
            bar.advance(task, len(batch))
            if speed := bar.tasks[task].speed:
                bar.update(task, rate=f"{speed:.1f} chunks/s")
    if stats is None:
        raise ValueError(f"{chunks_path} holds no chunks: nothing to index")
    client.flush(collection)
    stored = milvus.row_count(client, collection)
    if stored != n_total:
        raise milvus.MilvusIndexError(f"collection {collection} holds {stored} rows after inserting {n_total}")
    stats.result().save(out_dir / STATS_FILE)
    info = IndexInfo(collection=collection, alias="", uri="", chunks=n_total, dimension=dim,
                     model_kind=model.kind, model_path=model.path, model_precision=model.precision,
                     model_label=model.label, model_fingerprint=_fingerprint(encoder),
                     bm25=cfg.bm25, bm25_weight=weight, fusion=cfg.fusion, candidates=cfg.candidates,
                     lexical_candidates=cfg.lexical_candidates, analyzer=analyzer, mode=mode if cfg.bm25 else "dense")
    return info, time.perf_counter() - t0




def collection_alias(cfg: IndexConfig, run: RunDir) -> str:
    """A valid Milvus name (letters, digits, underscores; starting with a letter or underscore)."""
    name = cfg.collection or run.root.resolve().name
    name = re.sub(r"\W", "_", name, flags=re.ASCII)
    return name if re.match(r"[A-Za-z_]", name) else f"run_{name}"


def store_uri(cfg: IndexConfig, run: RunDir) -> str:
    return cfg.uri or str(run.path("deploy", LITE_FILE))


def _drop_old(client, alias: str, keep: set[str | None]) -> None:
    """Drop this alias's older collections, keeping the one it pointed at before (rollback) if asked."""
    for name in client.list_collections():
        if name.startswith(f"{alias}__") and name not in keep:
            log.info("index: dropping old collection %s", name)
            client.drop_collection(name)


def _batches(rows: Iterator[Chunk], size: int) -> Iterator[list[Chunk]]:
    batch: list[Chunk] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _row(chunk: Chunk, passage: str, vector) -> dict:
    return {"id": chunk.id, "doc_id": chunk.doc_id, "title": milvus.fit(chunk.title, 2048),
            "source": milvus.fit(chunk.source, 2048), "text": milvus.fit(passage, milvus.MAX_VARCHAR),
            "dense": vector.tolist()}


def _truncate(vectors, dimensions: int | None):
    from embedtune.retrieval.metrics import truncate

    if dimensions is None or dimensions >= vectors.shape[1]:
        return vectors
    return truncate(vectors, dimensions)


def _stopwords(recipe: Recipe) -> list[str] | None:
    """The same stopword list eval's BM25 (bm25s) uses, so both tokenise alike."""
    name = recipe.eval.bm25_stopwords
    if not name:
        return None
    import bm25s.stopwords as lists

    table = {"en": "STOPWORDS_EN", "english": "STOPWORDS_EN", "de": "STOPWORDS_GERMAN", "fr": "STOPWORDS_FRENCH",
             "es": "STOPWORDS_SPANISH", "it": "STOPWORDS_ITALIAN", "pt": "STOPWORDS_PORTUGUESE",
             "nl": "STOPWORDS_DUTCH", "da": "STOPWORDS_DANISH", "no": "STOPWORDS_NORWEGIAN",
             "sv": "STOPWORDS_SWEDISH", "ru": "STOPWORDS_RUSSIAN", "tr": "STOPWORDS_TURKISH"}
    attr = table.get(name.lower())
    if attr is None:
        log.warning("index: no stopword list for %r; BM25 keeps every word", name)
        return None
    return list(getattr(lists, attr))


def token(cfg: IndexConfig) -> str | None:
    if not cfg.token_env:
        return None
    token = os.environ.get(cfg.token_env)
    if not token:
        raise ValueError(f"index.token_env names ${cfg.token_env}, which is not set")
    return token


def _fingerprint(encoder) -> str:
    key = encoder.cache_key("passage") or {}
    return str(key.get("model", ""))


def base_path(recipe: Recipe) -> str:
    from embedtune.models import resolve

    return resolve(recipe.model).path

