"""The inference gateway: OpenAI-compatible calls forwarded to a workspace's ready deployment."""

from __future__ import annotations

import json

import httpx
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from sqlalchemy import select

from embedtune.platform import db
from embedtune.platform.deployment_keys import auth_headers
from embedtune.platform.errors import PlatformError, error_response
from embedtune.platform.routes.common import ERRORS, WS, P
from embedtune.platform.state import Platform

router = APIRouter(prefix="/v2/workspaces/{workspace}/inference/gateway", tags=["inference"], responses=ERRORS)
# The caller's Authorization is the *platform* key: it is checked here and never forwarded to a deployment,
# which gets its own key instead.
FORWARDED_HEADERS = ("content-type", "accept")


def ready_deployment(p: Platform, workspace: str, *, model: str | None = None,
                     name: str | None = None) -> db.Deployment:
    with p.sessions() as s:
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
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            payload = None
        if isinstance(payload, dict) and "model" in payload:
            payload["model"] = dep.served_model  # callers name the platform's model; the server its own id
            body = json.dumps(payload).encode()
    headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}
    headers.update(auth_headers(p.settings.data_dir, dep.id))
    try:
        upstream = await p.http.request(request.method, f"{dep.url}/{path}", content=body, headers=headers,
                                        params=request.query_params)
    except httpx.HTTPError as exc:
        return error_response(502, f"deployment '{dep.name}' did not answer: {type(exc).__name__}",
                              code="upstream_unavailable")
    return Response(upstream.content, status_code=upstream.status_code,
                    media_type=upstream.headers.get("content-type"))


@router.post("/model/{model}/-/{path:path}", operation_id="gateway_model_post")
@router.get("/model/{model}/-/{path:path}", operation_id="gateway_model_get",
            summary="OpenAI-compatible endpoints of the newest ready deployment of a model")
async def gateway_model(workspace: WS, model: str, path: str, request: Request, p: P) -> Response:
    dep = await run_in_threadpool(ready_deployment, p, workspace, model=model)
    return await forward(p, dep, path, request)


@router.post("/provider/{deployment}/-/{path:path}", operation_id="gateway_provider_post")
@router.get("/provider/{deployment}/-/{path:path}", operation_id="gateway_provider_get",
            summary="OpenAI-compatible endpoints of one deployment")
async def gateway_provider(workspace: WS, deployment: str, path: str, request: Request, p: P) -> Response:
    dep = await run_in_threadpool(ready_deployment, p, workspace, name=deployment)
    return await forward(p, dep, path, request)
