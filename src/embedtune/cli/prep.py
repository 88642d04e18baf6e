"""`embedtune prep`."""

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
def prep(
    audit: Annotated[int, typer.Option(help="print N random training queries with their positives and "
                                            "mined negatives (scores, texts) to check by eye", min=0)] = 0,
    audit_seed: Annotated[int, typer.Option(help="seed of the audit sample")] = 0,
    run_dir: RunDirOpt = None,
    config: ConfigOpt = None,
    override: OverrideOpt = None,
    force: ForceOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Split queries by document, mine hard negatives, write training and BEIR eval files."""
    from embedtune.prep import print_audit, run_prep

    recipe = load(config, override, verbose)
    run = open_run(recipe, run_dir)
    report_stage("prep", run_prep(recipe, run, force=force))
    if audit:
        print_audit(run, audit, audit_seed)
