"""`embedtune config show`."""

from __future__ import annotations

import textwrap
from typing import Annotated, Any

import typer
import yaml
from pydantic import BaseModel
from rich.syntax import Syntax

from embedtune.cli._app import ConfigOpt, OverrideOpt, app, load, user_errors
from embedtune.config import Recipe, dump_recipe
from embedtune.console import console

config_app = typer.Typer(help="Inspect the recipe.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
@user_errors
def show(
    config: ConfigOpt = None,
    override: OverrideOpt = None,
    comments: Annotated[bool, typer.Option(
        "--comments/--no-comments", help="each key's description as a YAML comment above it")] = True,
) -> None:
    """Print the resolved recipe (defaults + YAML + overrides) as YAML, each key with its description."""
    recipe = load(config, override)
    text = described_yaml(recipe) if comments else dump_recipe(recipe)
    if console.is_terminal:
        console.print(Syntax(text, "yaml"))
    else:
        print(text, end="")


def described_yaml(recipe: Recipe) -> str:
    """The recipe as YAML (the same data as :func:`dump_recipe`) with every field's description, from the
    pydantic models, as a comment above its key; sections written block style, values flow style."""
    return "\n".join(_lines(recipe, recipe.model_dump(mode="json"), 0)) + "\n"


def _lines(model: BaseModel, data: dict[str, Any], indent: int) -> list[str]:
    pad = "  " * indent
    lines: list[str] = []
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        doc = info.description or (type(value).__doc__ if isinstance(value, BaseModel) else None)
        if doc:
            lines += [pad + "# " + part for part in textwrap.wrap(" ".join(doc.split()), 110 - len(pad))]
        if isinstance(value, BaseModel):
            lines += [f"{pad}{name}:", *_lines(value, data[name], indent + 1)]
        else:
            dumped = yaml.safe_dump({name: data[name]}, default_flow_style=True, width=10**6, allow_unicode=True)
            lines.append(pad + dumped.strip()[1:-1])  # {key: value} -> key: value
    return lines
