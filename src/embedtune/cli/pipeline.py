"""`embedtune run` and one command per available stage."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
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
from embedtune.pipeline import STAGE_NAMES, StageResult, run_pipeline


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
    evaluated = next((r for r in results if r.name == "eval"), None)
    if evaluated:
        rows = retrieval_rows(evaluated.manifest.metrics, _read_results(run_root / "eval" / "results.json"))
        queries = int(evaluated.manifest.counts.get("queries", 0))
        console.print(_quality_table(rows, queries))
        console.print(verdict(rows, queries))
    indexed = next((r for r in results if r.name == "index"), None)
    if indexed:
        console.print(_deployed_line(indexed, run_root))


def _deployed_line(indexed: StageResult, run_root: Path) -> str:
    """What the run deployed: the search a user queries, with the fusion weight the run chose."""
    info = _read_results(run_root / "index" / "index.json")
    return (f"[bold]deployed:[/] {info.get('chunks')} chunks in Milvus collection {info.get('alias')!r} "
            f"({info.get('model_label')}, {info.get('dimension')} dims), hybrid search with BM25 weight "
            f"{info.get('bm25_weight')} ({info.get('fusion')} fusion).\n"
            f"  search:  embedtune search -r {run_root} \"your question\"\n"
            f"  serve:   embedtune serve --model {run_root}   # POST /v1/search, /v1/embeddings")


def _read_results(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


METHODS = {"base": "base (dense)", "finetuned": "fine-tuned (dense)", "bm25": "BM25",
           "base_hybrid": "base + BM25", "finetuned_hybrid": "fine-tuned + BM25"}
KEYS = ("ndcg@10", "recall@10", "map@10")


@dataclass
class Row:
    label: str
    values: dict[str, float]
    dims: int | None = None  # Matryoshka truncation; None = full width

    @property
    def ndcg(self) -> float:
        return self.values["ndcg@10"]


def retrieval_rows(metrics: dict, results: dict) -> list[Row]:
    """One row per retrieval the eval stage scored: each model dense, BM25, each model fused with BM25,
    and the fine-tuned model truncated to its smaller Matryoshka dimensions (from ``eval/results.json``)."""
    rows = [Row(label, {k: metrics[f"{m}_{k}"] for k in KEYS if f"{m}_{k}" in metrics})
            for m, label in METHODS.items() if f"{m}_ndcg@10" in metrics]
    matryoshka = results.get("matryoshka") or {}
    # The fine-tuned model's truncations (trained for them); the base model's when there is no fine-tune.
    model = "finetuned" if matryoshka.get("finetuned") else "base"
    per_dim = matryoshka.get(model) or {}
    full = max((int(d) for d in per_dim), default=0)
    for dim, values in per_dim.items():
        if "ndcg@10" in values and int(dim) < full:  # the full width is the dense row already
            rows.append(Row(f"{METHODS[model].split(' ')[0]} @ {dim} dims",
                            {k: values[k] for k in KEYS if k in values}, int(dim)))
    return rows


def noise(mean: float, queries: int) -> float:
    """Two standard errors of an nDCG@10 difference between two retrievals on ``queries`` queries, bounded
    without per-query scores: per-query nDCG lies in [0, 1], so its variance is at most m(1-m). Unpaired,
    so conservative (a paired test on the same queries would be tighter)."""
    if queries <= 0:
        return float("inf")
    return 2 * math.sqrt(2 * max(mean * (1 - mean), 0.0) / queries)


def verdict(rows: list[Row], queries: int) -> str:
    """One line: which retrieval to deploy, and whether its lead over the base model exceeds the noise."""
    full = [r for r in rows if r.dims is None]
    base = next((r for r in full if r.label == METHODS["base"]), None)
    if not full or base is None:
        return "verdict: no base-model row to compare with"
    best = max(full, key=lambda r: r.ndcg)
    margin = noise((best.ndcg + base.ndcg) / 2, queries)
    gain = best.ndcg - base.ndcg
    deployed = base if best is base or gain <= margin else best
    if deployed is base:
        line = (f"[bold]verdict:[/] deploy [bold]{base.label}[/] — nothing beats it by more than the noise "
                f"(best: {best.label} {gain:+.4f} nDCG@10, noise ±{margin:.4f} on {queries} held-out queries; "
                "more queries, i.e. a larger sdg.max_chunks, would narrow it)")
    else:
        line = (f"[bold]verdict:[/] deploy [bold]{best.label}[/] — nDCG@10 {best.ndcg:.4f}, {gain:+.4f} over the "
                f"base model, beyond the noise (±{margin:.4f} on {queries} held-out queries)")
    model = deployed.label.split(" ")[0]
    smaller = sorted((r for r in rows if r.dims and r.label.startswith(model + " @")), key=lambda r: r.dims or 0)
    dense = next((r for r in full if r.label.startswith(model) and "BM25" not in r.label), None)
    cheap = next((r for r in smaller if dense and dense.ndcg - r.ndcg <= noise(dense.ndcg, queries) / 2), None)
    if cheap is not None and dense is not None:
        line += f"; {cheap.dims} dims cost {cheap.ndcg - dense.ndcg:+.4f} nDCG@10 for a smaller index"
    return line


def _quality_table(rows: list[Row], queries: int) -> Table:
    """nDCG@10 / Recall@10 / MAP@10 per retrieval, with the change in nDCG@10 against the base model."""
    table = Table(title=f"retrieval quality on {queries} held-out queries (eval stage)")
    table.add_column("retrieval")
    for k in KEYS:
        table.add_column(k.replace("ndcg", "nDCG").replace("recall", "Recall").replace("map", "MAP"),
                         justify="right")
    table.add_column("nDCG@10 vs base", justify="right")
    base = next((r for r in rows if r.label == METHODS["base"]), None)
    for r in rows:
        cells = [f"{r.values[k]:.4f}" if k in r.values else "-" for k in KEYS]
        cells.append(f"{r.ndcg - base.ndcg:+.4f}" if base is not None and r is not base else "")
        table.add_row(r.label, *cells)
    return table
