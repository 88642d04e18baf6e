"""One rich console and progress bars with counts and rates, shared by every stage."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

console = Console(stderr=True)
log = logging.getLogger("embedtune")


def setup_logging(verbose: bool = False) -> None:
    if not log.handlers:
        log.addHandler(RichHandler(console=console, show_path=False, rich_tracebacks=False))
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def progress() -> Progress:
    """A progress display showing done/total, percentage, rate-derived ETA and elapsed time."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("[dim]{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar (counts and items/s); silent when stderr is not a terminal."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress() as bar:
        task = bar.add_task(description, total=total, rate="")
        for item in items:
            yield item
            bar.advance(task)
            speed = bar.tasks[task].speed
            if speed:
                bar.update(task, rate=f"{speed:.1f}/s")
