"""`embedtune run` and one command per available stage."""

from __future__ import annotations

import json
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
    user_errors,
)
from embedtune.console import console
from embedtune.evaluate.report import pretty
from embedtune.pipeline import STAGE_NAMES, StageResult, run_pipeline
from embedtune.retrieval.metrics import HEADLINE
from embedtune.retrieval.release import Retrieval


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
    run_obj = open_run(recipe, run_dir, create=True)
    results = run_pipeline(recipe, run_obj.root, to=to, force=force,
                           on_stage=lambda s: console.rule(f"[bold]{s}"))
    _summary(results, run_obj.root)


def _summary(results: list[StageResult], run_root: Path) -> None:
    table = Table(title="embedtune run")
    for col in ("stage", "status", "seconds", "peak RSS MB", "counts"):
        table.add_column(col)
    for r in results:
        counts = ", ".join(f"{k}={v}" for k, v in r.manifest.counts.items() if not isinstance(v, dict | list))
        rss = f"{r.manifest.peak_rss_mb:.0f}" if r.manifest.peak_rss_mb is not None else "-"
        table.add_row(r.name, "skipped" if r.manifest.skipped else "done", f"{r.seconds:.1f}", rss, counts)
    peaks = [r.manifest.peak_rss_mb for r in results if r.manifest.peak_rss_mb is not None]
    table.add_row("total", "", f"{sum(r.seconds for r in results):.1f}", f"{max(peaks):.0f}" if peaks else "", "")
    console.print(table)
    evaluated = run_root / "eval" / "results.json"
    if any(r.name == "eval" for r in results) and evaluated.is_file():
        console.print(quality_table(_read_results(evaluated)))
    decision = _read_results(run_root / "deploy" / "decision.json") if any(r.name == "deploy" for r in results) \
        else {}
    if decision:
        console.print(f"[bold]deployed:[/] {decision.get('served')}\n"
                      f"  search:  embedtune search -r {run_root} \"your question\"\n"
                      f"  serve:   embedtune serve --model {run_root}   # POST /v1/search, /v1/embeddings")
    elif evaluated.is_file():
        release = _read_results(evaluated).get("release") or {}
        if release:
            console.print(f"[bold]release gate:[/] {release.get('line')} (run the deploy stage to act on it)")


def _read_results(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}




def quality_table(results: dict) -> Table:
    """Each retrieval on the deciding query set: nDCG@10 / Recall@10 / MAP@10 and the paired 95 % interval of
    its nDCG@10 difference to the base model (from ``eval/results.json``; the verdict is the release gate's)."""
    n, role = results.get("n_queries", 0), results.get("decided_on", "queries")
    table = Table(title=f"retrieval quality on {n} {role} ({results.get('dataset', '')})")
    table.add_column("retrieval")
    for k in HEADLINE:
        table.add_column(pretty(k), justify="right")
    table.add_column("nDCG@10 vs base [95 % paired interval]", justify="right")
    paired = (results.get("paired") or {}).get("retrievals") or {}
    for key, values in _rows(results):
        cells = [f"{values[k]:.4f}" if k in values else "-" for k in HEADLINE]
        d = paired.get(key)
        mark = "" if d is None else " [green]better[/]" if d["low"] > 0 else " [red]worse[/]" if d["high"] < 0 else ""
        cells.append("" if d is None else f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]{mark}")
        table.add_row(Retrieval.parse(key).label, *cells)
    return table


def _rows(results: dict) -> list[tuple[str, dict]]:
    """(retrieval key, its metrics) for each retrieval in results.json, dense, BM25, fused, truncated."""
    rows = [(m, results[m]) for m in ("base", "finetuned") if results.get(m)]
    if results.get("bm25"):
        rows.append(("bm25", results["bm25"]))
    hybrid = results.get("hybrid") or {}
    rows += [(f"{m}_hybrid", hybrid[m]) for m in ("base", "finetuned") if m in hybrid]
    mat = results.get("matryoshka") or {}
    for m in ("base", "finetuned"):
        full = (results.get(m) or {}).get("dim")
        rows += [(f"{m}@{d}", v) for d, v in (mat.get(m) or {}).items() if full and int(d) < int(full)]
    return rows
