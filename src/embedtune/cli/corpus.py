"""`embedtune corpus`."""

from __future__ import annotations

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
from embedtune.corpus import run_corpus


@app.command()
@user_errors
def corpus(
    path: Annotated[Path | None, typer.Argument(help="folder, file or BEIR corpus.jsonl")] = None,
    model: Annotated[str | None, typer.Option(help="model whose tokenizer bounds the chunks")] = None,
    run_dir: RunDirOpt = None,
    config: ConfigOpt = None,
    override: OverrideOpt = None,
    force: ForceOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Load, clean, de-duplicate and chunk documents into corpus/chunks.jsonl."""
    recipe = load(config, override, verbose, corpus__path=path, model__name=model)
    report_stage("corpus", run_corpus(recipe, open_run(recipe, run_dir, create=True), force=force))
