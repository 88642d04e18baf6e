"""`embedtune config show`."""

from __future__ import annotations

import typer
from rich.syntax import Syntax

from embedtune.cli._app import ConfigOpt, OverrideOpt, app, load, user_errors
from embedtune.config import dump_recipe
from embedtune.console import console

config_app = typer.Typer(help="Inspect the recipe.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
@user_errors
def show(config: ConfigOpt = None, override: OverrideOpt = None) -> None:
    """Print the resolved recipe (defaults + YAML + overrides) as YAML."""
    text = dump_recipe(load(config, override))
    if console.is_terminal:
        console.print(Syntax(text, "yaml"))
    else:
        print(text, end="")
