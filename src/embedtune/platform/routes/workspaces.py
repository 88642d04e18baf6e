"""Workspaces: every key sees the ones it was given; only an admin key creates or deletes one."""

from __future__ import annotations

import shutil

from fastapi import APIRouter
from fastapi.responses import Response
from sqlalchemy import delete, select

from embedtune.platform import db
from embedtune.platform.auth import audit
from embedtune.platform.errors import PlatformError
from embedtune.platform.routes.common import ERRORS, WS, Admin, P, S, Who
from embedtune.platform.schemas import ListOf, WorkspaceCreate, WorkspaceOut
from embedtune.platform.state import ensure_workspace

router = APIRouter(prefix="/v2/workspaces", tags=["workspaces"], responses=ERRORS)


@router.post("", response_model=WorkspaceOut, status_code=201)
def create_workspace(body: WorkspaceCreate, who: Admin, s: S) -> db.Workspace:
    if s.get(db.Workspace, body.name) is not None:
        raise PlatformError(409, f"workspace '{body.name}' already exists", param="name", code="already_exists")
    audit(s, who, "create", "workspace", body.name, workspace=body.name)
    return ensure_workspace(s, body.name, body.description)


@router.get("", response_model=ListOf[WorkspaceOut])
def list_workspaces(who: Who, s: S) -> dict:
    rows = s.scalars(select(db.Workspace).order_by(db.Workspace.name)).all()
    return {"data": [w for w in rows if who.can_use(w.name)]}


@router.get("/{workspace}", response_model=WorkspaceOut)
def get_workspace(workspace: WS, s: S) -> db.Workspace:
    return s.get(db.Workspace, workspace)


@router.delete("/{workspace}", status_code=204)
def delete_workspace(workspace: WS, who: Admin, p: P, s: S) -> Response:
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
    audit(s, who, "delete", "workspace", workspace, workspace=workspace)
    s.commit()
    return Response(status_code=204)
