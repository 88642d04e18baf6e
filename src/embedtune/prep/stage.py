"""The prep stage: split queries by document, mine hard negatives, write training and BEIR eval files.

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

from pathlib import Path

from embedtune.artifacts import Manifest, RunDir, write_json
from embedtune.config import Recipe
from embedtune.console import console, log
from embedtune.prep.formats import write_automodel, write_beir, write_inline
from embedtune.prep.mining import build_examples
from embedtune.prep.report import audit, plot, score_report, stats_table, write_markdown
from embedtune.prep.split import Split, load_queries, split_by_document
from embedtune.prep.teacher import score_label
from embedtune.retrieval.cache import run_embedding_cache
from embedtune.schemas import Chunk, TrainExample


def run_prep(recipe: Recipe, run: RunDir, *, force: bool = False) -> Manifest:
    cfg = recipe.prep
    chunks_path = run.require("corpus", "chunks.jsonl")
    queries_path = run.require("sdg", "queries.jsonl")
    config = {"prep": cfg.model_dump(mode="json"), "model": recipe.model.model_dump(mode="json")}
    stage = run.stage("prep", config, inputs=[chunks_path, queries_path])
    if (done := stage.up_to_date(force)) is not None:
        return done

    from embedtune.schemas import load_chunks

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
    label = score_label(cfg.teacher, cfg.bm25_weight, recipe.corpus.language)
    outputs, metrics = write_outputs(stage.dir, examples, split, chunks, counts, cfg.seed, label)
    console.print(stats_table(metrics["scores"], title=f"prep: {label}"))
    return stage.finish(outputs=outputs, counts=counts, metrics=metrics)


def write_outputs(out: Path, examples: list[TrainExample], split: Split, chunks: list[Chunk],
                  counts: dict, seed: int, label: str = "base-model cosine") -> tuple[list[Path], dict]:
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
    if (png := plot(examples, out / "scores.png", label)) is not None:
        outputs.append(png)
    return outputs, metrics


def load_training(run: RunDir) -> list[TrainExample]:
    """The inline training rows of a finished prep stage (for the finetune stage)."""
    from embedtune.schemas import read_rows

    return list(read_rows(run.require("prep", "train.jsonl"), TrainExample))


def print_audit(run: RunDir, n: int, seed: int = 0) -> None:
    audit(load_training(run), n, seed)
