"""Deployments: one serving process per deployment (see :mod:`embedtune.platform.deployments`)."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from embedtune.platform import db, quotas
from embedtune.platform.auth import audit
from embedtune.platform.errors import PlatformError
from embedtune.platform.routes.common import ERRORS, WS, P, S, Who, find_deployment, find_model
from embedtune.platform.schemas import DeploymentCreate, DeploymentOut, ListOf

router = APIRouter(prefix="/v2/workspaces/{workspace}/deployments", tags=["deployments"], responses=ERRORS)


@router.post("", response_model=DeploymentOut, status_code=201)
def create_deployment(workspace: WS, body: DeploymentCreate, who: Who, p: P, s: S) -> db.Deployment:
    model = find_model(s, who, workspace, body.model)
    release = (model.metrics or {}).get("release") or {}
    if release.get("challenger") and release.get("model") != "finetuned" and not body.force:
        raise PlatformError(409, f"model '{model.name}' did not pass its release gate: {release.get('line')}; "
                            "send force=true to deploy it anyway", param="force", code="release_gate")
    quotas.check_deployments(s, p.settings, workspace)
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
    audit(s, who, "create", "deployment", name, workspace=workspace, detail={"id": dep.id, "model": model.name})
    s.commit()
    if p.scheduler is not None:
        p.scheduler.nudge()
    return dep


@router.get("", response_model=ListOf[DeploymentOut])
def list_deployments(workspace: WS, s: S, include_deleted: bool = False) -> dict:
    q = select(db.Deployment).where(db.Deployment.workspace == workspace)
    if not include_deleted:
        q = q.where(db.Deployment.status != "deleted")
    return {"data": s.scalars(q.order_by(db.Deployment.created_at)).all()}


@router.get("/{name}", response_model=DeploymentOut)
def get_deployment(workspace: WS, name: str, s: S) -> db.Deployment:
    return find_deployment(s, workspace, name)


@router.delete("/{name}", response_model=DeploymentOut)
def delete_deployment(workspace: WS, name: str, who: Who, p: P, s: S) -> db.Deployment:
    dep = find_deployment(s, workspace, name)
    p.deployments.stop(dep)
    dep.status, dep.pid = "deleted", None
    audit(s, who, "delete", "deployment", name, workspace=workspace, detail={"id": dep.id})
    s.commit()
    return dep
