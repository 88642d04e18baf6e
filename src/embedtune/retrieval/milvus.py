"""Milvus, the vector store: the index stage writes a collection, and `/v1/search`, `embedtune search` and
`embedtune eval --index` query it — through the same :class:`MilvusSearcher`, so what is evaluated is what
is served.

One ``pymilvus`` code path serves both deployments: Milvus Lite embedded in the process (a ``*.db`` path,
the default) and a Milvus Standalone/Distributed server (``http://host:19530``, a token from an env var).

Collection layout (field names are what other tools need; LangChain's ``Milvus`` vector store reads it with
``primary_field="id", text_field="text", vector_field="dense"``):

==========  =====================  ==============================================================
field       type                   what
==========  =====================  ==============================================================
id          VARCHAR (primary key)  the chunk id from ``corpus/chunks.jsonl``
doc_id      VARCHAR                the document the chunk came from (a BEIR qrel names this)
title       VARCHAR                the document title
source      VARCHAR                the source file or URL
text        VARCHAR, analyzer on   the chunk text; Milvus's built-in BM25 function reads it
dense       FLOAT_VECTOR (IP)      the model's L2-normalised embedding (Matryoshka-truncated)
sparse      SPARSE_FLOAT_VECTOR    BM25 term weights, written by Milvus's BM25 function (never by us)
==========  =====================  ==============================================================

Hybrid search fuses the two candidate lists in our code with the eval stage's z-score fusion
(:func:`zscore_fuse`), so the deployed ranking is the one eval scored; Milvus's own ``RRFRanker`` and
``WeightedRanker`` are available as ``fusion: rrf | weighted`` (their figures are in the README).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel

from embedtune.config import DEFAULT_BM25_WEIGHT, DEFAULT_CANDIDATES, DEFAULT_LEXICAL_CANDIDATES, Fusion
from embedtune.retrieval.fusion import blend

Mode = Literal["hybrid", "dense", "bm25"]
MODES: tuple[str, ...] = ("hybrid", "dense", "bm25")
OUTPUT_FIELDS = ["doc_id", "title", "source", "text"]
MAX_VARCHAR = 65_535  # Milvus's VARCHAR limit, in bytes
_SERVER_URI = re.compile(r"^(https?|tcp|grpcs?|unix)://", re.IGNORECASE)


class MilvusIndexError(ValueError):
    """The store cannot be reached or does not hold what the index says it does (a setting to fix)."""


# ------------------------------------------------------------------------------------------ connect


def is_lite(uri: str) -> bool:
    return not _SERVER_URI.match(uri)


def connect(uri: str, token: str | None = None, timeout: float = 10.0) -> Any:
    """A ``MilvusClient`` for a Lite ``*.db`` path or a server URI, checked with one call."""
    from pymilvus import MilvusClient

    if is_lite(uri):
        # Lite's in-process gRPC server lacks AllocTimestamp, which pymilvus calls when it creates an index; the
        # client falls back, but the server thread logs a full traceback for it into the user's log.
        logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
        if not uri.endswith(".db"):
            raise MilvusIndexError(f"index.uri {uri!r} is neither a Milvus Lite file (a path ending in .db) "
                                   "nor a server URI (http://host:19530, https://…)")
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    # Milvus Lite's in-process server refuses pymilvus's default 10 s keepalive pings while idle (GOAWAY
    # "too_many_pings" in the log during a long encode); a server URI keeps the defaults its operator expects.
    options = {"grpc_options": {"grpc.keepalive_permit_without_calls": False}} if is_lite(uri) else {}
    try:
        client = MilvusClient(uri=uri, token=token or "", timeout=timeout, **options)
        client.list_collections(timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - pymilvus raises many types; the user needs one clear line
        if is_lite(uri) and _locked_elsewhere(uri):
            raise MilvusIndexError(
                f"Milvus Lite file {uri!r} is open in another process (a running `embedtune serve`?): Lite serves "
                "one process at a time; stop it first, or point index.uri at a Milvus server to reindex while "
                "serving") from None
        reason = getattr(exc, "message", None) or str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MilvusIndexError(f"cannot connect to Milvus at {uri!r}: {reason}") from None
    return client


def release(client: Any, uri: str) -> None:
    """Close ``client``; for Milvus Lite also stop its in-process server, releasing the file's lock so that
    another process (the server after a reindex, `embedtune search`) can open it."""
    client.close()
    if is_lite(uri):
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(uri)


def _locked_elsewhere(uri: str) -> bool:
    import fcntl

    lock = Path(uri) / "LOCK"
    if not lock.is_file():
        return False
    with lock.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


# ------------------------------------------------------------------------------------------ build


def analyzer_params(stopwords: Sequence[str] | None, tokenizer: str = "standard") -> dict[str, Any]:
    """Milvus analyzer settings matching eval's BM25 (bm25s): lowercase words, the same stopword list."""
    filters: list[Any] = ["lowercase"]
    if stopwords:
        filters.append({"type": "stop", "stop_words": sorted(set(stopwords))})
    return {"tokenizer": tokenizer, "filter": filters}


