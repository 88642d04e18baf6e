"""The platform service: assembles the routers (``platform/routes/``) and the request guard.

Nothing here runs a pipeline stage: jobs go to worker processes through the scheduler; route handlers only
validate, record and signal. :class:`RequestGuard` runs before any route: it authenticates the caller and
caps the bytes a request body may carry (declared or chunked) before a handler reads them.
"""

from __future__ import annotations

import json
import re
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedtune import __version__
from embedtune.platform import auth
from embedtune.platform.errors import ErrorBody, ErrorDetail, install_handlers
from embedtune.platform.executors import make_executor
from embedtune.platform.routes import (
    admin,
    datasets,
    deployments,
    evaluations,
    gateway,
    health,
    jobs,
    models,
    workspaces,
)
from embedtune.platform.routes.common import principal
from embedtune.platform.settings import PlatformSettings
from embedtune.platform.state import Platform

PUBLIC_PATHS = ("/v1/health/live", "/v1/health/ready", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
UPLOAD_ROUTE = re.compile(r"^/v2/workspaces/[^/]+/datasets/?$")
GATEWAY_ROUTE = re.compile(r"^/v2/workspaces/[^/]+/inference/gateway/")
MULTIPART_ENVELOPE = 1 << 20


class BodyTooLarge(Exception):
    pass


class RequestGuard:
    """Pure ASGI middleware: 401 before a body is read, 413 as soon as a body passes its cap."""

    def __init__(self, app: ASGIApp, state: Platform):
        self.app, self.state = app, state

    def body_limit(self, method: str, path: str) -> int:
        settings = self.state.settings
        if method == "POST" and UPLOAD_ROUTE.match(path):
            return settings.max_upload_bytes + MULTIPART_ENVELOPE
        if GATEWAY_ROUTE.match(path):
            return settings.max_gateway_bytes
        return settings.max_json_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self.state.settings.auth and path not in PUBLIC_PATHS:
            who = await self.authenticate(scope)
            if who is None:
                await reply(send, 401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                            "invalid_api_key", headers=[(b"www-authenticate", b"Bearer")])
                return
            scope.setdefault("state", {})["principal"] = who
        await self.limited(scope, receive, send, self.body_limit(scope["method"], path))

    async def authenticate(self, scope: Scope) -> auth.Principal | None:
        given = [v for k, v in scope["headers"] if k == b"authorization"]
        if len(given) != 1:
            return None  # two keys in one request: neither is taken (a proxy's and the caller's could differ)
        token = auth.bearer_token(given[0].decode("latin-1"))
        if not token or len(token) > 512:
            return None

        def lookup() -> auth.Principal | None:
            with self.state.sessions() as s:
                return auth.authenticate(s, token)

        return await run_in_threadpool(lookup)

    async def limited(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await reply(send, 413, f"the request body exceeds the limit of {limit:,} bytes", "too_large")
            return
        seen, exceeded, started = 0, False, False

        async def counting_receive() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    exceeded = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # whatever the app makes of the aborted body, the answer is our 413
            started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await reply(send, 413, f"the request body exceeds the limit of {limit:,} bytes", "too_large")


async def reply(send: Send, status: int, message: str, code: str,
                headers: list[tuple[bytes, bytes]] | None = None) -> None:
    kind = {401: "authentication_error", 413: "request_too_large"}[status]
    body = json.dumps(ErrorBody(error=ErrorDetail(message=message, type=kind, code=code)).model_dump()).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def create_app(settings: PlatformSettings | None = None) -> FastAPI:
    state = Platform(settings or PlatformSettings())

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # noqa: ANN202
        # The executor is made here, on the thread that lives as long as the service: ray.init() starts Ray's
        # GCS and raylet with PR_SET_PDEATHSIG, which fires when the creating *thread* exits, and a thread-pool
        # thread is retired after 10 idle seconds (that killed Ray mid-job and the service with it).
        executor = make_executor(state.settings)
        await run_in_threadpool(state.start, executor)  # recovers orphaned jobs before the first request
        yield
        await state.stop()

    app = FastAPI(title="embedtune platform", version=__version__, lifespan=lifespan,
                  description="Datasets, models, customization and evaluation jobs, deployments and an "
                              "inference gateway for embedtune, with NeMo-platform-style routes. Every route "
                              "but health needs `Authorization: Bearer <API key>`.")
    app.state.platform = state
    install_handlers(app)
    app.add_middleware(RequestGuard, state=state)
    app.include_router(health.router)
    for module in (workspaces, datasets, models, jobs, evaluations, deployments, gateway, admin):
        app.include_router(module.router, dependencies=[Depends(principal)])
    return app
