"""The eval stage: base vs fine-tuned (vs BM25) on the run's held-out BEIR set or any BEIR folder."""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from embedtune.artifacts import Manifest, RunDir, read_jsonl, write_json
from embedtune.config import EvalConfig, Recipe
from embedtune.console import log
from embedtune.evaluate.bm25 import evaluate_bm25
from embedtune.evaluate.core import evaluate_encoder
from embedtune.evaluate.report import write_reports
from embedtune.retrieval.beir import BeirDataset, load_beir
from embedtune.retrieval.bm25 import BM25Index
from embedtune.retrieval.cache import EmbeddingCache, stage_cache
from embedtune.retrieval.encoders import Encoder, load_encoder
from embedtune.retrieval.metrics import HEADLINE, PER_QUERY, PerQuery, RankingSpec
from embedtune.retrieval.release import decide, paired_vs
from embedtune.schemas import query_key

# Swept when the fine-tuned model does not say which dimensions it was trained at (the full dimension
# is always included; dimensions above it are dropped).
DEFAULT_SWEEP = (256, 128, 64)


def run_eval(recipe: Recipe, run: RunDir, *, force: bool = False) -> Manifest:
    """Evaluate ``recipe.model`` (base) and, when the finetune stage completed, ``finetune/model``: on the
    run's synthetic held-out queries and, when ``eval.dataset`` is given, on the user's real ones, which
    then decide (``results.json`` is the deciding set's; the synthetic set nests under ``synthetic``)."""
    cfg = recipe.eval
    real_dirs = real_dataset_dirs(recipe)
    heldout = heldout_dir(recipe, run, required=real_dirs is None)
    ft_manifest = run.manifest("finetune")
    ft_dir = run.path("finetune", "model") if ft_manifest is not None else None
    if ft_dir is not None and not ft_dir.is_dir():
        log.warning("finetune completed but %s is missing: evaluating the base model only", ft_dir)
        ft_dir = None
    dims = sweep_dims(cfg, recipe, ft_manifest)
    examples = example_queries(recipe)
    inputs = [p for p in (heldout, *(real_dirs or ()), ft_dir, examples_path(recipe)) if p is not None]
    config = {"eval": cfg.model_dump(mode="json"), "model": recipe.model.model_dump(mode="json"), "dims": dims,
              "index_bm25_weight": recipe.index.bm25_weight, "examples": sorted(examples)}
    stage = run.stage("eval", config, inputs=inputs)
    if (done := stage.up_to_date(force)) is not None:
        return done

    cache = stage_cache(cfg.cache_dir, run.root)
    models: dict[str, Callable[[], Encoder]] = {
        "base": lambda: load_encoder(recipe.model, "base", cfg.batch_size)}
    if ft_dir is not None:
        models["finetuned"] = lambda: load_encoder(recipe.model, "fine-tuned", cfg.batch_size, path=ft_dir)
    synthetic, weight = None, recipe.index.bm25_weight
    warnings = 0
    if heldout is not None:
        dataset = load_beir(heldout, "test")
        dataset.name = f"{run.root.name} held-out ({dataset.name})"
        warnings += _warn(dataset)
        # The BM25 weight is chosen here, on the run's own synthetic queries, never on a user's real set.
        grid = cfg.hybrid_weight_grid if weight is None else ()
        synthetic = compare_models(dataset, models, cfg, cache=cache, dims=dims, weight_grid=grid,
                                   bm25_weight=weight)
        synthetic["role"] = "synthetic held-out queries"
        if weight is None:
            weight = (synthetic.get("hybrid_weight") or {}).get("chosen", cfg.hybrid_bm25_weight)
    if real_dirs is not None:
        dataset = load_beir(real_dirs[0], cfg.split, real_dirs[1])
        excluded = drop_queries(dataset, examples)
        warnings += _warn(dataset)
        results = compare_models(dataset, models, cfg, cache=cache, dims=dims, bm25_weight=weight)
        results.update(role="your real queries", excluded_examples=excluded,
                       queries_from=str(real_dirs[1]) if real_dirs[1] else None)
        if synthetic is not None:
            results["synthetic"] = synthetic
            if "hybrid_weight" in synthetic:
                results["hybrid_weight"] = synthetic["hybrid_weight"]
    else:
        results = synthetic  # type: ignore[assignment]
    results.update(split=cfg.split if real_dirs else "test", decided_on=results["role"])
    results["paired"] = {"reference": "base", "metric": "ndcg@10", "retrievals": paired_vs(results)}
    results["release"] = decide(results).to_json()
    outputs = write_reports(results, stage.dir)
    metrics = headline_metrics(results)
    counts = {"queries": results["n_queries"], "documents": results["n_docs"], "skipped_qrels": warnings,
              "excluded_examples": len(results.get("excluded_examples") or []),
              "synthetic_queries": synthetic["n_queries"] if synthetic else 0,
              "cache_hits": cache.hits, "encoded": cache.misses}
    log.info("release gate: %s", results["release"]["line"])
    return stage.finish(outputs=outputs, counts=counts, metrics=metrics)


