"""Progress without a terminal: plain lines with counts, rate and ETA, throttled (issue 23, item 2)."""

from __future__ import annotations

import re
import time

import pytest

from embedtune import console as con


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(con.time, "monotonic", lambda: now[0])
    return now


def test_plain_lines_when_not_a_terminal_are_throttled(clock):
    assert not con.console.is_terminal  # pytest captures stderr: no terminal here
    lines: list[str] = []
    with con.progress(interval=10, emit=lines.append) as bar:
        task = bar.add_task("encoding passages", total=100, unit="passages")
        for _ in range(50):  # 50 steps, 1 s each: a line at start, then one per 10 s
            clock[0] += 1
            bar.advance(task, 2)
    assert lines[0] == "encoding passages: 0/100 passages (0%), elapsed 0:00:00"
    assert len(lines) == 6  # start, then t=10,20,30,40,50 s (the last one complete: no extra closing line)
    middle = lines[1]
    assert middle.startswith("encoding passages: 20/100 passages (20%), 2.00 passages/s, elapsed 0:00:10")
    assert middle.endswith("ETA 0:00:40")
    assert lines[-2].startswith("encoding passages: 80/100")
    assert lines[-1].startswith("encoding passages: 100/100 passages (100%)") and "ETA" not in lines[-1]


def test_closing_line_when_a_loop_ends_between_lines(clock):
    lines: list[str] = []
    with con.progress(interval=10, emit=lines.append) as bar:
        task = bar.add_task("mining", total=7)
        for _ in range(7):
            clock[0] += 0.5
            bar.update(task, advance=1)
    assert len(lines) == 2 and re.match(r"mining: 7/7 \(100%\), 2\.00 items/s, elapsed 0:00:0\d$", lines[-1])


def test_track_counts_weighted_items_and_emits_through_the_log(clock, caplog, monkeypatch):
    monkeypatch.setattr(con.log, "handlers", [caplog.handler])
    caplog.set_level(20, logger="embedtune")  # setLevel, which also clears the logger's level cache
    batches = [[1, 2, 3], [4, 5], [6]]
    seen = []
    for batch in con.track(batches, "generating queries", total=6, unit="chunks", weight=len, interval=0):
        clock[0] += 1
        seen.append(batch)
    assert seen == batches
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("generating queries: 0/6 chunks")
    assert messages[-1].startswith("generating queries: 6/6 chunks (100%), 2.00 chunks/s")


def test_unknown_total_still_reports_counts(clock):
    lines: list[str] = []
    with con.progress(interval=0, emit=lines.append) as bar:
        task = bar.add_task("reading", total=None)
        clock[0] += 2
        bar.advance(task, 4)
    assert lines[1] == "reading: 4, 2.00 items/s, elapsed 0:00:02"


def test_setup_logging_off_a_terminal_writes_plain_unwrapped_lines(monkeypatch):
    import io

    stream = io.StringIO()
    monkeypatch.setattr(con.log, "handlers", [])
    # _file, not the file property: undoing a property write would pin the console to this test's stderr
    monkeypatch.setattr(con.console, "_file", stream)
    con.setup_logging()
    try:
        con.log.info("x" * 150)
    finally:
        handlers = list(con.log.handlers)
        con.log.handlers.clear()
    assert [type(h) for h in handlers] == [con.ConsoleStreamHandler]
    line = stream.getvalue()
    assert line.count("\n") == 1 and line.rstrip().endswith("INFO " + "x" * 150)


def test_log_lines_follow_stderr_when_it_is_replaced_after_setup(monkeypatch, capsys):
    """A scheduler thread that logs after a test's captured stderr was closed wrote "--- Logging error ---
    ValueError: I/O operation on closed file": the handler must write to the stream of the moment."""
    import io
    import sys

    monkeypatch.setattr(con.log, "handlers", [])
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    con.setup_logging()
    try:
        con.log.info("to the first stream")
        first.close()
        monkeypatch.setattr(sys, "stderr", second)
        con.log.info("to the second stream")
    finally:
        con.log.handlers.clear()
    assert "to the second stream" in second.getvalue() and "Logging error" not in second.getvalue()


def test_a_slow_step_still_gets_a_line_every_interval():
    """A heartbeat reports while one long step runs (e.g. a batch that takes a minute)."""
    lines: list[str] = []
    with con.progress(interval=1, emit=lines.append) as bar:
        task = bar.add_task("generating", total=2, unit="batches")
        time.sleep(3.6)  # no advance at all (margin for a loaded machine: 2 heartbeats are due by 2 s)
        bar.advance(task, 2)
    assert lines[0].startswith("generating: 0/2 batches")
    assert sum(line.startswith("generating: 0/2") for line in lines) >= 3  # start + 2 heartbeats
    assert lines[-1].startswith("generating: 2/2 batches (100%)")
