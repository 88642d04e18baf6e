"""ASGI middleware in front of every route: request metrics, Bearer auth, request-size limit.

It runs before FastAPI parses anything, so an oversized or unauthenticated body is refused without being
held in memory or validated, and every response (errors included) is counted.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable

from embedtune.serve.errors import error_bytes
from embedtune.serve.metrics import Metrics

Scope = dict
Message = dict
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ENDPOINTS = ("/v1/embeddings", "/v1/search", "/v1/models", "/v1/health/live", "/v1/health/ready", "/metrics",
             "/v1/metrics", "/health")
PROTECTED = ("/v1/embeddings", "/v1/search", "/v1/models")  # health and metrics stay open for probes and scrapers
JSON_ROUTES = ("/v1/embeddings", "/v1/search")
FORM_TYPE = b"application/x-www-form-urlencoded"  # what `curl -d` declares when no -H is given


def endpoint_label(path: str) -> str:
    if path in ENDPOINTS:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"  # bounded label set


class Guard:
    def __init__(self, app, metrics: Metrics, api_key: str | None, max_body: int):
        self.app, self.metrics, self.api_key, self.max_body = app, metrics, api_key, max_body
        self._key = api_key.encode("utf-8") if api_key else b""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [500]

        async def send_counting(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        endpoint = endpoint_label(scope["path"])
        try:
            await self._handle(scope, receive, send_counting)
        finally:
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.api_key and scope["path"].startswith(PROTECTED) and not self._authorised(scope):
            await _reply(send, 401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                         "invalid_api_key", headers=[(b"www-authenticate", b"Bearer")])
            return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body = await self._read_body(scope, receive)
            if body is None:
                await _reply(send, 413, f"request body exceeds the limit of {self.max_body} bytes",
                             "request_too_large")
                return
            receive = _replay(body, receive)
            if scope["path"].startswith(JSON_ROUTES):
                scope = _as_json(scope)
        await self.app(scope, receive, send)

    def _authorised(self, scope: Scope) -> bool:
        # Compared as bytes: a header may carry any octet (a non-ASCII token is simply a wrong key), and
        # compare_digest refuses non-ASCII str.
        given = [v for k, v in scope.get("headers") or [] if k == b"authorization"]
        if len(given) != 1:
            return False  # none, or two keys in one request: neither is taken
        scheme, _, token = given[0].partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self._key)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None when it is larger than allowed (the rest is drained, up to a bound,
        so the client reads our 413 instead of a reset connection)."""
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.max_body
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk, more = message.get("body", b""), message.get("more_body", False)
            size += len(chunk)
            too_big = too_big or size > self.max_body
            if too_big:
                if size > 4 * self.max_body + (1 << 20):
                    break  # a client that keeps sending gets its 413 now
                continue
            chunks.append(chunk)
        return None if too_big else b"".join(chunks)


def _as_json(scope: Scope) -> Scope:
    """The request as JSON when it came without a Content-Type or with curl -d's form type: these routes take
    JSON only, and OpenAI-compatible clients and examples often leave the header out (FastAPI would answer
    422 "Input should be a valid dictionary"). Any other declared type is left for FastAPI to refuse."""
    headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
    declared = dict(scope.get("headers") or []).get(b"content-type", b"").split(b";")[0].strip().lower()
    if declared not in (b"", FORM_TYPE):
        return scope
    return {**scope, "headers": [*headers, (b"content-type", b"application/json")]}


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _reply(send: Send, status: int, message: str, code: str,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = error_bytes(status, message, code)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