def headline_metrics(results: dict[str, Any]) -> dict[str, float]:
    """The manifest's metrics: each retrieval's headline figures on the deciding set."""
    metrics = {f"{m}_{k}": results[m][k] for m in ("base", "finetuned", "bm25") if results.get(m) for k in HEADLINE}
    for m, values in (results.get("hybrid") or {}).items():
        if m != "bm25_weight":
            metrics.update({f"{m}_hybrid_{k}": values[k] for k in HEADLINE})
    if chosen := results.get("hybrid_weight"):
        metrics["hybrid_bm25_weight_chosen"] = chosen["chosen"]
    if (hybrid := results.get("hybrid")) is not None:
        metrics["hybrid_bm25_weight"] = hybrid["bm25_weight"]
    return metrics


def real_dataset_dirs(recipe: Recipe) -> tuple[Path, Path | None] | None:
    """``eval.dataset`` (and ``eval.queries``): the user's labelled queries, or None."""
    cfg = recipe.eval
    if not cfg.dataset:
        return None
    data = Path(cfg.dataset).expanduser()
    if not data.is_dir():
        raise FileNotFoundError(f"eval.dataset {cfg.dataset!r} is not a folder")
    queries = Path(cfg.queries).expanduser() if cfg.queries else None
    if queries is not None and not queries.is_dir():
        raise FileNotFoundError(f"eval.queries {cfg.queries!r} is not a folder")
    return data, queries


def heldout_dir(recipe: Recipe, run: RunDir, *, required: bool) -> Path | None:
    """``prep/eval`` (the synthetic held-out queries) when prep ran and ``eval.heldout`` is on."""
    if required:
        return run.require("prep", "eval")
    if not recipe.eval.heldout or run.manifest("prep") is None:
        return None
    folder = run.path("prep", "eval")
    return folder if (folder / "queries.jsonl").is_file() else None


def examples_path(recipe: Recipe) -> Path | None:
    return Path(recipe.sdg.examples).expanduser() if recipe.sdg.examples else None


def example_queries(recipe: Recipe) -> set[str]:
    """The normalised texts of ``sdg.examples``' queries (the query writer saw them)."""
    path = examples_path(recipe)
    if path is None or not path.is_file():
        return set()
    return {query_key(str(row.get("query", ""))) for row in read_jsonl(path)} - {""}


def drop_queries(dataset: BeirDataset, texts: set[str]) -> list[str]:
    """Remove the queries whose text is one of ``texts`` (normalised): a query shown to the query writer
    as an example is not an unseen test query. Returns the ids removed."""
    gone = [q for q, text in dataset.queries.items() if query_key(text) in texts]
    for q in gone:
        dataset.queries.pop(q)
        dataset.qrels.pop(q, None)
    if gone:
        log.info("%s: %d queries left out of the scores: they were sdg.examples", dataset.name, len(gone))
    return gone


def stage_dataset(recipe: Recipe, run: RunDir) -> BeirDataset:
    """The dataset the eval stage decides on (``eval.dataset``, else the run's held-out set)."""
    real = real_dataset_dirs(recipe)
    if real is not None:
        dataset = load_beir(real[0], recipe.eval.split, real[1])
        drop_queries(dataset, example_queries(recipe))
        return dataset
    return load_beir(run.require("prep", "eval"), "test")


def record_endpoint(run: RunDir, endpoint: dict[str, Any]) -> Path:
    """``eval/endpoint.json``: a served model's check beside the stage's outputs (which stay untouched, so
    the stage stays up to date)."""
    return write_json(run.path("eval", "endpoint.json"), endpoint)


def sweep_dims(cfg: EvalConfig, recipe: Recipe, ft_manifest: Manifest | None) -> list[int]:
    """Matryoshka dimensions to score: eval.matryoshka_dims, else the ones the fine-tune trained
    (from its manifest, else the recipe), else :data:`DEFAULT_SWEEP`. Empty when the sweep is off."""
    if not cfg.matryoshka_sweep:
        return []
    if cfg.matryoshka_dims:
        return sorted(set(cfg.matryoshka_dims), reverse=True)
    found = None
    if ft_manifest is not None:
        for section in (ft_manifest.counts, ft_manifest.metrics, ft_manifest.config):
            if (found := _find_dims(section)) is not None:
                break
    if found is None and isinstance(recipe.finetune.matryoshka_dims, list):
        found = recipe.finetune.matryoshka_dims
    return sorted(set(found or DEFAULT_SWEEP), reverse=True)


def _find_dims(obj: Any) -> list[int] | None:
    if isinstance(obj, dict):
        value = obj.get("matryoshka_dims")
        if isinstance(value, list) and value and all(isinstance(x, int) and x > 0 for x in value):
            return value
        for child in obj.values():
            if (found := _find_dims(child)) is not None:
                return found
    return None


