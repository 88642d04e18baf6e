"""`embedtune serve`: the OpenAI/NIM-compatible embedding server."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from embedtune.cli._app import ConfigOpt, OverrideOpt, VerboseOpt, app, load, user_errors
from embedtune.console import console


@app.command()
@user_errors
def serve(
    model: Annotated[list[str] | None, typer.Option(
        "--model", "-m",
        help="model to serve: 'default', a model folder, a run directory, an export/ folder, or "
             "NAME=PATH to choose the id clients use (repeatable) \\[recipe model.name]")] = None,
    host: Annotated[str | None, typer.Option(help="interface to bind \\[serve.host]")] = None,
    port: Annotated[int | None, typer.Option(help="port \\[serve.port]")] = None,
    api_key: Annotated[str | None, typer.Option(
        help="require 'Authorization: Bearer KEY' (else the env var named by serve.api_key_env)")] = None,
    backend: Annotated[str | None, typer.Option(help="auto | onnx | torch \\[serve.backend]")] = None,
    onnx_precision: Annotated[str | None, typer.Option(
        help="auto | int8 | fp32 \\[serve.onnx_precision]")] = None,
    max_batch_tokens: Annotated[int | None, typer.Option(help="token budget of one batch")] = None,
    max_queue: Annotated[int | None, typer.Option(help="requests waiting before 429")] = None,
    index: Annotated[Path | None, typer.Option(
        help="serve /v1/search over this run's index (default: a served run directory's own index)")] = None,
    config: ConfigOpt = None,
    override: OverrideOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Serve /v1/embeddings (OpenAI + NIM fields) with dynamic batching, plus /v1/models, health, metrics."""
    from embedtune.serve import model_entry, run_server

    recipe = load(config, override, verbose, serve__host=host, serve__port=port, serve__backend=backend,
                  serve__onnx_precision=onnx_precision, serve__max_batch_tokens=max_batch_tokens,
                  serve__max_queue=max_queue)
    cfg = recipe.serve
    key = api_key or (os.environ.get(cfg.api_key_env) if cfg.api_key_env else None)
    if cfg.api_key_env and not key:
        raise ValueError(f"serve.api_key_env is {cfg.api_key_env!r} but that environment variable is empty")
    args = model or [recipe.model.name]
    if index is not None and len(args) != 1:
        raise ValueError("--index goes with exactly one --model (the one whose vectors fill the index)")
    entries = [model_entry(arg, cfg.backend, cfg.onnx_precision, index) for arg in args]
    for entry in entries:
        search = f"  (/v1/search over {entry.index})" if entry.index else ""
        console.print(f"[bold]{entry.name}[/] <- {entry.source}{search}")
    auth = "Bearer key required" if key else "no API key"
    console.print(f"serving on http://{cfg.host}:{cfg.port}/v1/embeddings ({auth})")
    run_server(entries, cfg, key, log_level="debug" if verbose else "info")
