"""Prep stage: split queries by document, mine hard negatives, write training and BEIR eval files.

Reads ``corpus/chunks.jsonl`` and ``sdg/queries.jsonl``; writes under ``prep/``:
``train.jsonl`` (inline), ``train.automodel.json`` + ``corpus/`` (NeMo AutoModel corpus-ID format),
``eval/{corpus.jsonl,queries.jsonl,qrels/test.tsv}`` (BEIR), ``split.json`` (which documents and queries
were held out), ``report.md`` and ``scores.png``.

Negatives per training query: up to ``hard_negatives_to_mine`` mined ones, best first (the trainer takes
the first ``passages_per_query - 1``). A query left with fewer than ``negatives_used`` is topped up with
random allowed chunks (``fill_missing: random``, their real scores recorded) or dropped (``drop``).
Candidates for negatives are the training documents' chunks (all chunks with
``test_chunks_as_negatives``), never a positive, never a chunk whose text equals a positive's, and with
``exclude_same_document`` (default) never a chunk of a positive's own document.
"""

from __future__ import annotations

import contextlib
import random
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from embedtune.artifacts import ArtifactError, Manifest, RunDir, write_json
from embedtune.config import PrepConfig, Recipe
from embedtune.console import console, log, track
from embedtune.prep.formats import (
    TrainingRecord,
    read_training,
    write_automodel,
    write_beir,
    write_inline,
)
from embedtune.prep.mining import Mined, Rescore, mine_from_scores, mine_negatives, random_fill
from embedtune.prep.report import audit, plot, score_report, stats_table, write_markdown
from embedtune.prep.split import Split, load_queries, split_by_document
from embedtune.prep.teacher import make_teacher
from embedtune.retrieval.cache import EmbeddingCache, encode_passages_cached, run_embedding_cache
from embedtune.schemas import Chunk, SyntheticQuery, TrainExample

__all__ = ["Mined", "TrainingRecord", "audit", "load_training", "mine_from_scores",
           "mine_negatives", "read_training", "run_prep", "split_by_document"]


def run_prep(recipe: Recipe, run: RunDir, *, force: bool = False) -> Manifest:
    cfg = recipe.prep
    chunks_path = run.require("corpus", "chunks.jsonl")
    queries_path = run.require("sdg", "queries.jsonl")
    config = {"prep": cfg.model_dump(mode="json"), "model": recipe.model.model_dump(mode="json")}
    stage = run.stage("prep", config, inputs=[chunks_path, queries_path])
    if (done := stage.up_to_date(force)) is not None:
        return done

    from embedtune.corpus import load_chunks

    chunks = load_chunks(run)
    queries = load_queries(queries_path, {c.id for c in chunks})
    split = split_by_document(queries, chunks, test_ratio=cfg.test_ratio, seed=cfg.seed,
                              max_pos_docs=cfg.max_pos_docs)
    if not split.train:
        raise ValueError(f"no training queries left after the document split ({split.counts}); "
                         "lower prep.test_ratio or generate queries for more documents")
    if not split.test and cfg.test_ratio > 0:
        log.warning("no held-out queries: prep/eval has an empty query set (too few query-bearing documents)")
    examples, counts = build_examples(recipe, split, chunks, run_embedding_cache(run.root))
    if not examples:
        raise ValueError(f"all {len(split.train)} training queries were dropped for lack of negatives "
                         f"({counts}); set prep.fill_missing=random, or lower prep.negatives_used "
                         "or the margin")
    counts = {**split.counts, **counts, "train_examples": len(examples)}
    outputs, metrics = write_outputs(stage.dir, examples, split, chunks, counts, cfg.seed)
    console.print(stats_table(metrics["scores"]))
    return stage.finish(outputs=outputs, counts=counts, metrics=metrics)


