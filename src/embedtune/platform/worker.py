"""The job worker: ``python -m embedtune.platform.worker JOB_ID`` runs one job outside the API process.

It finds the database and data folder through ``EMBEDTUNE_PLATFORM_SETTINGS`` (set by the executor),
records its pid and host, beats a heartbeat, writes progress (stage, epoch, step, loss history) to the
job's ``status_details``, and ends the job itself: completed (registering the fine-tuned model with its
lineage), failed (with the reason) or cancelled (when a cancel request reached it).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from embedtune.artifacts import RunDir, read_json, write_text
from embedtune.events import Listener, TrainingEvent, listening
from embedtune.platform import db
from embedtune.platform.settings import PlatformSettings
from embedtune.retrieval.formats import MODEL_FORMATS

LOSS_HISTORY_MAX = 500  # keep status_details small: later points thin the history


class Progress:
    """status_details kept in memory and written to the job row (throttled, forced at stage changes)."""

    def __init__(self, sessions: sessionmaker[Session], job_id: str, details: dict[str, Any],
                 attempt: int | None = None):
        self.sessions, self.job_id, self.attempt = sessions, job_id, attempt
        self.details = details
        self.lock = threading.Lock()
        self._last = 0.0

    def update(self, force: bool = False, **values: Any) -> None:
        with self.lock:
            self.details.update(values)
            if not force and time.monotonic() - self._last < 1.0:
                return
            self._last = time.monotonic()
            snapshot = dict(self.details)
        stmt = update(db.Job).where(db.Job.id == self.job_id).values(status_details=snapshot)
        if self.attempt is not None:
            stmt = stmt.where(db.Job.attempts == self.attempt)
        with self.sessions() as s:
            s.execute(stmt)
            s.commit()

    def add_loss(self, name: str, step: int, value: float, epoch: float | None) -> None:
        with self.lock:
            metrics = self.details.setdefault("metrics", {})
            history = metrics.setdefault(name, [])
            history.append({"step": step, "value": round(float(value), 6), "epoch": epoch})
            if len(history) > LOSS_HISTORY_MAX:
                metrics[name] = history[::2]


def training_listener(progress: Progress) -> Listener:
    """Records the finetune stage's :mod:`embedtune.events` on the job: steps, epochs and the loss history."""

    def listen(event: TrainingEvent) -> None:
        if event.kind == "begin":
            epochs = max(1.0, event.num_epochs or 1.0)
            progress.update(force=True, max_steps=event.max_steps, num_epochs=event.num_epochs,
                            steps_per_epoch=int(round(event.max_steps / epochs)) if event.max_steps else None)
        elif event.kind == "step":
            progress.update(step=event.step, epoch=round(event.epoch, 4), epochs_completed=int(event.epoch))
        else:
            for key, name in (("loss", "train_loss"), ("eval_loss", "val_loss")):
                if key in event.logs:
                    progress.add_loss(name, event.step, event.logs[key], event.epoch)
            progress.update(force=True, step=event.step)

    return listen


