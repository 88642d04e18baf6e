"""The eval stage: base vs fine-tuned (vs BM25) on the run's held-out BEIR set or any BEIR folder."""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from embedtune.artifacts import Manifest, RunDir, write_json
from embedtune.config import EvalConfig, Recipe
from embedtune.console import log
from embedtune.evaluate.bm25 import evaluate_bm25
from embedtune.evaluate.core import evaluate_encoder
from embedtune.evaluate.report import HEADLINE, write_reports
from embedtune.retrieval.beir import BeirDataset, load_beir
from embedtune.retrieval.bm25 import BM25Index
from embedtune.retrieval.cache import EmbeddingCache
from embedtune.retrieval.encoders import Encoder, load_encoder
from embedtune.retrieval.metrics import RankingSpec

# Swept when the fine-tuned model does not say which dimensions it was trained at (the full dimension
# is always included; dimensions above it are dropped).
DEFAULT_SWEEP = (256, 128, 64)


def run_eval(recipe: Recipe, run: RunDir, *, force: bool = False) -> Manifest:
    """Evaluate ``recipe.model`` (base) and, when the finetune stage completed, ``finetune/model``."""
    cfg = recipe.eval
    data_dir, queries_dir = dataset_dirs(recipe, run)
    ft_manifest = run.manifest("finetune")
    ft_dir = run.path("finetune", "model") if ft_manifest is not None else None
    if ft_dir is not None and not ft_dir.is_dir():
        log.warning("finetune completed but %s is missing: evaluating the base model only", ft_dir)
        ft_dir = None
    dims = sweep_dims(cfg, recipe, ft_manifest)
    inputs: list[Path] = [data_dir] + ([queries_dir] if queries_dir else []) + ([ft_dir] if ft_dir else [])
    config = {"eval": cfg.model_dump(mode="json"), "model": recipe.model.model_dump(mode="json"), "dims": dims}
    stage = run.stage("eval", config, inputs=inputs)
    if (done := stage.up_to_date(force)) is not None:
        return done

    dataset = load_beir(data_dir, cfg.split, queries_dir)
    if not cfg.dataset:
        dataset.name = f"{run.root.name} held-out ({dataset.name})"
    _warn(dataset)
    cache = EmbeddingCache(Path(cfg.cache_dir) if cfg.cache_dir else stage.dir / "cache")
    models: dict[str, Callable[[], Encoder]] = {
        "base": lambda: load_encoder(recipe.model, "base", cfg.batch_size)}
    if ft_dir is not None:
        models["finetuned"] = lambda: load_encoder(recipe.model, "fine-tuned", cfg.batch_size, path=ft_dir)
    # The weight is chosen on the run's own synthetic held-out queries only, never on a user's real set.
    grid = cfg.hybrid_weight_grid if not cfg.dataset else ()
    results = compare_models(dataset, models, cfg, cache=cache, dims=dims, weight_grid=grid)
    results.update(split=cfg.split, queries_from=str(queries_dir) if queries_dir else None)
    outputs = write_reports(results, stage.dir)
    metrics = {f"{m}_{k}": results[m][k] for m in ("base", "finetuned", "bm25")
               if results.get(m) for k in HEADLINE}
    for m, values in (results.get("hybrid") or {}).items():
        if m != "bm25_weight":
            metrics.update({f"{m}_hybrid_{k}": values[k] for k in HEADLINE})
    if chosen := results.get("hybrid_weight"):
        metrics["hybrid_bm25_weight_chosen"] = chosen["chosen"]
    counts = {"queries": results["n_queries"], "documents": results["n_docs"],
              "skipped_qrels": len(dataset.warnings), "cache_hits": cache.hits, "encoded": cache.misses}
    return stage.finish(outputs=outputs, counts=counts, metrics=metrics)


def stage_dataset(recipe: Recipe, run: RunDir) -> BeirDataset:
    """The dataset the eval stage scores (the run's held-out set, or ``eval.dataset``)."""
    data_dir, queries_dir = dataset_dirs(recipe, run)
    return load_beir(data_dir, recipe.eval.split, queries_dir)


def record_endpoint(run: RunDir, endpoint: dict[str, Any]) -> Path:
    """``eval/endpoint.json``: a served model's check beside the stage's outputs (which stay untouched, so
    the stage stays up to date)."""
    return write_json(run.path("eval", "endpoint.json"), endpoint)


def dataset_dirs(recipe: Recipe, run: RunDir) -> tuple[Path, Path | None]:
    """``recipe.eval.dataset`` (and ``eval.queries``) if set, else the prep stage's ``prep/eval``."""
    cfg = recipe.eval
    if cfg.dataset:
        data = Path(cfg.dataset).expanduser()
        if not data.is_dir():
            raise FileNotFoundError(f"eval.dataset {cfg.dataset!r} is not a folder")
    else:
        data = run.require("prep", "eval")
    queries = Path(cfg.queries).expanduser() if cfg.queries else None
    if queries is not None and not queries.is_dir():
        raise FileNotFoundError(f"eval.queries {cfg.queries!r} is not a folder")
    return data, queries


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
) -> dict[str, Any]:
    """Evaluate each model (loaded one at a time, so two large models never share memory), BM25 and
    each model fused with BM25 (``eval.hybrid_bm25_weight``); return the results dict that
    :mod:`embedtune.evaluate.report` renders."""
    if not dataset.queries:
        raise ValueError(f"{dataset.name}: no query has a relevance judgement in split {cfg.split!r}")
    results: dict[str, Any] = {"dataset": dataset.name, "n_queries": len(dataset.queries),
                               "n_docs": len(dataset.corpus), "k_values": list(cfg.k_values),
                               "models": list(models), "warnings": dataset.warnings[:100]}
    matryoshka: dict[str, Any] = {}
    hybrid: dict[str, Any] = {}
    sweeps: dict[str, dict[float, float]] = {}
    ranking = RankingSpec.of(cfg)
    # One BM25 index serves the lexical reference row and every model's hybrid row.
    index = BM25Index(dataset.passages(list(dataset.corpus)), cfg.bm25_stopwords) if cfg.bm25 else None
    for key, make in models.items():
        encoder = make()
        res = evaluate_encoder(encoder, dataset, cache=cache, dims=dims, backend=cfg.search,
                               bm25_index=index, bm25_weight=cfg.hybrid_bm25_weight, weight_grid=weight_grid,
                               ranking=ranking)
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
    results["bm25"] = evaluate_bm25(dataset, ranking, cfg.bm25_stopwords, index) if index else None
    results["hybrid"] = {"bm25_weight": cfg.hybrid_bm25_weight, **hybrid} if hybrid else None
    if sweeps:
        results["hybrid_weight"] = chosen_weight(sweeps, list(models)[-1], cfg.hybrid_bm25_weight)
    return results


def chosen_weight(sweeps: dict[str, dict[float, float]], deployed: str, default: float) -> dict[str, Any]:
    """The BM25 weight with the best fused nDCG@10 for the model the run deploys (the last one scored:
    fine-tuned when there is one); a tie keeps the configured weight."""
    sweep = sweeps[deployed]
    best = max(sweep.values())
    weight = default if sweep.get(default) == best else max(sweep, key=lambda w: (sweep[w], -abs(w - default)))
    return {"model": deployed, "chosen": weight, "sweep": {str(w): round(v, 5) for w, v in sorted(sweep.items())},
            "on": "synthetic held-out queries"}


def _warn(dataset: BeirDataset) -> None:
    if dataset.warnings:
        log.warning("%s: %d qrels rows skipped, e.g. %s", dataset.name, len(dataset.warnings),
                    dataset.warnings[0])
