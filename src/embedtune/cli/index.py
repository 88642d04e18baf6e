"""`embedtune index` (reindex the vector store) and `embedtune search` (query it from the terminal)."""

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
from embedtune.console import setup_logging


@app.command()
@user_errors
def index(
    uri: Annotated[str | None, typer.Option(help="Milvus server URI (default: Milvus Lite in <run>/index)")] = None,
    run_dir: RunDirOpt = None,
    config: ConfigOpt = None,
    override: OverrideOpt = None,
    force: ForceOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Embed every corpus chunk with the run's served model into Milvus (dense + BM25), then swap the alias."""
    from embedtune.index import run_index

    recipe = load(config, override, verbose, index__uri=uri)
    report_stage("index", run_index(recipe, open_run(recipe, run_dir), force=force))


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