def create_collection(client: Any, name: str, dim: int, analyzer: dict[str, Any], k1: float = 1.2,
                      b: float = 0.75) -> None:
    """An empty collection with the layout above; BM25 k1/b are Lucene's, as eval's BM25 uses."""
    from pymilvus import DataType, Function, FunctionType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False,
                                  description="embedtune deploy: chunks, dense vectors, BM25")
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=512)
    schema.add_field("doc_id", DataType.VARCHAR, max_length=512)
    schema.add_field("title", DataType.VARCHAR, max_length=2048)
    schema.add_field("source", DataType.VARCHAR, max_length=2048)
    schema.add_field("text", DataType.VARCHAR, max_length=MAX_VARCHAR, enable_analyzer=True,
                     analyzer_params=analyzer)
    schema.add_field("dense", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
    schema.add_function(Function(name="text_bm25", function_type=FunctionType.BM25,
                                 input_field_names=["text"], output_field_names=["sparse"]))
    index = client.prepare_index_params()
    index.add_index("dense", index_type="FLAT", metric_type="IP")
    index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25",
                    params={"bm25_k1": k1, "bm25_b": b})
    client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong")


def fit(text: str, limit: int) -> str:
    """``text`` cut so that its UTF-8 form fits a VARCHAR of ``limit`` bytes."""
    raw = text.encode("utf-8", "replace")
    return text if len(raw) <= limit else raw[:limit].decode("utf-8", "ignore")


def resolve_alias(client: Any, alias: str) -> str | None:
    """The collection ``alias`` points at, or None (asked without an error for a missing alias, which
    pymilvus would log)."""
    if alias not in (client.list_aliases() or {}).get("aliases", []):
        return None
    return client.describe_alias(alias).get("collection_name") or None


def point_alias(client: Any, alias: str, collection: str) -> str | None:
    """Point ``alias`` at ``collection`` in one call (searches see the old or the new, never a mix);
    returns the collection it pointed at before."""
    previous = resolve_alias(client, alias)
    if previous is None:
        client.create_alias(collection, alias)
    elif previous != collection:
        client.alter_alias(collection, alias)
    return previous


def row_count(client: Any, collection: str) -> int:
    stats = client.get_collection_stats(collection)
    return int(stats.get("row_count", 0))


# ------------------------------------------------------------------------------------------ search


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    doc_id: str = ""
    title: str = ""
    text: str = ""
    source: str = ""


