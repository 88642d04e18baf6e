"""The index stage: every corpus chunk, embedded by the model the run deploys, into a Milvus collection
with BM25 on its text, behind an alias that is swapped only once the new collection is complete.

Writes ``index/index.json`` (:class:`IndexInfo`: where the collection is, which model filled it, how hybrid
search fuses), ``index/dense_stats.npz`` (the corpus's embedding mean and covariance, for exact z-score
fusion) and, with the embedded default, the Milvus Lite data in ``index/milvus.db``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from embedtune.artifacts import Manifest, RunDir, config_hash, read_json, write_json
from embedtune.config import IndexConfig, Recipe
from embedtune.console import log, progress
from embedtune.retrieval import milvus
from embedtune.retrieval.cache import encode_cached, run_embedding_cache
from embedtune.retrieval.deployment import INFO_FILE, STATS_FILE, IndexInfo
from embedtune.retrieval.encoders import ServedModel, served_model
from embedtune.schemas import Chunk, read_rows

LITE_FILE = "milvus.db"
ENCODE_BLOCK = 1024  # chunks read and encoded at once (length-sorted inside): bounded memory, full batches
INSERT_BATCH = 256  # rows per insert call, well under gRPC's message limit


def run_index(recipe: Recipe, run: RunDir, *, force: bool = False) -> Manifest:
    """(Re)index ``corpus/chunks.jsonl`` with the run's served model; skipped when nothing changed."""
    cfg = recipe.index
    chunks_path = run.require("corpus", "chunks.jsonl")
    model = served_model(run.root, _base_path(recipe))
    weight = deployed_weight(recipe, run)
    alias = collection_alias(cfg, run)
    uri = store_uri(cfg, run)
    inputs = [chunks_path] + ([Path(model.path)] if Path(model.path).exists() else [])
    config = {"index": cfg.model_dump(mode="json", exclude={"timeout", "keep_previous"}), "alias": alias,
              "uri": uri, "model": {"kind": model.kind, "path": model.path, "precision": model.precision},
              "bm25_weight": weight, "language": recipe.corpus.language, "stopwords": recipe.eval.bm25_stopwords}
    stage = run.stage("index", config, inputs=inputs)
    client = milvus.connect(uri, _token(cfg), cfg.timeout)
    try:
        return _index(client, stage, cfg, recipe, model, chunks_path, alias, uri, weight, config, force)
    finally:
        milvus.release(client, uri)  # Lite: free the file for the server or `embedtune search`


def _index(client, stage, cfg: IndexConfig, recipe: Recipe, model: ServedModel, chunks_path: Path, alias: str,
           uri: str, weight: float, config: dict, force: bool) -> Manifest:
    if (done := stage.up_to_date(force)) is not None:
        if _still_served(client, done):
            return done
        stage.up_to_date(force=True)  # the store lost it: drop the stale manifest before rebuilding
    collection = f"{alias}__{config_hash([config, stage.inputs])[:12]}"
    info, seconds = build(client, collection, cfg, recipe, model, chunks_path, stage.dir, weight)
    previous = milvus.point_alias(client, alias, collection)
    _drop_old(client, alias, keep={collection, previous} if cfg.keep_previous else {collection})
    # The embedded store is named relative to the index folder, so a run directory can be moved.
    stored_uri = LITE_FILE if cfg.uri is None else uri
    info = info.model_copy(update={"alias": alias, "uri": stored_uri, "token_env": cfg.token_env})
    write_json(stage.dir / INFO_FILE, info.model_dump(mode="json"))
    log.info("index: %d chunks in collection %s (alias %s) at %s, %.1f chunks/s", info.chunks, collection,
             alias, uri, info.chunks / max(seconds, 1e-9))
    return stage.finish(outputs=[stage.dir / INFO_FILE, stage.dir / STATS_FILE],
                        counts={"chunks": info.chunks, "dimension": info.dimension, "collection": collection,
                                "previous_collection": previous},
                        metrics={"chunks_per_second": round(info.chunks / max(seconds, 1e-9), 2),
                                 "bm25_weight": weight})


def build(client, collection: str, cfg: IndexConfig, recipe: Recipe, model: ServedModel, chunks_path: Path,
          out_dir: Path, weight: float) -> tuple[IndexInfo, float]:
    """Write a fresh collection (any half-built one of the same name is dropped first) and its statistics."""
    if client.has_collection(collection):
        client.drop_collection(collection)  # a build killed midway: never aliased, so never served
    encoder = model.load(recipe.model, cfg.batch_size)
    cache = run_embedding_cache(out_dir.parent)
    n_total = sum(1 for _ in read_rows(chunks_path, Chunk))
    analyzer = milvus.analyzer_params(_stopwords(recipe))
    stats: milvus.StatsAccumulator | None = None
    dim = 0
    t0 = time.perf_counter()
    with progress() as bar:
        task = bar.add_task("index: chunks", total=n_total, rate="")
        for batch in _batches(read_rows(chunks_path, Chunk), ENCODE_BLOCK):
            passages = [passage_text(c) for c in batch]
            # Through the run's embedding cache, block by block: a killed build reruns without re-encoding.
            vectors = _truncate(encode_cached(encoder, passages, "passage", cache, what="index"), cfg.dimensions)
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
                     lexical_candidates=cfg.lexical_candidates, analyzer=analyzer)
    return info, time.perf_counter() - t0


def passage_text(chunk: Chunk) -> str:
    """What is embedded and BM25-indexed: the title and the text, joined as BEIR's dense retrievers do."""
    return f"{chunk.title} {chunk.text}".strip() if chunk.title else chunk.text


def deployed_weight(recipe: Recipe, run: RunDir) -> float:
    """``index.bm25_weight``, else the weight eval chose on the run's synthetic held-out queries, else
    ``eval.hybrid_bm25_weight``."""
    if recipe.index.bm25_weight is not None:
        return recipe.index.bm25_weight
    results = run.path("eval", "results.json")
    if run.manifest("eval") is not None and results.is_file():
        chosen = (read_json(results).get("hybrid_weight") or {}).get("chosen")
        if chosen is not None:
            return float(chosen)
    return recipe.eval.hybrid_bm25_weight


def collection_alias(cfg: IndexConfig, run: RunDir) -> str:
    """A valid Milvus name (letters, digits, underscores; starting with a letter or underscore)."""
    name = cfg.collection or run.root.resolve().name
    name = re.sub(r"\W", "_", name, flags=re.ASCII)
    return name if re.match(r"[A-Za-z_]", name) else f"run_{name}"


def store_uri(cfg: IndexConfig, run: RunDir) -> str:
    return cfg.uri or str(run.path("index", LITE_FILE))


def _still_served(client, done: Manifest) -> bool:
    """An up-to-date manifest counts only if its collection is still behind the alias, whole."""
    collection, alias = done.counts.get("collection"), done.config.get("alias")
    try:
        return (milvus.resolve_alias(client, alias) == collection
                and milvus.row_count(client, collection) == done.counts.get("chunks"))
    except Exception:  # noqa: BLE001 - any doubt means rebuild
        return False


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


def _token(cfg: IndexConfig) -> str | None:
    if not cfg.token_env:
        return None
    token = os.environ.get(cfg.token_env)
    if not token:
        raise ValueError(f"index.token_env names ${cfg.token_env}, which is not set")
    return token


def _fingerprint(encoder) -> str:
    key = encoder.cache_key("passage") or {}
    return str(key.get("model", ""))


def _base_path(recipe: Recipe) -> str:
    from embedtune.models import resolve

    return resolve(recipe.model).path

