"""The typer app and the options every stage command shares."""

from __future__ import annotations

import functools
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from embedtune.artifacts import ArtifactError, RunDir, write_text
from embedtune.config import Recipe, RecipeError, dump_recipe, load_recipe
from embedtune.console import console, setup_logging
from embedtune.models import ModelNotFoundError
from embedtune.pipeline import STAGES

app = typer.Typer(
    name="embedtune",
    help="Turn domain documents into a retrieval embedding model that knows the domain.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("embedtune")
        except PackageNotFoundError:  # a source checkout on PYTHONPATH, not installed
            found = "unknown (not installed)"
        typer.echo(f"embedtune {found}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="print the installed version and exit")] = False,
) -> None:
    """Turn domain documents into a retrieval embedding model that knows the domain."""

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="recipe YAML file", exists=False)]
OverrideOpt = Annotated[
    list[str] | None, typer.Option("--override", "-o", help="section.key=value (repeatable)")
]
RunDirOpt = Annotated[Path | None, typer.Option("--run-dir", "-r", help="run directory [runs/<name>]")]
ForceOpt = Annotated[bool, typer.Option("--force", help="rerun even when inputs and config are unchanged")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v")]

# Errors a user can fix; shown as one clear message instead of a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (RecipeError, ArtifactError, ModelNotFoundError, ValueError,
                                                FileNotFoundError)

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(func: F) -> F:
    """Turn the errors a user can fix into a red message and exit code 1 (2 for a bad recipe)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt:
            _print_interrupted()
            raise typer.Exit(INTERRUPTED) from None
        except RecipeError as exc:
            _print_error(exc)
            raise typer.Exit(2) from None
        except USER_ERRORS as exc:
            _print_error(exc)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C
_opened: list[RunDir] = []  # the run directory the command works in, for the interrupt message


def _print_interrupted() -> None:
    """What Ctrl-C left behind and how to go on: finished stages are kept and a rerun skips them."""
    command = shlex.join(["embedtune", *sys.argv[1:]])
    console.print("[yellow]interrupted[/]: ", end="")
    if not _opened:
        console.print(f"nothing was written. Rerun: {command}", soft_wrap=True, markup=False, highlight=False)
        return
    run = _opened[-1]
    done = [info.name for info in STAGES if (run.root / info.name / "manifest.json").is_file()]
    kept = f"finished stages kept in {run.root}: {', '.join(done)}" if done else f"no stage finished in {run.root}"
    console.print(f"{kept}. Resume with the same command, which skips finished stages (sdg reuses its cached "
                  f"answers, finetune its last checkpoint): {command}", soft_wrap=True, markup=False, highlight=False)


def _print_error(exc: BaseException) -> None:
    # soft_wrap: a long path must stay one line (copyable, greppable), not be cut at the terminal width;
    # markup off: a message may quote text with [brackets] (e.g. a JSON line).
    console.print("[red]error:[/] ", end="")
    console.print(str(exc), soft_wrap=True, markup=False, highlight=False)


def load(config: Path | None, overrides: list[str] | None, verbose: bool = False, **sets: Any) -> Recipe:
    """Load the recipe, apply -o overrides, then CLI flags given as ``section__key=value``."""
    setup_logging(verbose)
    items = list(overrides or [])
    items += [f"{k.replace('__', '.')}={v}" for k, v in sets.items() if v is not None]
    return load_recipe(config, items)


def open_run(recipe: Recipe, run_dir: Path | None, *, create: bool = False) -> RunDir:
    """The run directory, with the resolved recipe written into it. Only the commands that start a run
    (``run``, ``corpus``) ``create`` it: for any later stage a missing folder is a typo, and going on would
    export (or index) the base model into a new, empty run."""
    root = run_dir or Path("runs") / recipe.name
    if not create and not root.is_dir():
        raise FileNotFoundError(f"run directory {root} does not exist; start a run with `embedtune run --corpus "
                                f"PATH -r {root}` (or `embedtune corpus PATH -r {root}`), or pass -r an existing one")
    run = RunDir(root)
    run.root.mkdir(parents=True, exist_ok=True)
    _opened.append(run)
    write_text(run.root / "recipe.yaml", dump_recipe(recipe))
    return run


def report_stage(name: str, manifest: Any) -> None:
    state = "[dim]up to date, skipped[/]" if manifest.skipped else f"done in {manifest.seconds:.1f}s"
    counts = ", ".join(f"{k}={v}" for k, v in manifest.counts.items() if not isinstance(v, dict | list))
    console.print(f"[bold green]{name}[/] {state}" + (f"  [dim]{counts}[/]" if counts else ""))
