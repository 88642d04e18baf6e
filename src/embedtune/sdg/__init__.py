"""sdg stage: synthetic queries for the corpus chunks (``sdg/queries.jsonl``).

``run_sdg`` samples chunks, asks the configured generator for candidate queries, then applies the filters
every generator shares, cheapest first, counting each rejection by reason in the manifest:

1. not a query (empty, punctuation, code, prompt echo), too short / too long, copied from the passage
   (n-gram overlap; character n-grams for scripts without spaces), exact duplicates;
2. near duplicates: cosine >= ``sdg.dedup_threshold`` between base-model query embeddings;
3. round-trip consistency (Promptagator): the base model must rank one of the query's positives within
   ``filters.roundtrip_top_k`` of all chunks, and at or below ``filters.roundtrip_min_rank`` (set it to 2
   to drop queries the base model already answers at rank 1, which teach it little);
4. at most ``queries_per_chunk`` per chunk for over-sampling generators (``local``);
5. the generator's judge, if it has one (``llm``): keep ``overall >= sdg.judge_threshold``.

Raw model responses are cached in ``sdg/cache/responses.sqlite``, so reruns and resumed runs do not
generate again (delete that file to draw new samples).
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedtune.artifacts import Manifest, RunDir, write_jsonl
from embedtune.config import Recipe
from embedtune.console import log
from embedtune.schemas import Chunk, GeneratorInfo, SyntheticQuery
from embedtune.sdg import filters
from embedtune.sdg.base import (
    Candidate,
    Generator,
    SdgError,
    generator_names,
    get_generator,
    register_generator,
)
from embedtune.sdg.cache import ResponseCache

__all__ = ["Candidate", "Generator", "SdgError", "generator_names", "register_generator", "run_sdg"]

QUERIES = "queries.jsonl"
REJECTED = "rejected.jsonl"


def run_sdg(recipe: Recipe, run: RunDir, *, force: bool = False) -> Manifest:
    from embedtune.schemas import load_chunks

    chunks_path = run.require("corpus", "chunks.jsonl")
    config = {"sdg": recipe.sdg.model_dump(mode="json"), "model": recipe.model.model_dump(mode="json")}
    stage = run.stage("sdg", config, inputs=[chunks_path])
    if (done := stage.up_to_date(force)) is not None:
        return done
    t0 = time.perf_counter()
    chunks = load_chunks(run)
    sample = sample_chunks(chunks, recipe.sdg.max_chunks, recipe.sdg.seed)
    cache = ResponseCache(stage.dir / "cache" / "responses.sqlite")
    counts: Counter[str] = Counter()
    try:
        generator = get_generator(recipe.sdg.generator)(recipe, cache, stage.dir)
        try:
            t_gen = time.perf_counter()
            candidates = generator.generate(sample, counts)
            t_filter = time.perf_counter()
            result = QueryFilter(recipe, generator, chunks, counts, run.root / "cache" / "embeddings").apply(candidates)
            t_done = time.perf_counter()
        finally:
            generator.close()
    finally:
        cache.close()
    # Rejections a generator counted itself (e.g. unparseable answers) join the filters' reasons.
    for key in [k for k in counts if k.startswith("rejected_")]:
        result.reasons[key.removeprefix("rejected_")] += counts.pop(key)
    info = GeneratorInfo(kind=recipe.sdg.generator, model=generator.model_name)
    rows = [to_row(c, info) for c in result.kept]
    out = stage.dir / QUERIES
    write_jsonl(out, rows)
    write_jsonl(stage.dir / REJECTED, ({"text": c.text, "source": c.source, "reason": r}
                                       for c, r in result.rejected))
    seconds = time.perf_counter() - t0
    sources = {c.source for c in result.kept}
    manifest_counts = {
        "chunks": len(chunks), "chunks_processed": len(sample), "generated": len(candidates),
        "kept": len(rows), "rejected_total": sum(result.reasons.values()),
        "chunks_without_queries": len(sample) - len({c.id for c in sample} & sources),
        "cache_hits": cache.hits, "rejected": dict(sorted(result.reasons.items())),
        "generator": dict(sorted(counts.items())),
    }
    metrics = {"queries_per_second": round(len(rows) / seconds, 4),
               "chunks_per_second": round(len(sample) / seconds, 4),
               "queries_per_chunk": round(len(rows) / max(1, len(sample)), 4), "seconds": round(seconds, 2),
               "seconds_generate": round(t_filter - t_gen, 2), "seconds_filter": round(t_done - t_filter, 2)}
    if rows and result.ranks:
        metrics["roundtrip_rank_median"] = float(np.median(result.ranks))
    log.info("sdg: kept %d of %d candidates from %d chunks", len(rows), len(candidates), len(sample))
    return stage.finish(outputs=[out], counts=manifest_counts, metrics=metrics)


def sample_chunks(chunks: list[Chunk], limit: int | None, seed: int) -> list[Chunk]:
    """At most ``limit`` chunks drawn at random (reproducibly), kept in corpus order."""
    if limit is None or limit >= len(chunks):
        return list(chunks)
    picked = sorted(random.Random(seed).sample(range(len(chunks)), limit))
    return [chunks[i] for i in picked]


def to_row(c: Candidate, info: GeneratorInfo) -> SyntheticQuery:
    digest = hashlib.sha256(f"{c.source}\x00{c.text}".encode()).hexdigest()[:16]
    return SyntheticQuery(_id=f"q_{digest}", text=c.text, answer=c.answer, positive_ids=c.positive_ids,
                          doc_id=c.doc_id, query_type=c.query_type, reasoning_type=c.reasoning_type,
                          complexity=c.complexity, hops=c.hops, scores=c.scores, generator=info,
                          roundtrip_rank=c.roundtrip_rank)


@dataclass
class FilterResult:
    kept: list[Candidate]
    rejected: list[tuple[Candidate, str]]
    reasons: Counter[str]
    ranks: list[int]


class QueryFilter:
    """The shared filter chain (see the module docstring for the order and the reasons)."""

    def __init__(self, recipe: Recipe, generator: Generator, chunks: Sequence[Chunk], counts: Counter[str],
                 cache_dir: Path | None = None):
        self.recipe, self.generator, self.counts, self.cache_dir = recipe, generator, counts, cache_dir
        self.cfg = recipe.sdg.filters
        self.chunks = list(chunks)
        self.by_id = {c.id: c for c in chunks}
        self.rejected: list[tuple[Candidate, str]] = []
        self.reasons: Counter[str] = Counter()
        self._model = None
        self._query_emb: np.ndarray | None = None

    def apply(self, candidates: list[Candidate]) -> FilterResult:
        kept = self._cheap(candidates)
        kept = self._near_duplicates(kept)
        ranks: list[int] = []
        if self._roundtrip_on():
            kept = self._roundtrip(kept)
            ranks = [c.roundtrip_rank for c in kept if c.roundtrip_rank is not None]
        if self.generator.oversamples:
            kept = self._quota(kept)
        kept = self._judge(kept)
        return FilterResult(kept, self.rejected, self.reasons, ranks)

    def _reject(self, cand: Candidate, reason: str) -> None:
        self.rejected.append((cand, reason))
        self.reasons[reason] += 1

    def _cheap(self, candidates: list[Candidate]) -> list[Candidate]:
        exact = filters.ExactDeduper()
        kept = []
        for cand in candidates:
            unknown = [i for i in cand.positive_ids if i not in self.by_id]
            passages = [self.by_id[i].text for i in cand.positive_ids if i in self.by_id]
            reason = (
                ("unknown_positive" if unknown or not passages else None)
                or filters.check_is_query(cand.text)
                or filters.check_length(cand.text, self.cfg.min_words, self.cfg.max_words)
                or filters.check_copied(cand.text, passages, self.cfg.max_ngram_overlap)
                or exact.check(cand.text)
            )
            if reason:
                self._reject(cand, reason)
            else:
                kept.append(cand)
        return kept

    def _embedder(self):
        if self._model is None:
            from embedtune.models import load_model

            self._model = load_model(self.recipe.model)
        return self._model

    def _near_duplicates(self, cands: list[Candidate]) -> list[Candidate]:
        if len(cands) < 2:
            return cands
        from embedtune.models import encode_queries

        self._query_emb = encode_queries(self._embedder(), [c.text for c in cands])
        mask = filters.near_duplicates(self._query_emb, self.recipe.sdg.dedup_threshold)
        for cand, keep in zip(cands, mask, strict=True):
            if not keep:
                self._reject(cand, "near_duplicate")
        self._query_emb = self._query_emb[mask]
        return [c for c, keep in zip(cands, mask, strict=True) if keep]

    def _roundtrip_on(self) -> bool:
        return self.cfg.roundtrip if self.cfg.roundtrip is not None else self.generator.kind == "local"

    def _roundtrip(self, cands: list[Candidate]) -> list[Candidate]:
        if not cands:
            return cands
        from embedtune.models import encode_queries

        model = self._embedder()
        q = self._query_emb
        if q is None or len(q) != len(cands):
            q = encode_queries(model, [c.text for c in cands])
        p = self._passage_embeddings(model)
        row = {c.id: i for i, c in enumerate(self.chunks)}
        ranks = filters.roundtrip_ranks(q, p, [[row[i] for i in c.positive_ids] for c in cands])
        kept = []
        for cand, rank in zip(cands, ranks, strict=True):
            cand.roundtrip_rank = int(rank)
            reason = filters.check_roundtrip(int(rank), self.cfg.roundtrip_top_k, self.cfg.roundtrip_min_rank)
            if reason:
                self._reject(cand, reason)
            else:
                kept.append(cand)
        return kept

    def _passage_embeddings(self, model) -> np.ndarray:
        """All chunks' base-model embeddings, from the run's embedding cache (prep's mining reuses them)."""
        from embedtune.models import resolve
        from embedtune.retrieval.cache import EmbeddingCache, encode_passages_cached

        cache = EmbeddingCache(self.cache_dir) if self.cache_dir else None
        return encode_passages_cached(model, resolve(self.recipe.model).path, [c.text for c in self.chunks],
                                      cache, what="base model, chunks")

    def _quota(self, cands: list[Candidate]) -> list[Candidate]:
        """At most ``queries_per_chunk`` per source chunk, preferring question-shaped queries, then those
        whose positive the base model ranks higher (more likely answerable)."""
        per_source: Counter[str] = Counter()
        kept = []
        ordered = sorted(cands, key=lambda c: (not filters.looks_like_question(c.text),
                                               c.roundtrip_rank or 0))
        for cand in ordered:
            per_source[cand.source] += 1
            if per_source[cand.source] > self.recipe.sdg.queries_per_chunk:
                self._reject(cand, "over_quota")
            else:
                kept.append(cand)
        return kept

    def _judge(self, cands: list[Candidate]) -> list[Candidate]:
        if not cands:
            return cands
        scores = self.generator.judge(cands, self.by_id, self.counts)
        if scores is None:
            return cands
        kept = []
        for cand, score in zip(cands, scores, strict=True):
            if score is None:
                self._reject(cand, "judge_unparseable")
                continue
            cand.scores = score
            if (score.overall or 0.0) < self.recipe.sdg.judge_threshold:
                self._reject(cand, "judge_low_score")
            else:
                kept.append(cand)
        return kept
