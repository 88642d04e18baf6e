"""`embedtune serve`: the OpenAI/NIM-compatible embedding server."""

from __future__ import annotations

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
    api_key_env: Annotated[str | None, typer.Option(
        help="require 'Authorization: Bearer KEY', KEY read from this environment variable "
             "\\[serve.api_key_env]")] = None,
    api_key_file: Annotated[Path | None, typer.Option(
        help="require 'Authorization: Bearer KEY', KEY read from this file (chmod 600)")] = None,
    insecure_no_auth: Annotated[bool, typer.Option(
        "--insecure-no-auth", help="serve without an API key (loopback --host only); without a key option "
                                   "the server uses the key in $EMBEDTUNE_SERVE_KEY_FILE "
                                   "(default ~/.config/embedtune/serve.key, created 0600 on first use)")] = False,
    api_key: Annotated[str | None, typer.Option(
        hidden=True, help="refused: a key on the command line shows in `ps`")] = None,
    backend: Annotated[str | None, typer.Option(help="auto | onnx | torch \\[serve.backend]")] = None,
    onnx_precision: Annotated[str | None, typer.Option(
        help="auto | int8 | fp32 \\[serve.onnx_precision]")] = None,
    max_batch_tokens: Annotated[int | None, typer.Option(help="token budget of one batch")] = None,
    max_queue: Annotated[int | None, typer.Option(help="requests waiting before 429")] = None,
    max_request_tokens: Annotated[int | None, typer.Option(
        help="tokens one request may hold after tokenisation (413 above) \\[serve.max_request_tokens]")] = None,
    docs: Annotated[bool, typer.Option(
        "--docs/--no-docs", help="serve the interactive API page at /docs (FastAPI's Swagger UI)")] = True,
    index: Annotated[Path | None, typer.Option(
        help="serve /v1/search over this run's index (default: a served run directory's own index)")] = None,
    config: ConfigOpt = None,
    override: OverrideOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Serve /v1/embeddings (OpenAI + NIM fields) with dynamic batching, plus /v1/models, health, metrics."""
    from embedtune.serve import model_entry, run_server
    from embedtune.serve.keys import CLI_VALUE_REFUSED, check_exposure, ensure_key_file, local_key_file, read_api_key

    if api_key is not None:
        raise ValueError(CLI_VALUE_REFUSED)
    recipe = load(config, override, verbose, serve__host=host, serve__port=port, serve__backend=backend,
                  serve__onnx_precision=onnx_precision, serve__max_batch_tokens=max_batch_tokens,
                  serve__max_queue=max_queue, serve__max_request_tokens=max_request_tokens,
                  serve__api_key_env=api_key_env)
    cfg = recipe.serve
    key = read_api_key(None if api_key_file else cfg.api_key_env, api_key_file)
    if key and insecure_no_auth:
        raise ValueError("--insecure-no-auth contradicts the API key given (--api-key-env/--api-key-file)")
    check_exposure(cfg.host, key, insecure_no_auth)
    args = model or [recipe.model.name]
    if index is not None and len(args) != 1:
        raise ValueError("--index goes with exactly one --model (the one whose vectors fill the index)")
    entries = [model_entry(arg, cfg.backend, cfg.onnx_precision, index) for arg in args]
    for entry in entries:
        search = f"  (/v1/search over {entry.index})" if entry.index else ""
        console.print(f"[bold]{entry.name}[/] <- {entry.source}{search}")
    if key is None and not insecure_no_auth:
        key_file = local_key_file()
        key, created = ensure_key_file(key_file)
        console.print(f"API key {'created in' if created else 'read from'} {key_file} (0600); clients send "
                      f"'Authorization: Bearer $(cat {key_file})' (openai: api_key=that value)")
    auth = "Bearer key required" if key else "NO API KEY: --insecure-no-auth"
    page = f", API page http://{cfg.host}:{cfg.port}/docs" if docs else ""
    console.print(f"serving on http://{cfg.host}:{cfg.port}/v1/embeddings ({auth}{page})")
    run_server(entries, cfg, key, log_level="debug" if verbose else "info", docs=docs)