def trainer_state_losses(run: RunDir) -> list[dict[str, Any]]:
    """Loss history from the newest trainer_state.json (when no live callback recorded it)."""
    states = sorted(run.stage_dir("finetune").rglob("trainer_state.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        return []
    history = read_json(states[-1]).get("log_history", [])
    return [{"step": h.get("step"), "value": h["loss"], "epoch": h.get("epoch")} for h in history if "loss" in h]


# ------------------------------------------------------------------------------------------- the job


LOST_LEASE_EXIT = 3  # the job was failed or re-queued while this worker was out of touch


class Heartbeat(threading.Thread):
    """Renews the job's lease every few seconds; ends the process when the job is cancelled or taken over."""

    def __init__(self, sessions: sessionmaker[Session], job_id: str, every: float, attempt: int | None = None):
        super().__init__(daemon=True, name="heartbeat")
        self.sessions, self.job_id, self.every, self.attempt = sessions, job_id, every, attempt
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                status = beat(self.sessions, self.job_id, self.attempt)
            except Exception:  # noqa: BLE001 (a missed beat is retried; the job must go on)
                logging.getLogger("embedtune").exception("heartbeat failed")
                continue
            if self.stop.is_set():  # the job ended meanwhile: its own code records how
                return
            if status == "cancelling":
                finish_cancelled(self.sessions, self.job_id, self.attempt)
            elif status is None:
                print(f"job {self.job_id}: attempt {self.attempt} no longer holds the job (its lease went stale "
                      "and the service failed or re-queued it): stopping", flush=True)
                os._exit(LOST_LEASE_EXIT)


def beat(sessions: sessionmaker[Session], job_id: str, attempt: int | None = None) -> str | None:
    """Renew the lease; the job's status, or None when this attempt no longer holds the job."""
    stmt = update(db.Job).where(db.Job.id == job_id, db.Job.status.in_(db.ACTIVE))
    if attempt is not None:
        stmt = stmt.where(db.Job.attempts == attempt)
    with sessions() as s:
        held = s.execute(stmt.values(heartbeat_at=time.time())).rowcount == 1
        s.commit()
        return s.scalar(select(db.Job.status).where(db.Job.id == job_id)) if held else None


def finish_cancelled(sessions: sessionmaker[Session], job_id: str, attempt: int | None = None) -> None:
    with sessions() as s:
        db.transition(s, job_id, ("cancelling", "running"), attempt=attempt, status="cancelled",
                      error="cancelled by request")
    print(f"job {job_id} cancelled", flush=True)
    os._exit(0)  # the stage may be deep inside a training step: leave now, the run dir stays resumable


def run_job(job_id: str, settings: PlatformSettings, executor: str = "local", attempt: int | None = None) -> int:
    """Run one claimed job; ``attempt`` is the claim the service launched this worker for (None: any)."""
    settings.prepare()
    engine = db.make_engine(settings.database_url, migrate=False)
    sessions = db.session_factory(engine)
    with sessions() as s:
        job = s.get(db.Job, job_id)
        if job is None:
            print(f"job {job_id} not found", file=sys.stderr)
            return 2
        claimed = db.transition(s, job_id, "running", attempt=attempt, worker_pid=os.getpid(),
                                worker_host=socket.gethostname(), executor=executor, heartbeat_at=time.time(),
                                started_at=db.utcnow())
        if not claimed:
            print(f"job {job_id} is {job.status} at attempt {job.attempts}, not running for attempt {attempt}: "
                  "nothing to do", file=sys.stderr)
            return 0
        s.refresh(job)
    print(f"job {job_id} attempt {job.attempts} started by worker pid {os.getpid()}", flush=True)
    _setup_logging()
    signal.signal(signal.SIGTERM, lambda *_: _on_sigterm(sessions, job_id, attempt))
    heartbeat = Heartbeat(sessions, job_id, settings.heartbeat_seconds, attempt)
    heartbeat.start()
    progress = Progress(sessions, job_id, dict(job.status_details or {}), attempt)
    try:
        if job.kind == "evaluation":
            from embedtune.platform.evaluation import run_evaluation

            result = run_evaluation(job, sessions, settings, progress)
            output_model = None
        else:
            result, output_model = run_customization(job, sessions, progress)
    except BaseException as exc:  # noqa: BLE001 (every failure must reach the job row)
        heartbeat.stop.set()
        traceback.print_exc()
        sys.stdout.flush()
        reason = f"{type(exc).__name__}: {exc}".strip()
        with sessions() as s:
            db.transition(s, job_id, ("running",), attempt=attempt, status="failed", error=reason[:4000])
            db.transition(s, job_id, ("cancelling",), attempt=attempt, status="cancelled",
                          error="cancelled by request")
        return 1
    heartbeat.stop.set()
    progress.update(force=True, stage="done")
    with sessions() as s:
        done = db.transition(s, job_id, ("running",), attempt=attempt, status="completed", result=result,
                             output_model=output_model)
        if not done:  # a cancel arrived during the last moments: honour it
            db.transition(s, job_id, ("cancelling",), attempt=attempt, status="cancelled",
                          error="cancelled by request")
    print(f"job {job_id} {'completed' if done else 'cancelled'}", flush=True)
    return 0


def _on_sigterm(sessions: sessionmaker[Session], job_id: str, attempt: int | None) -> None:
    with sessions() as s:
        status = s.scalar(select(db.Job.status).where(db.Job.id == job_id))
    if status == "cancelling":
        finish_cancelled(sessions, job_id, attempt)
    with sessions() as s:
        db.transition(s, job_id, ("running",), attempt=attempt, status="failed", error="worker received SIGTERM")
    os._exit(143)


def _setup_logging() -> None:
    from embedtune.console import setup_logging

    setup_logging(False)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_customization(job: db.Job, sessions: sessionmaker[Session], progress: Progress) -> tuple[dict, str | None]:
    from embedtune.config import Recipe, dump_recipe
    from embedtune.pipeline import StageResult, run_pipeline

    recipe = Recipe.model_validate(job.recipe)
    run = RunDir(job.run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    write_text(run.root / "recipe.yaml", dump_recipe(recipe))
    if job.stages[0] == "finetune":
        seed_prepared_training_set(run, job.spec["_training_path"])
    summary: dict[str, Any] = {}
    done: list[str] = list(progress.details.get("stages_completed", []))

    def starting(name: str) -> None:
        progress.update(force=True, stage=name, stages=job.stages, stages_completed=list(done))
        print(f"=== stage {name}", flush=True)

    def finished(r: StageResult) -> None:
        summary[r.name] = {"seconds": round(r.seconds, 2), "skipped": r.manifest.skipped,
                           "counts": r.manifest.counts, "metrics": r.manifest.metrics}
        done.append(r.name)
        progress.update(force=True, stages_completed=list(done),
                        stage_counts={**progress.details.get("stage_counts", {}), r.name: r.manifest.counts})

    with listening(training_listener(progress)):
        run_pipeline(recipe, run.root, stages=job.stages, on_stage=starting, on_stage_done=finished)
    if "finetune" in job.stages and not progress.details.get("metrics", {}).get("train_loss"):
        metrics = {**progress.details.get("metrics", {}), "train_loss": trainer_state_losses(run)}
        progress.update(force=True, metrics=metrics)
    result: dict[str, Any] = {"stages": summary, "run_dir": str(run.root)}
    eval_results = run.path("eval", "results.json")
    if eval_results.is_file():
        result["eval"] = read_json(eval_results)
    output_model = register_output_model(job, run, result, sessions) if "finetune" in job.stages else None
    return result, output_model


def seed_prepared_training_set(run: RunDir, training_path: str) -> None:
    """A prepared training set stands in for the prep stage: copy it in and record a manifest."""
    import shutil

    st = run.stage("prep", {"source": "platform-dataset"}, inputs=[training_path])
    if st.up_to_date() is not None:
        return
    target = st.dir / "train.jsonl"
    shutil.copyfile(training_path, target)
    examples = sum(1 for line in target.read_text(encoding="utf-8").splitlines() if line.strip())
    st.finish(outputs=[target], counts={"examples": examples})


def register_output_model(job: db.Job, run: RunDir, result: dict, sessions: sessionmaker[Session]) -> str:
    from embedtune.platform.jobs import hyperparameters_of

    folder = run.path("finetune", "model")
    if not folder.is_dir():
        raise RuntimeError(f"the finetune stage finished without a model folder at {folder}")
    metrics = {}
    if "eval" in result:
        metrics = {"base": result["eval"].get("base"), "finetuned": result["eval"].get("finetuned"),
                   # The release gate's verdict on this fine-tune: a deployment of it must name force=true
                   # when the gate kept the base model (what the deploy stage would have done).
                   "release": result["eval"].get("release")}
    artifacts = {"model": str(folder)}
    for name in (f.file for f in MODEL_FORMATS.values()):
        if run.path("export", name).is_file():
            artifacts[name] = str(run.path("export", name))
    name = job.spec["_output_model"]
    with sessions() as s:
        model = s.scalar(select(db.Model).where(db.Model.workspace == job.workspace, db.Model.name == name))
        if model is not None and model.job_id != job.id:
            raise RuntimeError(f"model '{name}' was registered meanwhile by another job ({model.job_id})")
        model = model or db.Model(workspace=job.workspace, name=name, kind="customized")
        model.path, model.base_model, model.dataset = str(folder), job.spec["_base_model"], \
            job.spec["_training_dataset"]
        model.job_id, model.hyperparameters, model.metrics = job.id, hyperparameters_of(job.recipe), metrics
        model.artifacts, model.description = artifacts, f"fine-tuned by job {job.id}"
        s.add(model)
        s.commit()
    return name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embedtune.platform.worker", description=__doc__)
    parser.add_argument("job_id")
    parser.add_argument("--attempt", type=int, default=None,
                        help="the claim this worker runs; it stops if the job was claimed again since")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run_job(args.job_id, PlatformSettings.from_env(), attempt=args.attempt)


if __name__ == "__main__":
    sys.exit(main())
