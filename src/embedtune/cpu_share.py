"""The machine's cores shared fairly between the embedtune jobs running on it.

Torch and onnxruntime each default to one thread per core, and torch's OpenMP threads spin while they wait.
Two pipeline runs on 2 cores then run 4 busy threads on 2 cores: sdg fell from 0.70 chunks/s alone to 0.04
and 0.10 side by side (issue 30). Each job here registers itself for as long as it runs, and uses
``cores // jobs`` threads; it looks again at every stage and every few seconds of a long loop, so a job that
starts or ends changes the others' threads within seconds.

The registry is a folder of lock files, one per job, each held with ``flock`` by its process: the kernel
drops the lock when the process dies (even by ``kill -9``), so a dead job is never counted. CLI runs,
platform workers and benchmarks all register; ``embedtune serve`` does not (it is idle most of the time,
and a job should not run at half speed beside an idle server).

An explicit thread count wins: ``EMBEDTUNE_THREADS`` (or ``OMP_NUM_THREADS``) set for a process fixes its
threads; it still counts as a job for the others.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("embedtune")

#: How often a long loop looks at the registry again (seconds).
RECHECK_SECONDS = 5.0
#: Marks an OMP_NUM_THREADS this module set, so neither this process nor its children take it for the user's.
_SET_BY_SHARE = "EMBEDTUNE_OMP_FROM_CPU_SHARE"


def available_cores() -> int:
    """The cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def pinned_threads() -> int | None:
    """The thread count the user fixed for this process, if any (not the one this module set itself)."""
    for name in ("EMBEDTUNE_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if name == "OMP_NUM_THREADS" and value and value == os.environ.get(_SET_BY_SHARE):
            continue  # set by a share (here or in a parent process), not by the user
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def registry_dir() -> Path:
    """One folder per user and machine (``EMBEDTUNE_CPU_SHARE_DIR`` moves it; an operator's setting)."""
    configured = os.environ.get("EMBEDTUNE_CPU_SHARE_DIR")
    return Path(configured) if configured else Path(tempfile.gettempdir()) / f"embedtune-cpu-share-{os.getuid()}"


class CpuShare:
    """This process's place among the running jobs (a context manager)."""

    def __init__(self, directory: str | Path | None = None, cores: int | None = None):
        self.directory = Path(directory) if directory is not None else registry_dir()
        self.cores = cores or available_cores()
        self._file: int | None = None
        self._path: Path | None = None
        self._owner = threading.get_ident()
        self._checked = 0.0
        self.threads: int | None = None

    def __enter__(self) -> CpuShare:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"{os.getpid()}-", suffix=".lock", dir=self.directory)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh file: nobody else holds it
        self._file, self._path = fd, Path(name)
        self._owner = threading.get_ident()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()  # type: ignore[union-attr]
            os.close(self._file)  # releases the lock
            self._file = self._path = None

    def jobs(self) -> int:
        """The jobs running now, this one included; a lock no process holds is a dead job's, and is removed."""
        live = sum(1 for path in self.directory.glob("*.lock") if path == self._path or _held(path))
        return max(live, 1)

    def fair_threads(self) -> int:
        return pinned_threads() or max(1, self.cores // self.jobs())

    def apply(self) -> int:
        """Set torch's threads to this job's share now (from the thread that entered the share)."""
        self._checked = time.monotonic()
        threads = self.fair_threads()
        if threads != self.threads and threading.get_ident() == self._owner:
            _set_torch_threads(threads)
            if self.threads is not None or threads < self.cores:
                log.info("%d embedtune job(s) on %d cores: %d thread(s) for this one", self.jobs(), self.cores,
                         threads)
            self.threads = threads
        return threads

    def apply_if_due(self) -> None:
        if time.monotonic() - self._checked >= RECHECK_SECONDS:
            self.apply()


def _held(path: Path) -> bool:
    """Whether a live process holds ``path``'s lock; a stale file is removed."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:  # its process is gone
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return False
    finally:
        os.close(fd)


def _set_torch_threads(n: int) -> None:
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)
    else:  # not imported yet: it sizes its thread pool from OMP_NUM_THREADS when it is
        os.environ["OMP_NUM_THREADS"] = os.environ[_SET_BY_SHARE] = str(n)


_active: CpuShare | None = None


@contextlib.contextmanager
def sharing_cores(directory: str | Path | None = None) -> Iterator[CpuShare]:
    """Register this process as a job for the block (nested calls reuse the outer registration)."""
    global _active
    if _active is not None:
        _active.apply()
        yield _active
        return
    with CpuShare(directory) as share:
        _active = share
        try:
            share.apply()
            yield share
        finally:
            _active = None


def current_threads() -> int:
    """The threads a new engine (an onnxruntime session) should use: this job's share, else every core."""
    if _active is not None:
        return _active.fair_threads()
    return pinned_threads() or available_cores()


def recheck() -> None:
    """Called by long loops (the progress display): follow the other jobs within seconds."""
    if _active is not None:
        _active.apply_if_due()
