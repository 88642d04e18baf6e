"""Customization jobs, and the routes every job kind shares (list, get, status, logs, cancel)."""

from __future__ import annotations

import os
from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select
from sqlalchemy.orm import Session

from embedtune.platform import db, quotas
from embedtune.platform.auth import Principal, audit
from embedtune.platform.errors import PlatformError
from embedtune.platform.jobs import CustomizationJobCreate, build_recipe, choose_stages
from embedtune.platform.routes.common import (
    ERRORS,
    WS,
    P,
    S,
    Who,
    enqueue,
    find_dataset,
    find_job,
    find_model,
    job_out,
    visible_workspace,
)
from embedtune.platform.sandbox import DatasetResolver, check_final, check_recipe
from embedtune.platform.scheduler import job_log_path
from embedtune.platform.schemas import JobLogsOut, JobOut, JobStatusOut, ListOf
from embedtune.platform.state import DEFAULT_WORKSPACE, Platform

router = APIRouter(tags=["customization"], responses=ERRORS)
LOG_LIMIT = 1 << 20


def dataset_resolver(s: Session, who: Principal, workspace: str) -> DatasetResolver:
    """A recipe's dataset reference -> the folder of that dataset (404 when the caller may not see it)."""

    def resolve(ref: str, param: str, formats: list[str]) -> str:
        row = find_dataset(s, who, workspace, ref, param=param)
        if formats and row.format not in formats:
            raise PlatformError(422, f"dataset '{row.name}' is '{row.format}'; {param} needs "
                                     f"{' or '.join(formats)}", param=param, code="invalid_value")
        return row.path

    return resolve


def create_customization(workspace: str, body: CustomizationJobCreate, who: Principal, p: Platform,
                         s: Session) -> db.Job:
    quotas.check_jobs(s, p.settings, workspace)
    quotas.check_bytes(s, p.settings, workspace)  # a job writes its outputs into the workspace's share
    base = find_model(s, who, workspace, body.base_model)
    train = find_dataset(s, who, workspace, body.training_dataset)
    val = find_dataset(s, who, workspace, body.validation_dataset) if body.validation_dataset else None
    if val is not None and val.format != "beir":
        raise PlatformError(422, f"validation dataset '{val.name}' must be BEIR (it is '{val.format}')",
                            param="dataset.validation", code="invalid_value")
    stages = choose_stages(body.stages, train.format, val is not None)
    job_id = db.new_id("cust")
    output = None
    if "finetune" in stages:
        output = body.output_name or f"{base.name}-{job_id.split('-')[1][:8]}"
        taken = s.scalar(select(db.Model.id).where(db.Model.workspace == workspace, db.Model.name == output))
        if taken:
            raise PlatformError(409, f"model '{output}' already exists in workspace '{workspace}'",
                                param="output.name", code="already_exists")
    resolved = check_recipe(body.recipe, p.settings, dataset_resolver(s, who, workspace))
    recipe = build_recipe(body, job_id=job_id, model_path=base.path, dataset_format=train.format,
                          dataset_path=train.path, validation_path=val.path if val else None, resolved=resolved)
    check_final(recipe, p.settings)
    spec = body.model_dump(mode="json", exclude_none=True)
    spec.update(_base_model=base.name, _training_dataset=train.name, _training_path=train.path,
                _validation_dataset=val.name if val else None, _output_model=output)
    run_dir = p.settings.data_dir / "jobs" / job_id / "run"
    job = db.Job(id=job_id, workspace=workspace, kind="customization", name=body.name or job_id,
                 status="created", spec=spec, recipe=recipe, stages=stages, run_dir=str(run_dir),
                 status_details={"stage": None, "stages": stages, "stages_completed": []})
    audit(s, who, "create", "job", job_id, workspace=workspace, detail={"kind": "customization", "stages": stages})
    return enqueue(p, s, job)


@router.post("/v2/workspaces/{workspace}/customization/jobs", response_model=JobOut, status_code=201)
def create_customization_job(workspace: WS, body: CustomizationJobCreate, who: Who, p: P, s: S) -> JobOut:
    return job_out(create_customization(workspace, body, who, p, s))


