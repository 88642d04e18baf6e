"""Where jobs run: an executor launches one worker per job and reports workers that ended.

- :class:`LocalExecutor` (default): a subprocess ``python -m embedtune.platform.worker JOB_ID`` per job, in
  its own session, so a restart of the service does not take running jobs down with it.
- :class:`RayExecutor`: the same worker function as a Ray task (one fresh Ray worker process per job), so
  jobs spread over a Ray cluster; ``ray.init()`` starts a local instance when no address is given.

Both only launch, cancel and reap; job state lives in the database, written by the worker itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Protocol

from embedtune.platform.settings import PlatformSettings


class Executor(Protocol):
    name: str

    def launch(self, job_id: str, log_path: Path, attempt: int | None = None) -> int | None:
        """Start the job's worker for claim number ``attempt``; returns its pid when known here."""

    def finished(self) -> list[tuple[str, str]]:
        """(job id, how the worker ended) for workers that ended since the last call."""

    def tracks(self, job_id: str) -> bool: ...

    def cancel(self, job_id: str) -> bool:
        """Ask the worker to stop; False when this executor does not hold the job."""

    def shutdown(self) -> None: ...


def src_root() -> str:
    """The folder embedtune is imported from, so workers import the same code."""
    import embedtune

    return str(Path(embedtune.__file__).resolve().parents[1])


# What a worker or serving process inherits from the service's environment: nothing else (SECURITY.md).
# The service may hold cloud credentials, database passwords or tokens a job has no business seeing.
PASSED_ENV = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "VIRTUAL_ENV",
              "HF_HOME", "HF_HUB_CACHE", "SENTENCE_TRANSFORMERS_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
              "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
              "NUMEXPR_NUM_THREADS", "TORCH_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "PYTHONPATH",
              # the operator's core sharing (embedtune.cpu_share): workers and CLI runs count each other
              "EMBEDTUNE_THREADS", "EMBEDTUNE_CPU_SHARE_DIR", "EMBEDTUNE_OMP_FROM_CPU_SHARE")


def worker_env(settings: PlatformSettings, source: dict[str, str] | None = None) -> dict[str, str]:
    """The minimal environment of a job's worker: the variables above, the operator's allowed secrets, and
    where to find the platform (``EMBEDTUNE_PLATFORM_SETTINGS``)."""
    source = dict(os.environ if source is None else source)
    env = {k: source[k] for k in PASSED_ENV if k in source}
    env.update({k: source[k] for k in settings.allowed_secret_env if k in source})
    env.update(settings.to_env())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src_root(), env.get("PYTHONPATH")]))
    env.setdefault("PATH", os.defpath)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by signal {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


class LocalExecutor:
    name = "local"

    def __init__(self, settings: PlatformSettings):
        self.settings = settings
        self.procs: dict[str, subprocess.Popen] = {}

    def launch(self, job_id: str, log_path: Path, attempt: int | None = None) -> int:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        fence = ["--attempt", str(attempt)] if attempt is not None else []
        with log_path.open("ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "embedtune.platform.worker", job_id, *fence],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=worker_env(self.settings), start_new_session=True)
        self.procs[job_id] = proc
        return proc.pid

    def finished(self) -> list[tuple[str, str]]:
        ended = []
        for job_id, proc in list(self.procs.items()):
            code = proc.poll()
            if code is not None:
                del self.procs[job_id]
                ended.append((job_id, f"worker process {proc.pid} {describe_exit(code)}"))
        return ended

    def tracks(self, job_id: str) -> bool:
        return job_id in self.procs

    def cancel(self, job_id: str) -> bool:
        proc = self.procs.get(job_id)
        if proc is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        return True

    def shutdown(self) -> None:
        # Workers are left running on purpose: they own their jobs; a restarted service adopts them.
        self.procs.clear()


def _ray_entry(job_id: str, settings_json: str, log_path: str, env: dict[str, str],
               attempt: int | None = None) -> int:
    """Runs inside a fresh Ray worker process (max_calls=1): take the job's minimal environment (a Ray worker
    inherits the raylet's, i.e. the service's), log to the job's file, then run claim ``attempt`` of the job."""
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from embedtune.platform.worker import run_job

    return run_job(job_id, PlatformSettings.model_validate_json(settings_json), executor="ray", attempt=attempt)


class RayExecutor:
    name = "ray"

    def __init__(self, settings: PlatformSettings):
        import ray

        self.settings = settings
        self.ray = ray
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            env = {k: v for k, v in worker_env(settings).items()
                   if k in ("PYTHONPATH", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "HF_HOME")}
            ray.init(address=settings.ray_address, include_dashboard=False, ignore_reinit_error=True,
                     log_to_driver=False, runtime_env={"env_vars": env})
        self.remote = ray.remote(max_calls=1, num_cpus=1, max_retries=0)(_ray_entry)
        self.refs: dict[str, object] = {}

    def launch(self, job_id: str, log_path: Path, attempt: int | None = None) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.refs[job_id] = self.remote.remote(job_id, self.settings.model_dump_json(), str(log_path),
                                               worker_env(self.settings), attempt)
        return None

    def finished(self) -> list[tuple[str, str]]:
        if not self.refs:
            return []
        ready, _ = self.ray.wait(list(self.refs.values()), num_returns=len(self.refs), timeout=0)
        ended = []
        for job_id, ref in list(self.refs.items()):
            if ref not in ready:
                continue
            del self.refs[job_id]
            try:
                code = self.ray.get(ref)
                ended.append((job_id, f"ray task exited with code {code}"))
            except Exception as exc:  # noqa: BLE001 (a dead Ray worker surfaces as an exception here)
                ended.append((job_id, f"ray task failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"))
        return ended

    def tracks(self, job_id: str) -> bool:
        return job_id in self.refs

    def cancel(self, job_id: str) -> bool:
        ref = self.refs.get(job_id)
        if ref is None:
            return False
        self.ray.cancel(ref, force=True)
        return True

    def shutdown(self) -> None:
        self.refs.clear()
        if self.started_ray:  # a local instance we started: stop its processes with us
            self.ray.shutdown()


def make_executor(settings: PlatformSettings) -> Executor:
    return RayExecutor(settings) if settings.executor == "ray" else LocalExecutor(settings)
