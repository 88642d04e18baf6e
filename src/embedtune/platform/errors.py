"""Errors in the OpenAI shape ``{"error": {"message", "type", "param", "code"}}`` for every 4xx/5xx."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from embedtune.serve.errors import FRAMEWORK_CODES

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          409: "conflict_error", 413: "request_too_large", 422: "invalid_request_error",
          429: "rate_limit_error", 502: "bad_gateway", 503: "service_unavailable"}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class PlatformError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):  # noqa: A002 (the field is called `type` in the wire format)
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "api_error")


def not_found(kind: str, name: str, workspace: str | None = None) -> PlatformError:
    where = f" in workspace '{workspace[:130]}'" if workspace else ""
    return PlatformError(404, f"{kind} '{name[:260]}' not found{where}", code=f"{kind}_not_found")


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   type: str | None = None) -> JSONResponse:  # noqa: A002
    body = ErrorBody(error=ErrorDetail(message=message, type=type or _TYPES.get(status, "api_error"),
                                       param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def allowed_methods(request: Request) -> list[str]:
    """Every method the routes matching this request's path accept (routers included into the app too)."""
    def routes(items):  # noqa: ANN001, ANN202 - Starlette routes and FastAPI's included-router entries
        for route in items:
            contexts = getattr(route, "effective_route_contexts", None)
            yield from (contexts() if contexts else [route])

    path = request.scope.get("path", "")
    methods: set[str] = set()
    for route in routes(request.app.router.routes):
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(path):
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(PlatformError)
    async def _platform(_: Request, exc: PlatformError) -> JSONResponse:
        resp = error_response(exc.status, exc.message, param=exc.param, code=exc.code, type=exc.type)
        if exc.status == 401:
            resp.headers["WWW-Authenticate"] = "Bearer"
        return resp

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # The detail of a framework error can quote the request (e.g. a body it could not parse): cap it.
        code = FRAMEWORK_CODES.get(exc.status_code)
        resp = error_response(exc.status_code, str(exc.detail)[:300], code=code)
        resp.headers.update(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # RFC 9110: name every method the path takes (Starlette names one route's)
            resp.headers["Allow"] = ", ".join(allowed_methods(request))
        return resp

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "form")]
        param = ".".join(loc)[:120] or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        message = message[:300]  # never echo megabytes of input back
        extra = len(exc.errors()) - 1
        if extra:
            message += f" (and {extra} more problem{'s' * (extra > 1)})"
        return error_response(422, message, param=param, code="invalid_value")
