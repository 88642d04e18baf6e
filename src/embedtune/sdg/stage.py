"""sdg stage: synthetic queries for the corpus chunks (``sdg/queries.jsonl``).

``run_sdg`` samples chunks, asks the configured generator for candidate queries, then applies the filters
every generator shares, cheapest first, counting each rejection by reason in the manifest:

1. not a query (empty, punctuation, code, prompt echo), too short / too long, copied from the passage
   (n-gram overlap; character n-grams for scripts without spaces), exact duplicates;
2. near duplicates: cosine >= ``sdg.dedup_threshold`` between base-model query embeddings;
3. round-trip consistency (Promptagator): the base model must rank one of the query's positives within
   ``filters.roundtrip_top_k`` of all chunks, and at or below ``filters.roundtrip_min_rank`` (set it to 2
   to drop queries the base model already answers at rank 1, which teach it little). With
   ``filters.roundtrip_by: hybrid`` the base model's scores are fused with BM25 first (prep's teacher), so
   a query the base model misses but whose passage BM25 confirms is kept (counted in
   ``metrics.roundtrip_rescued_by_bm25``);
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
from pathlib import Path

import numpy as np

from embedtune.artifacts import Manifest, RunDir, write_json, write_jsonl
from embedtune.config import Recipe
from embedtune.console import log
from embedtune.schemas import Chunk, GeneratorInfo, SyntheticQuery
from embedtune.sdg.base import Candidate, Generator
from embedtune.sdg.cache import ResponseCache
from embedtune.sdg.examples import file_digest, load_examples
from embedtune.sdg.filters import QueryFilter
from embedtune.sdg.registry import get_generator

QUERIES = "queries.jsonl"
REJECTED = "rejected.jsonl"
EXAMPLES = "examples.json"


def run_sdg(recipe: Recipe, run: RunDir, *, force: bool = False) -> Manifest:
    from embedtune.schemas import load_chunks

    chunks_path = run.require("corpus", "chunks.jsonl")
    config = {"sdg": recipe.sdg.model_dump(mode="json"), "model": recipe.model.model_dump(mode="json")}
    examples_file = Path(recipe.sdg.examples).expanduser() if recipe.sdg.examples else None
    if examples_file is not None and not examples_file.is_file():
        raise FileNotFoundError(f"sdg.examples {recipe.sdg.examples!r} is not a file")
    stage = run.stage("sdg", config, inputs=[chunks_path] + ([examples_file] if examples_file else []))
    if (done := stage.up_to_date(force)) is not None:
        return done
    t0 = time.perf_counter()
    chunks = load_chunks(run)
    sample = sample_chunks(chunks, recipe.sdg.max_chunks, recipe.sdg.seed)
    cache = ResponseCache(stage.dir / "cache" / "responses.sqlite")
    counts: Counter[str] = Counter()
    try:
        generator = get_generator(recipe.sdg.generator)(recipe, cache, stage.dir)
        if examples_file is not None:
            generator.examples = load_examples(examples_file, chunks)
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
    examples_out = write_json(stage.dir / EXAMPLES, examples_record(generator, examples_file))
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
        "examples_given": len(generator.examples), "examples_used": len(generator.examples_used),
    }
    metrics = {"queries_per_second": round(len(rows) / seconds, 4),
               "chunks_per_second": round(len(sample) / seconds, 4),
               "queries_per_chunk": round(len(rows) / max(1, len(sample)), 4), "seconds": round(seconds, 2),
               "seconds_generate": round(t_filter - t_gen, 2), "seconds_filter": round(t_done - t_filter, 2)}
    if result.backend:
        metrics["filter_backend"] = result.backend
    if generator.precision:
        metrics["generator_precision"] = generator.precision
    if rows and result.ranks:
        metrics["roundtrip_rank_median"] = float(np.median(result.ranks))
    if result.rescued_by_bm25 is not None:
        metrics["roundtrip_rescued_by_bm25"] = result.rescued_by_bm25
    log.info("sdg: kept %d of %d candidates from %d chunks", len(rows), len(candidates), len(sample))
    return stage.finish(outputs=[out, examples_out], counts=manifest_counts, metrics=metrics)


def examples_record(generator: Generator, examples_file: Path | None) -> dict:
    """``sdg/examples.json``: which example queries steered the generator (the file, its digest, the
    ones its prompt budget fitted), so a run says what its queries imitate."""
    return {"file": str(examples_file) if examples_file else None,
            "sha256": file_digest(examples_file) if examples_file else None,
            "given": len(generator.examples),
            "used": [e.to_json() for e in generator.examples_used]}


def sample_chunks(chunks: list[Chunk], limit: int | None, seed: int) -> list[Chunk]:
    """At most ``limit`` chunks drawn at random (reproducibly), kept in corpus order."""
    if limit is None or limit >= len(chunks):
        return list(chunks)
    picked = sorted(random.Random(seed).sample(range(len(chunks)), limit))
    return [chunks[i] for i in picked]


def to_row(c: Candidate, info: GeneratorInfo) -> SyntheticQuery:
    digest = hashlib.sha256(f"{c.source}\x00{c.text}".encode()).hexdigest()[:16]
    return SyntheticQuery(_id=f"q_{digest}", generator=info, **c.model_dump(exclude={"source"}))


