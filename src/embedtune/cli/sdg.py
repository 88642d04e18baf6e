"""`embedtune sdg`."""

from __future__ import annotations

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


@app.command()
@user_errors
def sdg(
    generator: Annotated[str | None, typer.Option(help="local (default, offline), llm, or a plug-in")] = None,
    base_url: Annotated[str | None, typer.Option(help="llm: OpenAI-compatible endpoint, e.g. "
                                                     "http://localhost:8000/v1")] = None,
    llm_model: Annotated[str | None, typer.Option(help="llm: model name served by the endpoint")] = None,
    api_key_env: Annotated[str | None, typer.Option(help="llm: NAME of the variable holding the key")] = None,
    max_chunks: Annotated[int | None, typer.Option(help="sample at most this many chunks")] = None,
    queries_per_chunk: Annotated[int | None, typer.Option(help="queries to keep per chunk")] = None,
    run_dir: RunDirOpt = None,
    config: ConfigOpt = None,
    override: OverrideOpt = None,
    force: ForceOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Generate synthetic queries for the corpus chunks into sdg/queries.jsonl."""
    from embedtune.sdg import run_sdg

    recipe = load(config, override, verbose, sdg__generator=generator, sdg__llm__base_url=base_url,
                  sdg__llm__model=llm_model, sdg__llm__api_key_env=api_key_env, sdg__max_chunks=max_chunks,
                  sdg__queries_per_chunk=queries_per_chunk)
    report_stage("sdg", run_sdg(recipe, open_run(recipe, run_dir), force=force))
