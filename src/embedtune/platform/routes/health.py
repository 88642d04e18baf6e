"""Liveness and readiness: the only routes answered without an API key."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from embedtune.platform.routes.common import P, S
from embedtune.platform.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/v1/health/live", response_model=Health)
def live(p: P) -> Health:
    return Health(status="live", database="unchecked", executor=p.settings.executor)


@router.get("/v1/health/ready", response_model=Health)
def ready(p: P, s: S) -> Health:
    s.execute(text("SELECT 1"))
    return Health(status="ready", database="ok", executor=p.settings.executor)
