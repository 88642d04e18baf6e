"""`embedtune deploy` (release gate, reindex, check) and `embedtune search` (query the index from the terminal)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated

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
from embedtune.console import console, setup_logging


@app.command()
@user_errors
def deploy(
    uri: Annotated[str | None, typer.Option(help="Milvus server URI (default: Milvus Lite in <run>/deploy)")] = None,
    run_dir: RunDirOpt = None,
    config: ConfigOpt = None,
    override: OverrideOpt = None,
    force: Annotated[bool, typer.Option(
        "--force", help="deploy the challenger even if it does not win beyond the noise (and rerun)")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Release gate on eval's paired scores, then every corpus chunk embedded by the winner into Milvus (dense +
    BM25), checked against eval, behind the alias."""
    from embedtune.deploy import run_deploy
    from embedtune.deploy.stage import read_decision

    recipe = load(config, override, verbose, index__uri=uri, deploy__force=True if force else None)
    run = open_run(recipe, run_dir)
    report_stage("deploy", run_deploy(recipe, run, force=force))
    if decision := read_decision(run):
        console.print(f"[bold]deployed:[/] {decision['served']}")


@app.command(hidden=True)
@user_errors
def index(
    uri: Annotated[str | None, typer.Option(help="Milvus server URI")] = None,
    run_dir: RunDirOpt = None,
    config: ConfigOpt = None,
    override: OverrideOpt = None,
    force: ForceOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """The deploy stage's former name (kept for scripts): `embedtune deploy` without --force's challenger."""
    from embedtune.deploy import run_deploy

    recipe = load(config, override, verbose, index__uri=uri)
    report_stage("deploy", run_deploy(recipe, open_run(recipe, run_dir), force=force))


@app.command()
@user_errors
def search(
    query: Annotated[list[str], typer.Argument(help="one or more queries")],
    run_dir: Annotated[Path, typer.Option("--run-dir", "-r", help="run directory with an index")] = Path("runs/run"),
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, max=1000)] = 5,
    mode: Annotated[str, typer.Option(help="hybrid | dense | bm25")] = "hybrid",
    snippet: Annotated[int, typer.Option(help="characters of text shown per hit")] = 160,
    as_json: Annotated[bool, typer.Option(
        "--json", help="print one JSON object per query (query, mode, hits with rank, id, doc_id, title, text, "
                       "source, score; full texts) instead of tables")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Search a run's index: top-k chunks with id, title, score and a snippet."""
    from rich.console import Console
    from rich.table import Table

    from embedtune.retrieval.deployment import open_searcher

    setup_logging(verbose)
    searcher = open_searcher(run_dir)
    results = searcher.search(query, mode=mode, top_k=top_k)  # type: ignore[arg-type]
    if as_json:  # for scripts and jq: JSON Lines on stdout, nothing else there
        for text, hits in zip(query, results, strict=True):
            rows = [{"rank": rank, **dataclasses.asdict(hit)} for rank, hit in enumerate(hits, 1)]
            sys.stdout.write(json.dumps({"query": text, "mode": mode, "hits": rows}, ensure_ascii=False) + "\n")
        return
    out = Console()  # results are the command's output: stdout (logs and progress stay on stderr)
    for text, hits in zip(query, results, strict=True):
        table = Table(title=f"{mode}: {text}", title_justify="left")
        for col in ("#", "id", "title", "score", "text"):
            table.add_column(col, overflow="fold", justify="right" if col in ("#", "score") else "left")
        for rank, hit in enumerate(hits, 1):
            short = hit.text if len(hit.text) <= snippet else hit.text[:snippet].rstrip() + "…"
            table.add_row(str(rank), hit.id, hit.title, f"{hit.score:.4f}", short)
        out.print(table)