def write_outputs(out: Path, examples: list[TrainExample], split: Split, chunks: list[Chunk],
                  counts: dict, seed: int) -> tuple[list[Path], dict]:
    """Training files (both formats), the split, BEIR eval files, the report; returns paths and metrics."""
    outputs = [out / "train.jsonl", out / "split.json"]
    write_inline(outputs[0], examples)
    write_json(outputs[1], {"seed": seed, "train_documents": sorted(split.train_docs),
                            "test_documents": sorted(split.test_docs),
                            "test_queries": [q.id for q in split.test]})
    outputs += write_automodel(out, examples)
    outputs += write_beir(out / "eval", chunks, split.test)
    metrics = {"scores": score_report(examples)}
    outputs.append(write_markdown(out / "report.md", metrics["scores"], counts))
    if (png := plot(examples, out / "scores.png")) is not None:
        outputs.append(png)
    return outputs, metrics


def load_training(run: RunDir) -> list[TrainExample]:
    """The inline training rows of a finished prep stage (for the finetune stage)."""
    from embedtune.schemas import read_rows

    return list(read_rows(run.require("prep", "train.jsonl"), TrainExample))


def print_audit(run: RunDir, n: int, seed: int = 0) -> None:
    audit(load_training(run), n, seed)


# ------------------------------------------------------------------------------------------ mining


def build_examples(recipe: Recipe, split: Split, chunks: list[Chunk],
                   cache: EmbeddingCache | None = None) -> tuple[list[TrainExample], dict]:
    """Embed the training queries and candidate chunks with the base model, mine, fill, assemble.

    All chunks are embedded through ``cache`` (the run's: sdg's round-trip filter already embedded the
    same chunks with the same model), and the candidate pool takes its rows from them.
    """
    cfg = recipe.prep
    pool = [c for c in chunks if cfg.test_chunks_as_negatives or c.doc_id in split.train_docs]
    positives, excluded = candidate_masks(split.train, pool, cfg.exclude_same_document)

    from embedtune.models import encode_queries, load_model, resolve

    model = load_model(recipe.model)
    q_emb = _encode(encode_queries, model, [q.text for q in split.train], cfg.mining_batch_size,
                    cfg.query_max_length, "encoding queries")
    with _max_length(model, cfg.passage_max_length):
        all_emb = encode_passages_cached(model, resolve(recipe.model).path, [c.text for c in chunks], cache,
                                         what="base model, chunks")
    row = {c.id: i for i, c in enumerate(chunks)}
    p_emb = all_emb[[row[c.id] for c in pool]]
    teacher = make_teacher(cfg.teacher, [q.text for q in split.train], [c.text for c in pool], cfg.bm25_weight,
                           recipe.corpus.language)
    mined = mine_negatives(q_emb, p_emb, positives, excluded, k=cfg.hard_negatives_to_mine,
                           margin=cfg.margin, margin_type=cfg.margin_type, block=cfg.mining_query_block,
                           rescore=teacher)
    counts = {"candidates": len(pool), "mined_negatives": sum(map(len, mined.neg_idx)),
              "short_of_negatives": sum(len(n) < cfg.negatives_used for n in mined.neg_idx)}
    counts.update(fill_missing(mined, positives, excluded, q_emb, p_emb, cfg, teacher))
    if counts["short_of_negatives"]:
        log.info("%d of %d training queries had fewer than %d negatives under the margin rule (%s)",
                 counts["short_of_negatives"], len(split.train), cfg.negatives_used, cfg.fill_missing)
    examples = [_example(q, pool, positives[i], mined, i) for i, q in enumerate(split.train)
                if mined.neg_idx[i] is not None]
    return examples, counts


