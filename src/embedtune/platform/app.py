"""The platform service: FastAPI routes over the database, the executor and the deployment manager.

Nothing here runs a pipeline stage: jobs go to worker processes through the scheduler; route handlers only
validate, record and signal.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Literal

import httpx
from fastapi import APIRouter, Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from sqlalchemy import delete, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from embedtune import __version__
from embedtune.platform import datasets as ds
from embedtune.platform import db
from embedtune.platform.deployments import DeploymentManager
from embedtune.platform.errors import ErrorBody, PlatformError, error_response, install_handlers, not_found
from embedtune.platform.executors import make_executor
from embedtune.platform.jobs import (
    CustomizationJobCreate,
    EvaluationJobCreate,
    build_recipe,
    choose_stages,
    hyperparameters_of,
)
from embedtune.platform.scheduler import Scheduler, job_log_path
from embedtune.platform.schemas import (
    DatasetOut,
    DatasetRegister,
    DeploymentCreate,
    DeploymentOut,
    Health,
    JobLogsOut,
    JobOut,
    JobStatusOut,
    ListOf,
    ModelOut,
    ModelRegister,
    WorkerOut,
    WorkspaceCreate,
    WorkspaceOut,
)
from embedtune.platform.settings import PlatformSettings

DEFAULT_WORKSPACE = "default"
LOG_LIMIT = 1 << 20
ERRORS = {code: {"model": ErrorBody} for code in (400, 404, 409, 413, 422)}


class Platform:
    """What the routes share: settings, database sessions, scheduler, deployments, an HTTP client."""

    def __init__(self, settings: PlatformSettings):
        self.settings = settings.prepare()
        self.engine = db.make_engine(settings.database_url)
        self.sessions = db.session_factory(self.engine)
        self.deployments = DeploymentManager(settings, self.sessions)
        self.scheduler: Scheduler | None = None
        self.http: httpx.AsyncClient | None = None

    def start(self) -> None:
        with self.sessions() as s:
            ensure_workspace(s, DEFAULT_WORKSPACE, "created by the service")
        self.scheduler = Scheduler(self.settings, self.sessions, make_executor(self.settings), self.deployments)
        self.scheduler.start()
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(300, connect=10))

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.aclose()
        if self.scheduler is not None:
            self.scheduler.shutdown()
        self.engine.dispose()


def ensure_workspace(s: Session, name: str, description: str = "") -> db.Workspace:
    ws = s.get(db.Workspace, name)
    if ws is None:
        ws = db.Workspace(name=name, description=description)
        s.add(ws)
        # Every workspace can start from the shipped default model.
        s.add(db.Model(workspace=name, name="default", kind="base", path="default",
                       description="all-MiniLM-L6-v2, shipped in a wheel (offline)"))
        s.commit()
    return ws


# ------------------------------------------------------------------------------------------ plumbing


def platform(request: Request) -> Platform:
    return request.app.state.platform


def session(p: Annotated[Platform, Depends(platform)]) -> Iterator[Session]:
    with p.sessions() as s:
        yield s


P = Annotated[Platform, Depends(platform)]
S = Annotated[Session, Depends(session)]


def workspace_of(s: Session, name: str) -> db.Workspace:
    ws = s.get(db.Workspace, name)
    if ws is None:
        raise not_found("workspace", name)
    return ws


def split_ref(ref: str, workspace: str) -> tuple[str, str]:
    """``name`` or ``workspace/name``."""
    if "/" in ref:
        ws, _, name = ref.partition("/")
        return ws, name
    return workspace, ref


def find_dataset(s: Session, workspace: str, ref: str, param: str = "dataset") -> db.Dataset:
    ws, name = split_ref(ref, workspace)
    row = s.scalar(select(db.Dataset).where(db.Dataset.workspace == ws, db.Dataset.name == name))
    if row is None:
        err = not_found("dataset", name, ws)
        err.param = param
        raise err
    return row


def find_model(s: Session, workspace: str, ref: str, param: str = "model") -> db.Model:
    ws, name = split_ref(ref, workspace)
    row = s.scalar(select(db.Model).where(db.Model.workspace == ws, db.Model.name == name))
    if row is None:
        err = not_found("model", name, ws)
        err.param = param
        raise err
    return row


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


# -------------------------------------------------------------------------------------------- routes

health = APIRouter(tags=["health"])
workspaces = APIRouter(prefix="/v2/workspaces", tags=["workspaces"], responses=ERRORS)
datasets = APIRouter(prefix="/v2/workspaces/{workspace}/datasets", tags=["datasets"], responses=ERRORS)
models = APIRouter(prefix="/v2/workspaces/{workspace}/models", tags=["models"], responses=ERRORS)
customization = APIRouter(tags=["customization"], responses=ERRORS)
evaluation = APIRouter(prefix="/v2/workspaces/{workspace}/evaluation/jobs", tags=["evaluation"],
                       responses=ERRORS)
deployments = APIRouter(prefix="/v2/workspaces/{workspace}/deployments", tags=["deployments"], responses=ERRORS)
gateway = APIRouter(prefix="/v2/workspaces/{workspace}/inference/gateway", tags=["inference"], responses=ERRORS)


@health.get("/v1/health/live", response_model=Health)
def live(p: P) -> Health:
    return Health(status="live", database="unchecked", executor=p.settings.executor)


@health.get("/v1/health/ready", response_model=Health)
def ready(p: P, s: S) -> Health:
    s.execute(text("SELECT 1"))
    return Health(status="ready", database="ok", executor=p.settings.executor)


# ---- workspaces


@workspaces.post("", response_model=WorkspaceOut, status_code=201)
def create_workspace(body: WorkspaceCreate, s: S) -> db.Workspace:
    if s.get(db.Workspace, body.name) is not None:
        raise PlatformError(409, f"workspace '{body.name}' already exists", param="name", code="already_exists")
    return ensure_workspace(s, body.name, body.description)


@workspaces.get("", response_model=ListOf[WorkspaceOut])
def list_workspaces(s: S) -> dict:
    return {"data": s.scalars(select(db.Workspace).order_by(db.Workspace.name)).all()}


@workspaces.get("/{workspace}", response_model=WorkspaceOut)
def get_workspace(workspace: str, s: S) -> db.Workspace:
    return workspace_of(s, workspace)


@workspaces.delete("/{workspace}", status_code=204)
def delete_workspace(workspace: str, p: P, s: S) -> Response:
    workspace_of(s, workspace)
    busy = s.scalar(select(db.Job.id).where(db.Job.workspace == workspace,
                                            db.Job.status.in_(("created", "pending", *db.ACTIVE))))
    live_dep = s.scalar(select(db.Deployment.id).where(db.Deployment.workspace == workspace,
                                                       db.Deployment.status.in_(("pending", "ready"))))
    if busy or live_dep:
        raise PlatformError(409, f"workspace '{workspace}' has active jobs or deployments", code="in_use")
    for d in s.scalars(select(db.Dataset).where(db.Dataset.workspace == workspace)).all():
        shutil.rmtree(p.settings.data_dir / "datasets" / d.id, ignore_errors=True)
    for table in (db.Dataset, db.Model, db.Job, db.Deployment):
        s.execute(delete(table).where(table.workspace == workspace))
    s.execute(delete(db.Workspace).where(db.Workspace.name == workspace))
    s.commit()
    return Response(status_code=204)


# ---- datasets


def _check_new_dataset(s: Session, workspace: str, name: str) -> None:
    workspace_of(s, workspace)
    if s.scalar(select(db.Dataset.id).where(db.Dataset.workspace == workspace, db.Dataset.name == name)):
        raise PlatformError(409, f"dataset '{name}' already exists in workspace '{workspace}'", param="name",
                            code="already_exists")


def _record_dataset(s: Session, row: db.Dataset, folder) -> db.Dataset:  # noqa: ANN001
    s.add(row)
    try:
        s.commit()
    except IntegrityError:
        s.rollback()
        shutil.rmtree(folder, ignore_errors=True)
        raise PlatformError(409, f"dataset '{row.name}' already exists", param="name", code="already_exists") from None
    return row


@datasets.post("", response_model=DatasetOut, status_code=201,
               summary="Upload a dataset (multipart: one archive, or the files themselves)")
def upload_dataset(
    workspace: str,
    p: P,
    s: S,
    name: Annotated[str, Form(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,255}$")],
    files: Annotated[list[UploadFile], File(description=".tar.gz/.tgz/.tar/.zip of a folder, or files")],
    format: Annotated[Literal["corpus", "beir", "training"], Form()] = "corpus",  # noqa: A002
    description: Annotated[str, Form()] = "",
) -> db.Dataset:
    _check_new_dataset(s, workspace, name)
    settings = p.settings
    dataset_id = db.new_id("dataset")
    final = settings.data_dir / "datasets" / dataset_id
    with ds.staging_dir(settings.data_dir / "datasets") as staging:
        content = staging / "files"
        content.mkdir()
        budget = settings.max_upload_bytes
        for upload in files:
            filename = upload.filename or "upload"
            rel = ds.safe_member_path(filename)
            if ds.is_archive(filename) and len(files) == 1:
                archive = staging / "upload.archive"
                budget -= ds.copy_limited(upload.file, archive, budget, "the upload")
                ds.extract_archive(archive, filename, content, settings)
                archive.unlink()
            else:
                (content / rel).parent.mkdir(parents=True, exist_ok=True)
                budget -= ds.copy_limited(upload.file, content / rel, budget, "the upload")
        root = ds.single_root(content)
        path, stats = ds.validate(format, root, staging, name)
        size = ds.folder_size(staging)
        os.rename(staging, final)
    row = db.Dataset(id=dataset_id, workspace=workspace, name=name, format=format, source="upload",
                     path=str(final / path.relative_to(staging)), description=description, size_bytes=size,
                     stats=stats)
    return _record_dataset(s, row, final)


@datasets.post("/register", response_model=DatasetOut, status_code=201,
               summary="Register a file or folder already on the service's machine")
def register_dataset(workspace: str, body: DatasetRegister, p: P, s: S) -> db.Dataset:
    _check_new_dataset(s, workspace, body.name)
    if not p.settings.allow_path_registration:
        raise PlatformError(403, "this service does not accept server paths; upload the files",
                            param="path", code="forbidden")
    src = os.path.abspath(os.path.expanduser(body.path))
    if not os.path.exists(src):
        raise PlatformError(422, f"path does not exist on the service's machine: {body.path}", param="path",
                            code="invalid_value")
    dataset_id = db.new_id("dataset")
    own = p.settings.data_dir / "datasets" / dataset_id
    with ds.staging_dir(p.settings.data_dir / "datasets") as staging:
        path, stats = ds.validate(body.format, Path(src), staging, body.name)
        if body.format == "training":  # the normalised copy lives with the platform
            os.rename(staging, own)
            path = own / path.relative_to(staging)
    row = db.Dataset(id=dataset_id, workspace=workspace, name=body.name, format=body.format, source="path",
                     path=str(path), description=body.description, size_bytes=ds.folder_size(path), stats=stats)
    return _record_dataset(s, row, own)


@datasets.get("", response_model=ListOf[DatasetOut])
def list_datasets(workspace: str, s: S) -> dict:
    workspace_of(s, workspace)
    rows = s.scalars(select(db.Dataset).where(db.Dataset.workspace == workspace).order_by(db.Dataset.name))
    return {"data": rows.all()}


@datasets.get("/{name}", response_model=DatasetOut)
def get_dataset(workspace: str, name: str, s: S) -> db.Dataset:
    workspace_of(s, workspace)
    return find_dataset(s, workspace, name, param="name")


@datasets.delete("/{name}", status_code=204)
def delete_dataset(workspace: str, name: str, p: P, s: S) -> Response:
    workspace_of(s, workspace)
    row = find_dataset(s, workspace, name, param="name")
    active = s.scalars(select(db.Job).where(db.Job.workspace == workspace,
                                            db.Job.status.in_(("created", "pending", *db.ACTIVE)))).all()
    if any(name in (j.spec.get("_training_dataset"), j.spec.get("_validation_dataset"), j.spec.get("dataset"))
           for j in active):
        raise PlatformError(409, f"dataset '{name}' is used by an active job", code="in_use")
    shutil.rmtree(p.settings.data_dir / "datasets" / row.id, ignore_errors=True)  # never a registered path
    s.delete(row)
    s.commit()
    return Response(status_code=204)


# ---- models


@models.get("", response_model=ListOf[ModelOut])
def list_models(workspace: str, s: S) -> dict:
    workspace_of(s, workspace)
    rows = s.scalars(select(db.Model).where(db.Model.workspace == workspace).order_by(db.Model.created_at))
    return {"data": rows.all()}


@models.get("/{name}", response_model=ModelOut)
def get_model(workspace: str, name: str, s: S) -> db.Model:
    workspace_of(s, workspace)
    return find_model(s, workspace, name, param="name")


@models.post("", response_model=ModelOut, status_code=201, summary="Register a base model folder")
def register_model(workspace: str, body: ModelRegister, p: P, s: S) -> db.Model:
    from embedtune.models import ModelNotFoundError, resolve

    workspace_of(s, workspace)
    if not p.settings.allow_path_registration:
        raise PlatformError(403, "this service does not accept server paths", param="path", code="forbidden")
    if s.scalar(select(db.Model.id).where(db.Model.workspace == workspace, db.Model.name == body.name)):
        raise PlatformError(409, f"model '{body.name}' already exists in workspace '{workspace}'", param="name",
                            code="already_exists")
    try:
        spec = resolve(body.path)
    except ModelNotFoundError as exc:
        raise PlatformError(422, str(exc), param="path", code="invalid_value") from None
    if not spec.is_local:
        raise PlatformError(422, f"'{body.path}' is not a folder on the service's machine (no hub downloads)",
                            param="path", code="invalid_value")
    row = db.Model(workspace=workspace, name=body.name, kind="base", path=spec.path, description=body.description)
    s.add(row)
    s.commit()
    return row


@models.delete("/{name}", status_code=204)
def delete_model(workspace: str, name: str, s: S) -> Response:
    workspace_of(s, workspace)
    row = find_model(s, workspace, name, param="name")
    if s.scalar(select(db.Deployment.id).where(db.Deployment.workspace == workspace, db.Deployment.model == name,
                                               db.Deployment.status.in_(("pending", "ready")))):
        raise PlatformError(409, f"model '{name}' is deployed; delete the deployment first", code="in_use")
    s.delete(row)  # files of a fine-tuned model stay in its job's run dir
    s.commit()
    return Response(status_code=204)


# ---- customization jobs


def create_customization(workspace: str, body: CustomizationJobCreate, p: Platform, s: Session) -> db.Job:
    workspace_of(s, workspace)
    base = find_model(s, workspace, body.base_model)
    train = find_dataset(s, workspace, body.training_dataset)
    val = find_dataset(s, workspace, body.validation_dataset) if body.validation_dataset else None
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
    recipe = build_recipe(body, job_id=job_id, model_path=base.path, dataset_format=train.format,
                          dataset_path=train.path, validation_path=val.path if val else None)
    spec = body.model_dump(mode="json", exclude_none=True)
    spec.update(_base_model=base.name, _training_dataset=train.name, _training_path=train.path,
                _validation_dataset=val.name if val else None, _output_model=output)
    run_dir = p.settings.data_dir / "jobs" / job_id / "run"
    job = db.Job(id=job_id, workspace=workspace, kind="customization", name=body.name or job_id,
                 status="created", spec=spec, recipe=recipe, stages=stages, run_dir=str(run_dir),
                 status_details={"stage": None, "stages": stages, "stages_completed": []})
    return enqueue(p, s, job)


@customization.post("/v2/workspaces/{workspace}/customization/jobs", response_model=JobOut, status_code=201)
def create_customization_job(workspace: str, body: CustomizationJobCreate, p: P, s: S) -> JobOut:
    return job_out(create_customization(workspace, body, p, s))


@customization.post("/apis/customization/v2/workspaces/{workspace}/automodel/jobs", response_model=JobOut,
                    status_code=201, summary="NeMo Platform v2 path (same body and behaviour)")
def create_automodel_job(workspace: str, body: CustomizationJobCreate, p: P, s: S) -> JobOut:
    return job_out(create_customization(workspace, body, p, s))


@customization.post("/v1/customization/jobs", response_model=JobOut, status_code=201,
                    summary="Older Customizer path: the workspace is the dataset's namespace")
def create_customization_job_v1(body: CustomizationJobCreate, p: P, s: S) -> JobOut:
    workspace = DEFAULT_WORKSPACE
    if not isinstance(body.dataset, str) and body.dataset.namespace:
        workspace = body.dataset.namespace
    return job_out(create_customization(workspace, body, p, s))


def _job_routes(router: APIRouter, prefix: str, kind: str) -> None:
    @router.get(prefix, response_model=ListOf[JobOut], name=f"list_{kind}_jobs")
    def list_jobs(workspace: str, s: S, status: str | None = None) -> dict:
        workspace_of(s, workspace)
        q = select(db.Job).where(db.Job.workspace == workspace, db.Job.kind == kind)
        if status:
            q = q.where(db.Job.status == status)
        return {"data": [job_out(j) for j in s.scalars(q.order_by(db.Job.created_at.desc())).all()]}

    @router.get(prefix + "/{job_id}", response_model=JobOut, name=f"get_{kind}_job")
    def get_job(workspace: str, job_id: str, s: S) -> JobOut:
        return job_out(find_job(s, workspace, job_id, kind))

    @router.get(prefix + "/{job_id}/status", response_model=JobStatusOut, name=f"get_{kind}_job_status")
    def get_status(workspace: str, job_id: str, s: S) -> JobStatusOut:
        job = find_job(s, workspace, job_id, kind)
        return JobStatusOut(id=job.id, status=job.status, status_details=job.status_details or {}, error=job.error)

    @router.get(prefix + "/{job_id}/logs", response_model=JobLogsOut, name=f"get_{kind}_job_logs")
    def get_logs(workspace: str, job_id: str, p: P, s: S,
                 tail: Annotated[int | None, Query(ge=1, description="last N lines only")] = None) -> JobLogsOut:
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
    def cancel(workspace: str, job_id: str, p: P, s: S) -> JobOut:
        job = find_job(s, workspace, job_id, kind)
        if db.transition(s, job.id, ("created", "pending"), status="cancelled", error="cancelled by request"):
            pass
        elif db.transition(s, job.id, "running", status="cancelling"):
            if p.scheduler is not None:
                p.scheduler.cancel(job.id)
        elif job.status in db.TERMINAL:
            raise PlatformError(409, f"job {job.id} is already {job.status}", code="job_finished")
        s.refresh(job)
        return job_out(job)


_job_routes(customization, "/v2/workspaces/{workspace}/customization/jobs", "customization")


# ---- evaluation jobs


@evaluation.post("", response_model=JobOut, status_code=201)
def create_evaluation_job(workspace: str, body: EvaluationJobCreate, p: P, s: S) -> JobOut:
    workspace_of(s, workspace)
    data = find_dataset(s, workspace, body.dataset)
    if data.format != "beir":
        raise PlatformError(422, f"dataset '{data.name}' is '{data.format}', an evaluation needs BEIR",
                            param="dataset", code="invalid_value")
    if body.split not in data.stats.get("splits", {}):
        raise PlatformError(422, f"dataset '{data.name}' has no split '{body.split}' "
                                 f"(has: {', '.join(data.stats.get('splits', {}))})", param="split",
                            code="invalid_value")
    spec = body.model_dump(mode="json", exclude_none=True)
    spec["_dataset_path"] = data.path
    if body.model:
        spec["_model_path"] = find_model(s, workspace, body.model).path
    else:
        dep = find_deployment(s, workspace, body.deployment)
        if dep.status != "ready":
            raise PlatformError(409, f"deployment '{dep.name}' is {dep.status}, not ready", param="deployment",
                                code="not_ready")
        spec.update(_deployment_url=dep.url, _served_model=dep.served_model)
    job_id = db.new_id("eval")
    job = db.Job(id=job_id, workspace=workspace, kind="evaluation", name=body.name or job_id, status="created",
                 spec=spec, recipe={}, stages=["eval"], run_dir=str(p.settings.data_dir / "jobs" / job_id),
                 status_details={"stage": None})
    return job_out(enqueue(p, s, job))


_job_routes(evaluation, "", "evaluation")


# ---- deployments


@deployments.post("", response_model=DeploymentOut, status_code=201)
def create_deployment(workspace: str, body: DeploymentCreate, p: P, s: S) -> db.Deployment:
    workspace_of(s, workspace)
    model = find_model(s, workspace, body.model)
    name = body.name or f"{model.name}-{db.new_id('d').split('-')[1][:6]}"
    old = s.scalar(select(db.Deployment).where(db.Deployment.workspace == workspace, db.Deployment.name == name))
    if old is not None and old.status != "deleted":
        raise PlatformError(409, f"deployment '{name}' already exists", param="name", code="already_exists")
    if old is not None:
        s.delete(old)  # the name of a deleted deployment may be reused
        s.flush()
    dep = db.Deployment(workspace=workspace, name=name, model=model.name, model_path=model.path, status="pending")
    s.add(dep)
    s.flush()
    p.deployments.start(dep)
    s.commit()
    if p.scheduler is not None:
        p.scheduler.nudge()
    return dep


@deployments.get("", response_model=ListOf[DeploymentOut])
def list_deployments(workspace: str, s: S, include_deleted: bool = False) -> dict:
    workspace_of(s, workspace)
    q = select(db.Deployment).where(db.Deployment.workspace == workspace)
    if not include_deleted:
        q = q.where(db.Deployment.status != "deleted")
    return {"data": s.scalars(q.order_by(db.Deployment.created_at)).all()}


@deployments.get("/{name}", response_model=DeploymentOut)
def get_deployment(workspace: str, name: str, s: S) -> db.Deployment:
    workspace_of(s, workspace)
    return find_deployment(s, workspace, name)


@deployments.delete("/{name}", response_model=DeploymentOut)
def delete_deployment(workspace: str, name: str, p: P, s: S) -> db.Deployment:
    workspace_of(s, workspace)
    dep = find_deployment(s, workspace, name)
    p.deployments.stop(dep)
    dep.status, dep.pid = "deleted", None
    s.commit()
    return dep


# ---- inference gateway


def _ready_deployment(p: Platform, workspace: str, *, model: str | None = None, name: str | None = None):  # noqa: ANN202
    with p.sessions() as s:
        workspace_of(s, workspace)
        q = select(db.Deployment).where(db.Deployment.workspace == workspace, db.Deployment.status == "ready")
        q = q.where(db.Deployment.model == model) if model else q.where(db.Deployment.name == name)
        dep = s.scalars(q.order_by(db.Deployment.created_at.desc())).first()
    if dep is None:
        what = f"model '{model}'" if model else f"deployment '{name}'"
        raise PlatformError(404, f"no ready deployment serves {what} in workspace '{workspace}'",
                            param="model", code="model_not_found")
    return dep


async def forward(p: Platform, dep: db.Deployment, path: str, request: Request) -> Response:
    body = await request.body()
    if body and dep.served_model and request.headers.get("content-type", "").startswith("application/json"):
        try:
            payload = json.loads(body)
        except json.JSONDecodeError:
            payload = None
        if isinstance(payload, dict) and "model" in payload:
            payload["model"] = dep.served_model  # callers name the platform's model; the server its own id
            body = json.dumps(payload).encode()
    headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "authorization", "accept")}
    try:
        upstream = await p.http.request(request.method, f"{dep.url}/{path}", content=body, headers=headers,
                                        params=request.query_params)
    except httpx.HTTPError as exc:
        return error_response(502, f"deployment '{dep.name}' did not answer: {type(exc).__name__}",
                              code="upstream_unavailable")
    return Response(upstream.content, status_code=upstream.status_code,
                    media_type=upstream.headers.get("content-type"))


@gateway.post("/model/{model}/-/{path:path}", operation_id="gateway_model_post")
@gateway.get("/model/{model}/-/{path:path}", operation_id="gateway_model_get",
                   summary="OpenAI-compatible endpoints of the newest ready deployment of a model")
async def gateway_model(workspace: str, model: str, path: str, request: Request, p: P) -> Response:
    dep = await run_in_threadpool(_ready_deployment, p, workspace, model=model)
    return await forward(p, dep, path, request)


@gateway.post("/provider/{deployment}/-/{path:path}", operation_id="gateway_provider_post")
@gateway.get("/provider/{deployment}/-/{path:path}", operation_id="gateway_provider_get",
                   summary="OpenAI-compatible endpoints of one deployment")
async def gateway_provider(workspace: str, deployment: str, path: str, request: Request, p: P) -> Response:
    dep = await run_in_threadpool(_ready_deployment, p, workspace, name=deployment)
    return await forward(p, dep, path, request)


# -------------------------------------------------------------------------------------------- the app


def create_app(settings: PlatformSettings | None = None) -> FastAPI:
    state = Platform(settings or PlatformSettings())

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # noqa: ANN202
        await run_in_threadpool(state.start)  # recovers orphaned jobs before the first request
        yield
        await state.stop()

    app = FastAPI(title="embedtune platform", version=__version__, lifespan=lifespan,
                  description="Datasets, models, customization and evaluation jobs, deployments and an "
                              "inference gateway for embedtune, with NeMo-platform-style routes.")
    app.state.platform = state
    install_handlers(app)

    @app.middleware("http")
    async def _upload_limit(request: Request, call_next):  # noqa: ANN001, ANN202
        # Refuse an oversized upload from its header, before the body is read and spooled to disk.
        length = request.headers.get("content-length")
        limit = state.settings.max_upload_bytes + (1 << 20)  # room for the multipart envelope
        if request.method == "POST" and length and length.isdigit() and int(length) > limit:
            return error_response(413, f"the request exceeds the limit of {state.settings.max_upload_bytes:,} "
                                       "bytes", code="too_large", param="files")
        return await call_next(request)

    for router in (health, workspaces, datasets, models, customization, evaluation, deployments, gateway):
        app.include_router(router)
    return app
