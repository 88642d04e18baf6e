"""Evaluation jobs: score a registered model or a live deployment on a BEIR dataset of the workspace."""

from __future__ import annotations

from fastapi import APIRouter

from embedtune.platform import db, quotas
from embedtune.platform.auth import audit
from embedtune.platform.errors import PlatformError
from embedtune.platform.jobs import EvaluationJobCreate
from embedtune.platform.routes.common import (
    ERRORS,
    WS,
    P,
    S,
    Who,
    enqueue,
    find_dataset,
    find_deployment,
    find_model,
    job_out,
)
from embedtune.platform.routes.jobs import add_job_routes
from embedtune.platform.schemas import JobOut

router = APIRouter(prefix="/v2/workspaces/{workspace}/evaluation/jobs", tags=["evaluation"], responses=ERRORS)


@router.post("", response_model=JobOut, status_code=201)
def create_evaluation_job(workspace: WS, body: EvaluationJobCreate, who: Who, p: P, s: S) -> JobOut:
    quotas.check_jobs(s, p.settings, workspace)
    data = find_dataset(s, who, workspace, body.dataset)
    if data.format != "beir":
        raise PlatformError(422, f"dataset '{data.name}' is '{data.format}', an evaluation needs BEIR",
                            param="dataset", code="invalid_value")
    if body.split not in data.stats.get("splits", {}):
        raise PlatformError(422, f"dataset '{data.name}' has no split '{body.split[:80]}' "
                                 f"(has: {', '.join(data.stats.get('splits', {}))})", param="split",
                            code="invalid_value")
    spec = body.model_dump(mode="json", exclude_none=True)
    spec["_dataset_path"] = data.path
    if body.model:
        spec["_model_path"] = find_model(s, who, workspace, body.model).path
    else:
        dep = find_deployment(s, workspace, body.deployment)
        if dep.status != "ready":
            raise PlatformError(409, f"deployment '{dep.name}' is {dep.status}, not ready", param="deployment",
                                code="not_ready")
        spec.update(_deployment_url=dep.url, _deployment_id=dep.id, _served_model=dep.served_model)
    job_id = db.new_id("eval")
    job = db.Job(id=job_id, workspace=workspace, kind="evaluation", name=body.name or job_id, status="created",
                 spec=spec, recipe={}, stages=["eval"], run_dir=str(p.settings.data_dir / "jobs" / job_id),
                 status_details={"stage": None})
    audit(s, who, "create", "job", job_id, workspace=workspace, detail={"kind": "evaluation"})
    return job_out(enqueue(p, s, job))


add_job_routes(router, "", "evaluation")
