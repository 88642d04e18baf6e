"""What every router uses: the platform state, a database session, the caller, workspace access, lookups."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from embedtune.platform import db
from embedtune.platform.auth import ANONYMOUS, Principal, unauthorized
from embedtune.platform.errors import ErrorBody, PlatformError, not_found
from embedtune.platform.jobs import hyperparameters_of
from embedtune.platform.schemas import JobOut, WorkerOut
from embedtune.platform.state import Platform

ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 422, 429)}
# Declares the scheme in the OpenAPI spec (and /docs' "Authorize" button); the check itself is done by
# :class:`embedtune.platform.app.AuthMiddleware` before the body is read, and :func:`principal` reads its result.
bearer = HTTPBearer(auto_error=False, description="an API key: `embedtune platform keys create`")


def platform(request: Request) -> Platform:
    return request.app.state.platform


def session(p: Annotated[Platform, Depends(platform)]) -> Iterator[Session]:
    with p.sessions() as s:
        yield s


def principal(request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal:
    who = getattr(request.state, "principal", None)
    if who is None:
        if not request.app.state.platform.settings.auth:
            return ANONYMOUS
        raise unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    return who


P = Annotated[Platform, Depends(platform)]
S = Annotated[Session, Depends(session)]
Who = Annotated[Principal, Depends(principal)]


def visible_workspace(s: Session, who: Principal, name: str) -> db.Workspace:
    """The workspace, if it exists and the caller may use it; otherwise 404 (no hint which of the two)."""
    ws = s.get(db.Workspace, name) if who.can_use(name) else None
    if ws is None:
        raise not_found("workspace", name)
    return ws


def workspace_access(workspace: str, who: Who, s: S) -> str:
    return visible_workspace(s, who, workspace).name


WS = Annotated[str, Depends(workspace_access)]


def require_admin(who: Who) -> Principal:
    if not who.admin:
        raise PlatformError(403, "this route needs an admin key", code="forbidden")
    return who


Admin = Annotated[Principal, Depends(require_admin)]


def split_ref(ref: str, workspace: str) -> tuple[str, str]:
    """``name`` or ``workspace/name``."""
    if "/" in ref:
        ws, _, name = ref.partition("/")
        return ws, name
    return workspace, ref


Row = TypeVar("Row", db.Dataset, db.Model)


def list_named(s: Session, table: type[Row], workspace: str, order=None) -> list[Row]:  # noqa: ANN001
    q = select(table).where(table.workspace == workspace).order_by(order if order is not None else table.name)
    return list(s.scalars(q).all())


def find_named(s: Session, who: Principal, table: type[Row], workspace: str, ref: str, param: str) -> Row:
    """A dataset or model by ``name`` or ``workspace/name``; another workspace only if the caller may use it."""
    kind = table.__tablename__.rstrip("s")
    ws, name = split_ref(ref, workspace)
    row = None
    if who.can_use(ws):
        row = s.scalar(select(table).where(table.workspace == ws, table.name == name))
    if row is None:
        err = not_found(kind, name, ws)
        err.param = param
        raise err
    return row


def find_dataset(s: Session, who: Principal, workspace: str, ref: str, param: str = "dataset") -> db.Dataset:
    return find_named(s, who, db.Dataset, workspace, ref, param)


def find_model(s: Session, who: Principal, workspace: str, ref: str, param: str = "model") -> db.Model:
    return find_named(s, who, db.Model, workspace, ref, param)


def find_job(s: Session, workspace: str, job_id: str, kind: str) -> db.Job:
    job = s.get(db.Job, job_id)
    if job is None or job.workspace != workspace or job.kind != kind:
        raise not_found(f"{kind} job", job_id, workspace)
    return job


def find_deployment(s: Session, workspace: str, name: str) -> db.Deployment:
    dep = s.scalar(select(db.Deployment).where(db.Deployment.workspace == workspace, db.Deployment.name == name))
    if dep is None or dep.status == "deleted":
        raise not_found("deployment", name, workspace)
    return dep


def job_out(job: db.Job) -> JobOut:
    spec = job.spec or {}
    if job.kind == "customization":
        model = spec.get("_base_model")
        dataset: dict | str | None = {"training": spec.get("_training_dataset"),
                                      "validation": spec.get("_validation_dataset")}
        hyper = hyperparameters_of(job.recipe)
    else:
        model, dataset, hyper = spec.get("model") or spec.get("deployment"), spec.get("dataset"), {}
    worker = WorkerOut(executor=job.executor, pid=job.worker_pid, host=job.worker_host,
                       heartbeat_at=job.heartbeat_at, attempts=job.attempts)
    return JobOut(id=job.id, workspace=job.workspace, kind=job.kind, name=job.name, status=job.status,
                  status_details=job.status_details or {}, model=model, dataset=dataset, stages=job.stages,
                  hyperparameters=hyper, output_model=job.output_model, result=job.result or {},
                  error=job.error, worker=worker, created_at=job.created_at, updated_at=job.updated_at,
                  started_at=job.started_at, finished_at=job.finished_at)


def enqueue(p: Platform, s: Session, job: db.Job) -> db.Job:
    """created -> pending once the job is recorded and its folder exists; the scheduler takes it from there."""
    s.add(job)
    s.commit()
    os.makedirs(p.settings.data_dir / "jobs" / job.id, exist_ok=True)
    db.transition(s, job.id, "created", status="pending")
    s.refresh(job)
    if p.scheduler is not None:
        p.scheduler.nudge()
    return job
