"""One rich console and progress reporting with counts, rates and ETA, shared by every stage.

On a terminal, :func:`progress` and :func:`track` draw rich bars. Elsewhere (``make demo > log``, CI, the
platform's workers) a bar would print nothing until the end, so they write a plain line instead, at the
start, at most every :data:`PLAIN_INTERVAL` seconds and at the end::

    generating queries (local): 24/80 chunks (30%), 1.20 chunks/s, elapsed 0:20, ETA 0:47
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from embedtune.cpu_share import recheck as recheck_cpu_share

T = TypeVar("T")

console = Console(stderr=True)
log = logging.getLogger("embedtune")

#: Seconds between two plain progress lines of one task when stderr is not a terminal.
PLAIN_INTERVAL = 10.0


class ConsoleStreamHandler(logging.StreamHandler):
    """Plain log lines to the console's stream as it is when each record is written. A handler that kept
    the stream of the moment it was set up writes to a closed file once sys.stderr is replaced (a test's
    capture, a worker redirecting its output): "--- Logging error --- I/O operation on closed file"."""

    @property
    def stream(self):  # noqa: ANN201 - a text stream
        return console.file

    @stream.setter
    def stream(self, _value) -> None:  # noqa: ANN001 - StreamHandler's __init__ assigns one; ignored
        pass


def setup_logging(verbose: bool = False) -> None:
    """Rich log lines on a terminal; elsewhere plain, unwrapped lines (a log file, CI, a worker's log), and
    no library progress bars there: our own plain lines report progress instead."""
    if not console.is_terminal:
        quiet_library_bars()
    if not log.handlers:
        if console.is_terminal:
            log.addHandler(RichHandler(console=console, show_path=False, rich_tracebacks=False))
        else:
            handler = ConsoleStreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
            log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


# Hugging Face libraries draw tqdm bars (model loading, dataset maps, downloads); in a log file each is a run
# of `\r`-separated redraws. Their own switches turn them off; a user's explicit setting wins.
_BAR_SWITCHES = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
                 # Bars drawn with plain tqdm, which no HF switch reaches: transformers' GGUF de-quantisation,
                 # sentence-transformers' model card ("Computing widget examples").
                 "TQDM_DISABLE": "1"}


def quiet_library_bars() -> None:
    """Turn off the progress bars of huggingface_hub, transformers, datasets and plain tqdm (before or after
    import)."""
    for name, value in _BAR_SWITCHES.items():
        os.environ.setdefault(name, value)
    _quiet_tqdm()
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        import transformers.utils.logging as hf_logging

        hf_logging.disable_progress_bar()
    if os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1" and "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


def _quiet_tqdm() -> None:
    """tqdm reads ``TQDM_DISABLE`` once, when it is imported (``tqdm.utils.envwrap``); an already imported tqdm
    gets the same default the way envwrap sets it: a caller's explicit ``disable=`` still wins."""
    std = sys.modules.get("tqdm.std")
    if os.environ["TQDM_DISABLE"] != "1" or std is None or getattr(std.tqdm, "_embedtune_quiet", False):
        return
    std.tqdm.__init__ = functools.partialmethod(std.tqdm.__init__, disable=True)
    std.tqdm._embedtune_quiet = True


class PlainLogProgress(Progress):
    """A rich :class:`Progress` that, when its display is disabled (no terminal), reports each task as
    plain lines: done/total, percentage, rate, elapsed time and ETA, throttled to one per ``interval``, and
    repeated by a heartbeat thread when nothing advanced for ``interval`` seconds."""

    def __init__(self, *columns: Any, interval: float = PLAIN_INTERVAL, emit: Callable[[str], None] | None = None,
                 **kwargs: Any):
        super().__init__(*columns, **kwargs)
        self.interval = interval
        self._emit = emit
        self._units: dict[TaskID, str] = {}
        self._started: dict[TaskID, float] = {}
        self._last_line: dict[TaskID, float] = {}
        self._beat: threading.Thread | None = None
        self._beat_stop = threading.Event()

    def add_task(self, description: str, *args: Any, unit: str = "", **fields: Any) -> TaskID:
        fields.setdefault("rate", "")
        task = super().add_task(description, *args, **fields)
        self._units[task] = unit
        self._started[task] = time.monotonic()
        if self.disable:
            self._line(task)
        return task

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._after_change(task_id)
        recheck_cpu_share()  # a job that started or ended beside this one changes its threads within seconds

    def update(self, task_id: TaskID, **kwargs: Any) -> None:  # type: ignore[override]
        super().update(task_id, **kwargs)
        if "advance" in kwargs or "completed" in kwargs:
            self._after_change(task_id)

    def start(self) -> None:
        super().start()
        # A heartbeat: one slow step (a batch of a minute) must not leave the log silent.
        if self.disable and self.interval >= 1 and self._beat is None:
            self._beat_stop.clear()
            self._beat = threading.Thread(target=self._heartbeat, name="progress-lines", daemon=True)
            self._beat.start()

    def _heartbeat(self) -> None:
        while not self._beat_stop.wait(self.interval):
            for task in list(self.tasks):
                self._after_change(task.id)

    def stop(self) -> None:
        if self._beat is not None:
            self._beat_stop.set()
            self._beat.join()
            self._beat = None
        if self.disable:  # the closing line of every task that did not already end on one
            for task in self.tasks:
                if self._last_line.get(task.id) != -1.0:
                    self._line(task.id)
        super().stop()

    def _after_change(self, task_id: TaskID) -> None:
        if not self.disable:
            return
        last = self._last_line.get(task_id, 0.0)
        if last != -1.0 and time.monotonic() - last >= self.interval:
            self._line(task_id)

    def _line(self, task_id: TaskID) -> None:
        with self._lock:
            task = self._tasks[task_id]
            now = time.monotonic()
            elapsed = now - self._started.get(task_id, now)
            done, total = task.completed, task.total
            unit = self._units.get(task_id, "")
        rate = done / elapsed if elapsed > 0 and done else 0.0
        head = f"{task.description}: {_num(done)}" + (f"/{_num(total)}" if total else "") + (f" {unit}" if unit else "")
        parts = [head + (f" ({done / total:.0%})" if total else "")]
        if rate:
            parts.append(f"{rate:.2f} {unit or 'items'}/s" if rate < 100 else f"{rate:.0f} {unit or 'items'}/s")
        parts.append(f"elapsed {_clock(elapsed)}")
        if total and rate and done < total:
            parts.append(f"ETA {_clock((total - done) / rate)}")
        (self._emit or _default_emit)(", ".join(parts))
        self._last_line[task_id] = -1.0 if total and done >= total else now


def _num(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


def _default_emit(line: str) -> None:
    if log.handlers:
        log.info(line)
    else:  # logging not set up (a library call, a benchmark): still visible on stderr
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def progress(interval: float = PLAIN_INTERVAL, emit: Callable[[str], None] | None = None) -> PlainLogProgress:
    """A progress display showing done/total, percentage, rate, elapsed time and ETA: rich bars on a
    terminal, else plain lines every ``interval`` seconds (through ``emit``, default the log)."""
    return PlainLogProgress(
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
        interval=interval,
        emit=emit,
    )


def track(items: Iterable[T], description: str, total: int | None = None, *, unit: str = "",
          weight: Callable[[T], float] | None = None, interval: float = PLAIN_INTERVAL) -> Iterator[T]:
    """Iterate with progress (counts, rate, ETA): a bar on a terminal, plain lines otherwise.

    ``weight(item)`` counts an item as that many units (e.g. a batch as its chunks; ``total`` is then in
    those units)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress(interval) as bar:
        task = bar.add_task(description, total=total, unit=unit)
        for item in items:
            yield item
            bar.advance(task, weight(item) if weight else 1)
            speed = bar.tasks[task].speed
            if speed:
                bar.update(task, rate=f"{speed:.1f}/s")
