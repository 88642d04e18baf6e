"""Every error leaves the server in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

The official clients map the status to an exception class and read this body, so even FastAPI's own
validation errors and unknown routes are rewritten into it.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("embedtune.serve")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers


def error_body(status: int, message: str, code: str | None = None, param: str | None = None,
               type: str | None = None) -> dict:
    return {"error": {"message": message, "type": type or _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_bytes(status: int, message: str, code: str | None = None, param: str | None = None) -> bytes:
    return json.dumps(error_body(status, message, code, param)).encode()


class ErrorResponse(JSONResponse):
    """JSON rendered ASCII-only: a message that quotes client text (a model name holding a lone
    surrogate, say) is escaped instead of failing to encode and turning a 4xx into a 500."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def clip(text: str, limit: int = 200) -> str:
    """Client text quoted in an error message, cut so a megabyte-long value is not echoed back."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def error_response(exc: APIError) -> JSONResponse:
    return ErrorResponse(error_body(exc.status, exc.message, exc.code, exc.param, exc.type),
                         status_code=exc.status, headers=exc.headers)


def _field_path(error: dict) -> str | None:
    loc = [str(p) for p in error.get("loc", ()) if p != "body"]
    # Union members add their type name to the location (input.list[str].0); keep the field path only.
    return ".".join(p for p in loc if not any(c in p for c in "[]")) or None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    """(message, param, code) of a rejected body."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None, "invalid_value"
    # Invalid text is the precise cause whichever union member pydantic tried first.
    if bad_text := next((e for e in errors if e.get("type") == "invalid_unicode"), None):
        param = _field_path(bad_text)
        return f"{param or 'body'}: {bad_text.get('msg')}", param, "invalid_unicode"
    first = errors[0]
    if first.get("type") == "json_invalid":
        error = first.get("ctx", {}).get("error", first["msg"])
        return f"the request body is not valid JSON: {error}", None, "invalid_value"
    param = _field_path(first)
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    message = first.get("msg", "invalid value")
    if first.get("type") != "missing" and (param == "input" or (param or "").startswith("input.")):
        # One failure per member of the union: name the accepted shapes instead of the first failure.
        return ("input must be a string, a list of strings, a list of token ids or a list of token-id "
                "lists (non-empty, no nulls)"), "input", "invalid_value"
    return f"{param or 'body'}: {message}{more}", param, "invalid_value"


#: The error code of the framework's own HTTP errors (FastAPI's only 400 is a body it could not parse), for
#: this server and the platform alike.
FRAMEWORK_CODES = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed"}


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = _validation_message(exc)
        return ErrorResponse(error_body(422, message, code, param), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's only 400 is a body it could not parse (not UTF-8, or JSON nested too deep to decode).
        code = FRAMEWORK_CODES.get(exc.status_code)
        return ErrorResponse(error_body(exc.status_code, str(exc.detail), code), status_code=exc.status_code,
                             headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return ErrorResponse(error_body(500, f"internal error: {type(exc).__name__}", "internal_error"),
                             status_code=500)
