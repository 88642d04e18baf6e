"""`embedtune run` and one command per available stage."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

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
from embedtune.console import console
from embedtune.pipeline import STAGE_NAMES, StageResult, available_stages, run_pipeline, stage_info


@app.command()
@user_errors
def run(
    corpus: Annotated[Path | None, typer.Option(help="documents: folder, file or BEIR corpus.jsonl")] = None,
    to: Annotated[str | None, typer.Option(help=f"last stage to run ({', '.join(STAGE_NAMES)})")] = None,
    model: Annotated[str | None, typer.Option(help="model spec (default, a folder, a GGUF file, a hub id)")] = None,
    run_dir: RunDirOpt = None,
    config: ConfigOpt = None,
    override: OverrideOpt = None,
    force: ForceOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run the pipeline from documents to the last stage asked for."""
    recipe = load(config, override, verbose, corpus__path=corpus, model__name=model)
    if recipe.corpus.path is None:
        raise ValueError("no documents given: pass --corpus PATH or set corpus.path in the recipe")
    run_obj = open_run(recipe, run_dir)
    results = run_pipeline(recipe, run_obj.root, to=to, force=force,
                           on_stage=lambda s: console.rule(f"[bold]{s}"))
    _summary(results)


def _summary(results: list[StageResult]) -> None:
    table = Table(title="embedtune run")
    for col in ("stage", "status", "seconds", "counts"):
        table.add_column(col)
    for r in results:
        counts = ", ".join(f"{k}={v}" for k, v in r.manifest.counts.items() if not isinstance(v, dict | list))
        table.add_row(r.name, "skipped" if r.manifest.skipped else "done", f"{r.seconds:.1f}", counts)
    table.add_row("total", "", f"{sum(r.seconds for r in results):.1f}", "")
    console.print(table)
    evaluated = next((r.manifest.metrics for r in results if r.name == "eval"), None)
    if evaluated:
        console.print(_gain_table(evaluated))


GAIN_COLUMNS = {"base": "base", "finetuned": "fine-tuned", "bm25": "BM25",
                "base_hybrid": "base + BM25", "finetuned_hybrid": "fine-tuned + BM25"}


def _gain_table(metrics: dict) -> Table:
    """Base vs fine-tuned (and BM25, and each fused with BM25) from the eval stage's manifest metrics
    (``base_ndcg@10``, ``finetuned_hybrid_ndcg@10`` ...); "change" is fine-tuned minus base, dense."""
    table = Table(title="retrieval quality (eval stage)")
    columns = [m for m in GAIN_COLUMNS if f"{m}_ndcg@10" in metrics]
    compare = "base" in columns and "finetuned" in columns
    table.add_column("metric")
    for m in columns:
        table.add_column(GAIN_COLUMNS[m], justify="right")
    if compare:
        table.add_column("change", justify="right")
    for k in ("ndcg@10", "recall@10", "map@10"):
        cells = [f"{metrics[f'{m}_{k}']:.4f}" if f"{m}_{k}" in metrics else "-" for m in columns]
        if compare and f"base_{k}" in metrics and f"finetuned_{k}" in metrics:
            cells.append(f"{metrics[f'finetuned_{k}'] - metrics[f'base_{k}']:+.4f}")
        table.add_row(k.replace("ndcg", "nDCG").replace("recall", "Recall").replace("map", "MAP"), *cells)
    return table


def _stage_command(name: str, summary: str) -> None:
    @user_errors
    def command(
        run_dir: RunDirOpt = None,
        config: ConfigOpt = None,
        override: OverrideOpt = None,
        force: ForceOpt = False,
        verbose: VerboseOpt = False,
    ) -> None:
        recipe = load(config, override, verbose)
        run_obj = open_run(recipe, run_dir)
        report_stage(name, stage_info(name).load()(recipe, run_obj, force=force))

    command.__doc__ = summary[0].upper() + summary[1:] + "."
    app.command(name)(command)


# Stages with options of their own define their command in a module of this package instead.
_CUSTOM = {"corpus", "sdg", "prep", "finetune", "eval", "export"}
for _info in available_stages():
    if _info.name not in _CUSTOM:
        _stage_command(_info.name, _info.summary)
