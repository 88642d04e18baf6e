"""`embedtune export`: the run's model (fine-tuned, else base) or any model folder -> ONNX serving folder."""

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
from embedtune.config import Recipe
from embedtune.console import console


@app.command()
@user_errors
def export(
    model: Annotated[str | None, typer.Option(help="export this model (folder or spec) instead of the run's")] = None,
    out: Annotated[Path | None, typer.Option(help="output folder for --model (default: <model name>-onnx)")] = None,
    run_dir: RunDirOpt = None,
    config: ConfigOpt = None,
    override: OverrideOpt = None,
    force: ForceOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Export to ONNX (pooling, normalisation, Matryoshka in the graph), quantise to int8, check parity.

    With -r RUN: the run's fine-tuned model (or its base model) into RUN/export/.
    With --model PATH --out DIR: any sentence-transformers folder or model spec, standalone.
    """
    from embedtune.export import run_export

    recipe = load(config, override, verbose)
    if model is None:
        if out is not None:
            raise ValueError("--out goes with --model; a run exports into <run>/export/")
        report_stage("export", run_export(recipe, open_run(recipe, run_dir), force=force))
        return
    _export_standalone(recipe, model, out or Path(f"{Path(model).name or 'model'}-onnx"))


def _export_standalone(recipe: Recipe, model: str, out: Path) -> None:
    from embedtune.export.stage import export_and_check

    eval_dir = Path(recipe.eval.dataset) if recipe.eval.dataset else None
    model_cfg = recipe.model.model_copy(update={"name": model})
    result, report = export_and_check(recipe, model_cfg, out, model, eval_dir)
    console.print(f"[bold green]export[/] {model} -> {out}  [dim]dimension={result.metadata['dimension']}, "
                  f"fp32 min cosine={report['fp32_vs_torch']['min_cosine']}[/]")