@dataclass(frozen=True)
class DenseStats:
    """Mean and covariance of the indexed vectors: a query's dense-score mean and spread over the WHOLE
    corpus (q·μ, sqrt(qᵀΣq)), exactly, without scoring every chunk."""

    mean: np.ndarray
    cov: np.ndarray
    count: int

    def of(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mu = queries @ self.mean
        var = np.einsum("qd,de,qe->q", queries, self.cov, queries)
        return mu, np.sqrt(np.clip(var, 0.0, None))

    def save(self, path: Path) -> None:
        from embedtune.artifacts import atomic_open

        with atomic_open(path, "wb") as fh:
            np.savez(fh, mean=self.mean, cov=self.cov, count=np.array(self.count))

    @classmethod
    def load(cls, path: Path) -> DenseStats:
        with np.load(path) as data:
            return cls(data["mean"], data["cov"], int(data["count"]))


class StatsAccumulator:
    """Streams the mean and covariance of vectors in float64 (one pass, bounded memory)."""

    def __init__(self, dim: int):
        self.n, self.total, self.outer = 0, np.zeros(dim), np.zeros((dim, dim))

    def add(self, vectors: np.ndarray) -> None:
        v = vectors.astype(np.float64)
        self.n += len(v)
        self.total += v.sum(0)
        self.outer += v.T @ v

    def result(self) -> DenseStats:
        mean = self.total / max(self.n, 1)
        cov = self.outer / max(self.n, 1) - np.outer(mean, mean)
        return DenseStats(mean.astype(np.float32), cov.astype(np.float32), self.n)


def zscore_fuse(dense: dict[str, float], lexical: dict[str, float], bm25_weight: float,
                dense_mu: float, dense_sigma: float, n_docs: int) -> dict[str, float]:
    """The eval stage's fusion (:func:`embedtune.retrieval.fusion.fuse`) over candidate lists.

    ``dense`` must hold every candidate's dense score; a candidate missing from ``lexical`` scores 0 (it
    was not among the BM25 hits). BM25's mean and spread over the whole corpus come from its hits plus
    zeros for the other ``n_docs`` chunks: exact when the hit list holds every chunk sharing a term with
    the query, a slight underestimate of the spread otherwise.
    """
    if not lexical or bm25_weight <= 0:
        return dict(dense)
    scores = np.fromiter(lexical.values(), dtype=np.float64)
    n = max(n_docs, len(scores))
    mu = scores.sum() / n
    sigma = math.sqrt(max((scores**2).sum() / n - mu * mu, 0.0))
    if sigma == 0:
        return dict(dense)
    return {cid: blend(d, (lexical.get(cid, 0.0) - mu) / sigma, bm25_weight, dense_mu, dense_sigma)
            for cid, d in dense.items()}


class SearchSettings(BaseModel):
    """How hybrid search fuses, stored with the index (:class:`~embedtune.retrieval.deployment.IndexInfo`
    extends it) so every reader fuses the same way."""

    bm25_weight: float = DEFAULT_BM25_WEIGHT
    fusion: Fusion = "zscore"
    candidates: int = DEFAULT_CANDIDATES
    lexical_candidates: int = DEFAULT_LEXICAL_CANDIDATES
    rrf_k: int = 60


class MilvusSearcher:
    """Dense, BM25 or hybrid top-k over one collection (or alias), queries embedded by ``embed``."""

    def __init__(self, client: Any, collection: str, embed: Callable[[Sequence[str]], np.ndarray],
                 dimension: int, settings: SearchSettings, stats: DenseStats | None = None):
        self.client, self.collection, self.embed = client, collection, embed
        self.dimension, self.settings, self.stats = dimension, settings, stats

    # -------------------------------------------------------------- public

    def search(self, queries: Sequence[str], mode: Mode = "hybrid", top_k: int = 10,
               dimensions: int | None = None, with_text: bool = True,
               query_vectors: np.ndarray | None = None) -> list[list[Hit]]:
        """Top-k chunks per query; ``query_vectors`` skips embedding (already embedded by ``embed``)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not queries:
            return []
        fields = OUTPUT_FIELDS if with_text else ["doc_id"]
        if mode == "bm25":
            return [_hits(row, lexical=True) for row in self._lexical(queries, top_k, fields)]
        vectors = self._query_vectors(queries, dimensions, query_vectors)
        if mode == "dense":
            return [_hits(row) for row in self._dense(vectors, top_k, fields)]
        if self.settings.fusion == "zscore":
            return self._hybrid_zscore(queries, vectors, top_k, fields)
        return self._hybrid_milvus(queries, vectors, top_k, fields)

    # -------------------------------------------------------------- pieces

    def _query_vectors(self, queries: Sequence[str], dimensions: int | None,
                       given: np.ndarray | None = None) -> np.ndarray:
        vectors = np.asarray(self.embed(list(queries)) if given is None else given, dtype=np.float32)
        dim = min(d for d in (dimensions, self.dimension, vectors.shape[1]) if d)
        if dim != self.dimension:
            raise ValueError(f"this index holds {self.dimension}-dimensional vectors; dimensions={dimensions} "
                             "would need a reindex at that size (index.dimensions)")
        cut = vectors[:, :dim]
        return cut / np.clip(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12, None)

    def _dense(self, vectors: np.ndarray, limit: int, fields: list[str]) -> list[list[dict]]:
        return self.client.search(self.collection, data=vectors.tolist(), anns_field="dense", limit=limit,
                                  output_fields=fields, search_params={"metric_type": "IP"})

    def _lexical(self, queries: Sequence[str], limit: int, fields: list[str]) -> list[list[dict]]:
        return self.client.search(self.collection, data=list(queries), anns_field="sparse", limit=limit,
                                  output_fields=fields, search_params={"metric_type": "BM25"})

    def _hybrid_zscore(self, queries: Sequence[str], vectors: np.ndarray, top_k: int,
                       fields: list[str]) -> list[list[Hit]]:
        s = self.settings
        # Candidates travel as ids and scores only; the text of the final top-k is fetched once at the end.
        dense_rows = self._dense(vectors, max(s.candidates, top_k), ["doc_id"])
        lexical_rows = self._lexical(queries, max(s.lexical_candidates, top_k), ["doc_id"])
        entities: dict[str, dict] = {}
        dense_scores, lexical_scores = [], []
        for d_row, l_row in zip(dense_rows, lexical_rows, strict=True):
            dense_scores.append({h["id"]: float(h["distance"]) for h in d_row})
            lexical_scores.append({h["id"]: _bm25_score(h) for h in l_row})
            for h in (*d_row, *l_row):
                entities[h["id"]] = h.get("entity") or {}
        self._fill_dense(vectors, dense_scores, lexical_scores, s.candidates)
        if self.stats is not None:
            mu, sigma = self.stats.of(vectors)
            n_docs = self.stats.count
        else:  # no corpus statistics (an index built elsewhere): the dense hit list stands in
            mu = np.array([np.mean(list(d.values())) for d in dense_scores])
            sigma = np.array([np.std(list(d.values())) for d in dense_scores])
            n_docs = 0
        results = []
        for i, (dense, lexical) in enumerate(zip(dense_scores, lexical_scores, strict=True)):
            fused = zscore_fuse(dense, lexical, s.bm25_weight, float(mu[i]), float(sigma[i]), n_docs)
            best = sorted(fused.items(), key=lambda kv: -kv[1])[:top_k]
            results.append([(cid, float(score)) for cid, score in best])
        if fields != ["doc_id"]:
            entities = self._entities(sorted({cid for row in results for cid, _ in row}), fields)
        return [[Hit(cid, score, **_entity_fields(entities.get(cid, {}))) for cid, score in row]
                for row in results]

    def _fill_dense(self, vectors: np.ndarray, dense_scores: list[dict[str, float]],
                    lexical_scores: list[dict[str, float]], candidates: int) -> None:
        """Give the strongest BM25 hits that the dense list missed their exact dense score."""
        missing = [[cid for cid, _ in sorted(lexical.items(), key=lambda kv: -kv[1])[:candidates] if cid not in dense]
                   for dense, lexical in zip(dense_scores, lexical_scores, strict=True)]
        wanted = sorted({cid for row in missing for cid in row})
        if not wanted:
            return
        vec = {r["id"]: np.asarray(r["dense"], dtype=np.float32) for r in self._get(wanted, ["dense"])}
        for i, (dense, row) in enumerate(zip(dense_scores, missing, strict=True)):
            dense.update((cid, float(vectors[i] @ vec[cid])) for cid in row if cid in vec)

    def _hybrid_milvus(self, queries: Sequence[str], vectors: np.ndarray, top_k: int,
                       fields: list[str]) -> list[list[Hit]]:
        from pymilvus import AnnSearchRequest, RRFRanker, WeightedRanker

        s = self.settings
        limit = max(s.candidates, top_k)
        requests = [AnnSearchRequest(data=vectors.tolist(), anns_field="dense", param={"metric_type": "IP"},
                                     limit=limit),
                    AnnSearchRequest(data=list(queries), anns_field="sparse", param={"metric_type": "BM25"},
                                     limit=limit)]
        ranker = RRFRanker(s.rrf_k) if s.fusion == "rrf" else WeightedRanker(1 - s.bm25_weight, s.bm25_weight)
        rows = self.client.hybrid_search(self.collection, requests, ranker=ranker, limit=top_k,
                                         output_fields=fields)
        return [_hits(row) for row in rows]

    def all_chunks(self, fields: Sequence[str] = ("doc_id", "text", "dense"), batch: int = 1000) -> list[dict]:
        """Every row of the collection (for checking the store against an in-process computation)."""
        iterator = self.client.query_iterator(self.collection, batch_size=batch, filter="",
                                              output_fields=list(fields))
        rows: list[dict] = []
        try:
            while page := iterator.next():
                rows += page
        finally:
            iterator.close()
        return rows

    def _get(self, ids: list[str], fields: list[str]) -> list[dict]:
        out: list[dict] = []
        for start in range(0, len(ids), 1000):
            out += self.client.get(self.collection, ids=ids[start:start + 1000], output_fields=fields)
        return out

    def _entities(self, ids: list[str], fields: list[str]) -> dict[str, dict]:
        return {r["id"]: r for r in self._get(ids, fields)}



def _hits(row: list[dict], lexical: bool = False) -> list[Hit]:
    return [Hit(h["id"], _bm25_score(h) if lexical else float(h["distance"]), **_entity_fields(h.get("entity") or {}))
            for h in row]


def _bm25_score(hit: dict) -> float:
    # Milvus Lite returns BM25 hits as negative distances (best first); a Milvus server as positive scores.
    return abs(float(hit["distance"]))


def _entity_fields(entity: dict) -> dict[str, str]:
    return {k: str(entity.get(k, "")) for k in OUTPUT_FIELDS}
