"""`embedtune finetune` (also under `torchrun --nproc_per_node N -m embedtune finetune ...`)."""

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
def finetune(
    model: Annotated[
        str | None, typer.Option(help="model spec to start from (default, a folder, a GGUF file, a hub id)")
    ] = None,
    finetuning_type: Annotated[str | None, typer.Option(help="all_weights or lora_merged")] = None,
    epochs: Annotated[float | None, typer.Option(help="training epochs")] = None,
    resume: Annotated[
        bool, typer.Option(help="continue from the last checkpoint of an interrupted run")
    ] = True,
    run_dir: RunDirOpt = None,
    config: ConfigOpt = None,
    override: OverrideOpt = None,
    force: ForceOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Contrastive fine-tuning of prep/train.jsonl into finetune/model (resumes after an interruption)."""
    from embedtune.train import run_finetune
    from embedtune.train.distributed import init_distributed

    recipe = load(
        config,
        override,
        verbose,
        model__name=model,
        finetune__finetuning_type=finetuning_type,
        finetune__epochs=epochs,
    )
    dist = init_distributed()
    run = open_run(recipe, run_dir) if dist.is_main else _run_dir(recipe, run_dir)
    dist.barrier()
    manifest = run_finetune(recipe, run, force=force, resume=resume)
    if dist.is_main:
        report_stage("finetune", manifest)


def _run_dir(recipe, run_dir):
    from pathlib import Path

    from embedtune.artifacts import RunDir

    return RunDir(run_dir or Path("runs") / recipe.name)