def candidate_masks(queries: Sequence[SyntheticQuery], pool: Sequence[Chunk],
                    exclude_same_document: bool) -> tuple[list[list[int]], list[list[int]]]:
    """Per query: pool indices of its positives, and of the other chunks it must never get as negatives.

    A chunk whose text equals a positive's is excluded always (a duplicate passage is the same answer);
    with ``exclude_same_document`` so is every chunk of a positive's document.
    """
    index = {c.id: i for i, c in enumerate(pool)}
    by_doc: dict[str, list[int]] = defaultdict(list)
    by_text: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(pool):
        by_doc[c.doc_id].append(i)
        by_text[c.text].append(i)
    positives, excluded = [], []
    for q in queries:
        try:
            pos = [index[pid] for pid in q.positive_ids]
        except KeyError as exc:  # a training positive outside the pool means the split is broken
            raise ArtifactError(f"query {q.id!r}: positive {exc} is not a training candidate") from None
        banned = {j for i in pos for j in by_text[pool[i].text]}
        if exclude_same_document:
            banned |= {j for i in pos for j in by_doc[pool[i].doc_id]}
        positives.append(pos)
        excluded.append(sorted(banned - set(pos)))
    return positives, excluded


def fill_missing(mined: Mined, positives: list[list[int]], excluded: list[list[int]], q_emb: np.ndarray,
                 p_emb: np.ndarray, cfg: PrepConfig, rescore: Rescore | None = None) -> dict[str, int]:
    """Top up or drop queries with fewer than ``negatives_used`` negatives (a dropped row becomes None).

    A random negative's recorded score is the judge's (``rescore``), like the mined ones'.
    """
    rng = random.Random(cfg.seed)
    counts = {"random_negatives": 0, "dropped_short": 0, "still_short": 0}
    for i, negs in enumerate(mined.neg_idx):
        need = cfg.negatives_used - len(negs)
        if need <= 0:
            continue
        if cfg.fill_missing == "drop":
            mined.neg_idx[i] = None  # type: ignore[call-overload]
            counts["dropped_short"] += 1
            continue
        extra = random_fill(negs, set(positives[i]) | set(excluded[i]), len(p_emb), need, rng)
        negs.extend(extra)
        mined.neg_scores[i].extend(_scores(i, extra, q_emb, p_emb, rescore))
        counts["random_negatives"] += len(extra)
        counts["still_short"] += len(extra) < need
    return counts


def _scores(i: int, cols: list[int], q_emb: np.ndarray, p_emb: np.ndarray,
            rescore: Rescore | None) -> list[float]:
    """Query ``i``'s scores for candidates ``cols``: dense, or the judge's over the whole row."""
    if rescore is None:
        return [float(q_emb[i] @ p_emb[j]) for j in cols]
    import torch

    row = rescore(i, i + 1, torch.from_numpy(q_emb[i:i + 1] @ p_emb.T))[0]
    return [float(row[j]) for j in cols]


def _example(q: SyntheticQuery, pool: list[Chunk], pos_idx: list[int], mined: Mined, i: int) -> TrainExample:
    pos = [pool[j] for j in pos_idx]
    neg = [pool[j] for j in mined.neg_idx[i]]
    return TrainExample(query=q.text, pos_doc=[c.text for c in pos], neg_doc=[c.text for c in neg],
                        query_id=q.id, pos_ids=[c.id for c in pos], neg_ids=[c.id for c in neg],
                        pos_scores=_round(mined.pos_scores[i]), neg_scores=_round(mined.neg_scores[i]))


def _round(values: list[float]) -> list[float]:
    return [round(float(v), 6) for v in values]


@contextlib.contextmanager
def _max_length(model, max_length: int | None) -> Iterator[None]:
    """Cap the model's max_seq_length for one pass (the embedding cache keys on it)."""
    old = model.max_seq_length
    if max_length:
        model.max_seq_length = min(max_length, old or max_length)
    try:
        yield
    finally:
        model.max_seq_length = old


def _encode(fn: Callable[..., np.ndarray], model, texts: list[str], batch_size: int, max_length: int | None,
            description: str) -> np.ndarray:
    """Encode in slices under a progress bar; ``max_length`` caps the model's length for this pass only."""
    with _max_length(model, max_length):
        step = batch_size * 8
        parts = [fn(model, texts[s:s + step], batch_size=batch_size)
                 for s in track(range(0, len(texts), step), description, total=-(-len(texts) // step))]
    dim = model.get_embedding_dimension() or 0
    return np.concatenate(parts) if parts else np.zeros((0, dim), dtype=np.float32)
