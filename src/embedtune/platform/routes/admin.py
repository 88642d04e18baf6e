"""Admin-only routes: the audit log and the API keys (keys are created from the command line)."""

from __future__ import annotations

from datetime import UTC
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel
from sqlalchemy import select

from embedtune.platform import db
from embedtune.platform.auth import key_summary
from embedtune.platform.routes.common import ERRORS, Admin, S
from embedtune.platform.schemas import ListOf

router = APIRouter(prefix="/v2/admin", tags=["admin"], responses=ERRORS)


class AuditEventOut(BaseModel):
    id: int
    at: str
    actor: str
    action: str
    kind: str
    target: str
    workspace: str | None
    detail: dict[str, Any]


class ApiKeyOut(BaseModel):
    id: str
    name: str
    admin: bool
    workspaces: list[str]
    created_at: str | None
    revoked_at: str | None


@router.get("/audit", response_model=ListOf[AuditEventOut], summary="Who created, cancelled, deleted what")
def read_audit_log(_: Admin, s: S, workspace: Annotated[str | None, Query(max_length=128)] = None,
                   limit: Annotated[int, Query(ge=1, le=10_000)] = 1000) -> dict:
    q = select(db.AuditEvent).order_by(db.AuditEvent.id.desc()).limit(limit)
    if workspace:
        q = q.where(db.AuditEvent.workspace == workspace)
    rows = s.scalars(q).all()
    return {"data": [AuditEventOut(id=r.id, at=r.at.replace(tzinfo=UTC).isoformat(), actor=r.actor,
                                   action=r.action, kind=r.kind, target=r.target, workspace=r.workspace,
                                   detail=r.detail or {}) for r in rows]}


@router.get("/keys", response_model=ListOf[ApiKeyOut], summary="API keys (never their secrets)")
def list_keys(_: Admin, s: S) -> dict:
    return {"data": [key_summary(r) for r in s.scalars(select(db.ApiKey).order_by(db.ApiKey.created_at)).all()]}
