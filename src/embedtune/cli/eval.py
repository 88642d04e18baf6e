"""`embedtune eval`: the eval stage of a run, or any models on any BEIR folder, or a served endpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from embedtune.cli._app import (
    ConfigOpt,
    ForceOpt,
    OverrideOpt,
    RunDirOpt,
    VerboseOpt,
    app,
    load,
    open_run,
    report_stage,
    user_errors,
)
from embedtune.config import Recipe
from embedtune.console import console


@app.command("eval")
@user_errors
def eval_command(
    dataset: Annotated[Path | None, typer.Option(help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")] = None,
    split: Annotated[str | None, typer.Option(help="qrels split (default: test)")] = None,
    queries: Annotated[Path | None, typer.Option(help="take queries from this BEIR folder (cross-lingual)")] = None,
    model: Annotated[list[str] | None, typer.Option(
        help="model spec to evaluate without a run (repeatable; the first is the baseline)")] = None,
    out: Annotated[Path | None, typer.Option(help="write results.json, report.md, report.png here")] = None,
    dims: Annotated[str | None, typer.Option(help="Matryoshka dimensions to sweep, e.g. 256,128,64")] = None,
    bm25: Annotated[bool | None, typer.Option("--bm25/--no-bm25", help="add the BM25 row")] = None,
    hybrid: Annotated[float | None, typer.Option(
        help="BM25's weight in the 'model + BM25' rows (dense and BM25 fused per query); 0: no such rows")] = None,
    search: Annotated[str | None, typer.Option(help="exact | faiss")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="embedding cache folder")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="always encode (standalone mode)")] = False,
    endpoint: Annotated[str | None, typer.Option(help="also evaluate this OpenAI-compatible base URL")] = None,
    endpoint_model: Annotated[str | None, typer.Option(
        help="model name at the endpoint (default: the first it serves)")] = None,
    api_key_env: Annotated[str, typer.Option(help="env variable holding the endpoint's key")] = "OPENAI_API_KEY",
    fail_on_drift: Annotated[bool, typer.Option(
        help="exit 3 when the endpoint (or --index) drifts beyond its tolerances")] = False,
    index: Annotated[Path | None, typer.Option(
        help="score this run's deployed Milvus index on --dataset, beside the same chunks in-process")] = None,
    run_dir: RunDirOpt = None,
    config: ConfigOpt = None,
    override: OverrideOpt = None,
    force: ForceOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """BEIR retrieval metrics: base vs fine-tuned in a run (-r), or --model SPEC on any --dataset."""
    sets: dict[str, Any] = {"eval__split": split, "eval__bm25": bm25, "eval__search": search,
                            "eval__hybrid_bm25_weight": hybrid,
                            "eval__cache_dir": cache_dir, "eval__matryoshka_dims": f"[{dims}]" if dims else None}
    if index is not None:
        _check_index(index, dataset, split or "test", config, override, verbose, fail_on_drift, out)
        return
    if model:
        if dataset is None:
            raise ValueError("--model needs --dataset: the BEIR folder to evaluate on")
        recipe = load(config, override, verbose, **sets)
        results, data = _standalone(recipe, dataset, queries, model, no_cache)
    else:
        recipe = load(config, override, verbose, eval__dataset=dataset, eval__queries=queries, **sets)
        results, data = _stage(recipe, run_dir, force)
    console.print(_table(results))
    if endpoint:
        _check_endpoint(recipe, results, data, endpoint, endpoint_model, os.environ.get(api_key_env),
                        fail_on_drift, out)
    elif out is not None and model:
        _write(results, out)


def _standalone(recipe: Recipe, dataset: Path, queries: Path | None, specs: list[str], no_cache: bool):
    from embedtune.evaluate import EmbeddingCache, default_cache_dir, load_beir, load_encoder
    from embedtune.evaluate.stage import DEFAULT_SWEEP, compare_models

    cfg = recipe.eval
    data = load_beir(dataset, cfg.split, queries)
    for w in data.warnings[:5]:
        console.print(f"[yellow]warning:[/] {w}")
    keys = _unique_keys(specs)
    models = {key: (lambda s=spec, k=key: load_encoder(s, k, cfg.batch_size)) for key, spec in zip(keys, specs,
                                                                                                  strict=True)}
    cache = None if no_cache else EmbeddingCache(cfg.cache_dir or default_cache_dir())
    dims = (cfg.matryoshka_dims or list(DEFAULT_SWEEP)) if cfg.matryoshka_sweep else []
    results = compare_models(data, models, cfg, cache=cache, dims=dims)
    results.update(split=cfg.split, queries_from=str(queries) if queries else None)
    return results, data


def _check_index(index: Path, dataset: Path | None, split: str, config: Path | None, override: list[str] | None,
                 verbose: bool, fail_on_drift: bool, out: Path | None) -> None:
    from rich.table import Table

    from embedtune.retrieval.deployed import CHECKED, evaluate_run_index

    if dataset is None:
        raise ValueError("--index needs --dataset: the BEIR folder whose queries to run through the index")
    recipe = load(config, override, verbose)
    result = evaluate_run_index(str(index), str(dataset), split, recipe.eval.bm25_stopwords,
                                str(out) if out else None)
    table = Table(title=f"{index} on {dataset} ({result['queries']} queries, {result['chunks']} chunks, "
                        f"fusion {result['fusion']}, BM25 weight {result['bm25_weight']})")
    table.add_column("mode")
    table.add_column("search")
    for key in CHECKED:
        table.add_column(key, justify="right")
    for mode in result["deployed"]:
        for side in ("deployed", "exact"):
            label = "Milvus (deployed)" if side == "deployed" else "in-process (exact)"
            table.add_row(mode, label, *(f"{result[side][mode][k]:.4f}" for k in CHECKED))
    console.print(table)
    console.print(f"[dim]{result['written_to']}[/]")
    for failure in result["failures"]:
        console.print(f"[red]drift:[/] {failure}")
    if result["failures"] and fail_on_drift:
        raise typer.Exit(3)


def _unique_keys(specs: list[str]) -> list[str]:
    reserved = {"dataset", "split", "models", "bm25", "hybrid", "matryoshka", "endpoint", "warnings", "k_values",
                "n_queries", "n_docs", "queries_from"}
    keys: list[str] = []
    for spec in specs:
        key = Path(spec).name if Path(spec).is_dir() else spec
        while key in reserved or key in keys:
            key += "'"
        keys.append(key)
    return keys


def _stage(recipe: Recipe, run_dir: Path | None, force: bool):
    from embedtune.artifacts import read_json
    from embedtune.evaluate import run_eval

    run = open_run(recipe, run_dir)
    manifest = run_eval(recipe, run, force=force)
    report_stage("eval", manifest)
    console.print(f"[dim]{run.path('eval', 'report.md')}  {run.path('eval', 'report.png')}[/]")
    return read_json(run.path("eval", "results.json")), run


def _table(results: dict[str, Any]):
    from embedtune.evaluate.report import rich_table
    from embedtune.retrieval.metrics import DETAILED

    return rich_table(results, [m for m in DETAILED if m in results[results["models"][0]]])


def _write(results: dict[str, Any], out: Path) -> None:
    from embedtune.evaluate.report import write_reports

    paths = write_reports(results, out)
    console.print("[dim]" + "  ".join(map(str, paths)) + "[/]")


def _check_endpoint(recipe: Recipe, results: dict[str, Any], data: Any, url: str, name: str | None,
                    api_key: str | None, fail: bool, out: Path | None) -> None:
    """``data``: the standalone dataset, or the run whose eval stage ran (its dataset is loaded here)."""
    from embedtune.artifacts import RunDir
    from embedtune.evaluate.endpoint import check_endpoint
    from embedtune.evaluate.report import endpoint_markdown
    from embedtune.evaluate.stage import record_endpoint, stage_dataset

    run = data if isinstance(data, RunDir) else None
    dataset = stage_dataset(recipe, run) if run is not None else data
    violations = check_endpoint(results, dataset, url, name, api_key, recipe.eval, recipe.export.tolerance_low_k,
                                recipe.export.tolerance_high_k)
    endpoint = results["endpoint"]
    side_by_side = {**results, "models": [endpoint["reference"], "served"],
                    "served": {**endpoint["metrics"], "label": "served"}, "bm25": None, "hybrid": None}
    console.print(_table(side_by_side))
    console.print("\n".join(endpoint_markdown(endpoint)[2:]))
    if run is not None:
        record_endpoint(run, endpoint)
    if out is not None:
        _write(results, out)
    if violations and fail:
        raise typer.Exit(3)