def compare_models(
    dataset: BeirDataset,
    models: dict[str, Callable[[], Encoder]],
    cfg: EvalConfig,
    *,
    cache: EmbeddingCache | None = None,
    dims: Sequence[int] = (),
    weight_grid: Sequence[float] = (),
    bm25_weight: float | None = None,
) -> dict[str, Any]:
    """Evaluate each model (loaded one at a time, so two large models never share memory), BM25 and
    each model fused with BM25 (``bm25_weight``, default ``eval.hybrid_bm25_weight``); return the results
    dict that :mod:`embedtune.evaluate.report` renders, with every retrieval's per-query scores."""
    weight = cfg.hybrid_bm25_weight if bm25_weight is None else bm25_weight
    if not dataset.queries:
        raise ValueError(f"{dataset.name}: no query has a relevance judgement in split {cfg.split!r}")
    results: dict[str, Any] = {"dataset": dataset.name, "n_queries": len(dataset.queries),
                               "n_docs": len(dataset.corpus), "k_values": list(cfg.k_values),
                               "models": list(models), "warnings": dataset.warnings[:100]}
    matryoshka: dict[str, Any] = {}
    hybrid: dict[str, Any] = {}
    sweeps: dict[str, dict[float, float]] = {}
    ranking = RankingSpec.of(cfg)
    per_query: dict[str, PerQuery] = {}
    # One BM25 index serves the lexical reference row and every model's hybrid row.
    index = BM25Index(dataset.passages(list(dataset.corpus)), cfg.bm25_stopwords) if cfg.bm25 else None
    for key, make in models.items():
        encoder = make()
        res = evaluate_encoder(encoder, dataset, cache=cache, dims=dims, backend=cfg.search,
                               bm25_index=index, bm25_weight=weight, weight_grid=weight_grid,
                               ranking=ranking)
        per_query.update({_retrieval_key(key, part): scores for part, scores in res.per_query.items()})
        results[key] = res.to_json()
        matryoshka[key] = {str(d): m for d, m in res.by_dim.items()}
        if res.hybrid is not None:
            hybrid[key] = res.hybrid
        if res.hybrid_sweep:
            sweeps[key] = res.hybrid_sweep
        log.info("%s: nDCG@10 %.4f%s", encoder.label, res.metrics["ndcg@10"],
                 f" (+ BM25: {res.hybrid['ndcg@10']:.4f})" if res.hybrid else "")
        del encoder
        gc.collect()
    all_dims = sorted({int(d) for per in matryoshka.values() for d in per}, reverse=True)
    results["matryoshka"] = {"dims": all_dims, **matryoshka}
    if index is not None:
        per_query["bm25"] = {}
        results["bm25"] = evaluate_bm25(dataset, ranking, cfg.bm25_stopwords, index, per_query=per_query["bm25"])
    else:
        results["bm25"] = None
    results["hybrid"] = {"bm25_weight": weight, **hybrid} if hybrid else None
    results["per_query"] = per_query_table(list(dataset.queries), per_query)
    if sweeps:
        results["hybrid_weight"] = chosen_weight(sweeps, list(models)[-1], cfg.hybrid_bm25_weight)
    return results


def _retrieval_key(model: str, part: str) -> str:
    """``base`` + ``dense`` -> ``base``; ``hybrid`` -> ``base_hybrid``; ``@128`` -> ``base@128``."""
    return model if part == "dense" else f"{model}_hybrid" if part == "hybrid" else f"{model}{part}"


def per_query_table(query_ids: list[str], per_query: dict[str, PerQuery]) -> dict[str, Any]:
    """``{"query_ids": [...], "ndcg@10": {retrieval: [one value per query]}, ...}``: compact, aligned."""
    table: dict[str, Any] = {"query_ids": query_ids}
    for metric in PER_QUERY:
        table[metric] = {key: [round(scores[q][metric], 6) for q in query_ids]
                         for key, scores in per_query.items() if scores and metric in scores[query_ids[0]]}
    return table


def chosen_weight(sweeps: dict[str, dict[float, float]], deployed: str, default: float) -> dict[str, Any]:
    """The BM25 weight with the best fused nDCG@10 for the model the run deploys (the last one scored:
    fine-tuned when there is one); a tie keeps the configured weight."""
    sweep = sweeps[deployed]
    best = max(sweep.values())
    weight = default if sweep.get(default) == best else max(sweep, key=lambda w: (sweep[w], -abs(w - default)))
    return {"model": deployed, "chosen": weight, "sweep": {str(w): round(v, 5) for w, v in sorted(sweep.items())},
            "on": "synthetic held-out queries"}


def _warn(dataset: BeirDataset) -> int:
    if dataset.warnings:
        log.warning("%s: %d qrels rows skipped, e.g. %s", dataset.name, len(dataset.warnings),
                    dataset.warnings[0])
    return len(dataset.warnings)