@router.post("/apis/customization/v2/workspaces/{workspace}/automodel/jobs", response_model=JobOut,
             status_code=201, summary="NeMo Platform v2 path (same body and behaviour)")
def create_automodel_job(workspace: WS, body: CustomizationJobCreate, who: Who, p: P, s: S) -> JobOut:
    return job_out(create_customization(workspace, body, who, p, s))


@router.post("/v1/customization/jobs", response_model=JobOut, status_code=201,
             summary="Older Customizer path: the workspace is the dataset's namespace")
def create_customization_job_v1(body: CustomizationJobCreate, who: Who, p: P, s: S) -> JobOut:
    workspace = DEFAULT_WORKSPACE
    if not isinstance(body.dataset, str) and body.dataset.namespace:
        workspace = body.dataset.namespace
    visible_workspace(s, who, workspace)
    return job_out(create_customization(workspace, body, who, p, s))


def add_job_routes(router: APIRouter, prefix: str, kind: str) -> None:
    @router.get(prefix, response_model=ListOf[JobOut], name=f"list_{kind}_jobs")
    def list_jobs(workspace: WS, s: S, status: Annotated[str | None, Query(max_length=32)] = None) -> dict:
        q = select(db.Job).where(db.Job.workspace == workspace, db.Job.kind == kind)
        if status:
            q = q.where(db.Job.status == status)
        return {"data": [job_out(j) for j in s.scalars(q.order_by(db.Job.created_at.desc())).all()]}

    @router.get(prefix + "/{job_id}", response_model=JobOut, name=f"get_{kind}_job")
    def get_job(workspace: WS, job_id: str, s: S) -> JobOut:
        return job_out(find_job(s, workspace, job_id, kind))

    @router.get(prefix + "/{job_id}/status", response_model=JobStatusOut, name=f"get_{kind}_job_status")
    def get_status(workspace: WS, job_id: str, s: S) -> JobStatusOut:
        job = find_job(s, workspace, job_id, kind)
        return JobStatusOut(id=job.id, status=job.status, status_details=job.status_details or {}, error=job.error)

    @router.get(prefix + "/{job_id}/logs", response_model=JobLogsOut, name=f"get_{kind}_job_logs")
    def get_logs(workspace: WS, job_id: str, p: P, s: S,
                 tail: Annotated[int | None, Query(ge=1, le=1_000_000, description="last N lines only")] = None,
                 ) -> JobLogsOut:
        job = find_job(s, workspace, job_id, kind)
        path = job_log_path(p.settings, job.id)
        size = path.stat().st_size if path.is_file() else 0
        with (path.open("rb") if size else open(os.devnull, "rb")) as fh:
            fh.seek(max(0, size - LOG_LIMIT))
            content = fh.read().decode("utf-8", errors="replace")
        if tail:
            content = "\n".join(content.splitlines()[-tail:])
        return JobLogsOut(id=job.id, logs=content, size_bytes=size, truncated=size > LOG_LIMIT)

    @router.post(prefix + "/{job_id}/cancel", response_model=JobOut, name=f"cancel_{kind}_job")
    def cancel(workspace: WS, job_id: str, who: Who, p: P, s: S) -> JobOut:
        job = find_job(s, workspace, job_id, kind)
        if db.transition(s, job.id, ("created", "pending"), status="cancelled", error="cancelled by request"):
            pass
        elif db.transition(s, job.id, "running", status="cancelling"):
            if p.scheduler is not None:
                p.scheduler.cancel(job.id)
        elif job.status in db.TERMINAL:
            raise PlatformError(409, f"job {job.id} is already {job.status}", code="job_finished")
        audit(s, who, "cancel", "job", job.id, workspace=workspace, detail={"kind": kind})
        s.commit()
        s.refresh(job)
        return job_out(job)


add_job_routes(router, "/v2/workspaces/{workspace}/customization/jobs", "customization")
