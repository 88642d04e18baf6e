"""The FastAPI app: ``/v1/embeddings`` (OpenAI + NIM), ``/v1/models``, health probes and metrics."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from embedtune.config import ServeConfig
from embedtune.serve.backends import Backend, DimensionsError, reduce_dimensions
from embedtune.serve.batching import Batcher, QueueFullError, ShuttingDownError
from embedtune.serve.errors import APIError, clip, error_body, install_handlers
from embedtune.serve.guard import Guard
from embedtune.serve.loading import ModelEntry
from embedtune.serve.metrics import CONTENT_TYPE, Metrics
from embedtune.serve.schemas import EmbeddingRequest, EmbeddingResponse, ModelCard, ModelList, error_responses
from embedtune.serve.search import add_search_route, attach_index
from embedtune.serve.tokens import InputTooLongError, TokenIdError

if TYPE_CHECKING:
    from embedtune.retrieval.milvus import MilvusSearcher

log = logging.getLogger("embedtune.serve")


@dataclass
class Served:
    entry: ModelEntry
    created: int = field(default_factory=lambda: int(time.time()))
    backend: Backend | None = None
    batcher: Batcher | None = None
    error: str | None = None
    searcher: MilvusSearcher | None = None  # /v1/search, when the entry has an index
    search_error: str | None = None
    search_mode: str = "hybrid"  # the mode the release gate deployed: a request that names none gets it


class ModelLoadError(ValueError):
    """A served model could not be loaded (the command line's server then exits non-zero)."""


class ServerState:
    def __init__(self, entries: Sequence[ModelEntry], config: ServeConfig, metrics: Metrics):
        names = [e.name for e in entries]
        if not entries or len(set(names)) != len(names):
            raise ValueError(f"serve needs at least one model and unique model names, got {names}")
        self.models = {e.name: Served(e) for e in entries}
        self.config, self.metrics = config, metrics
        # Called when a model fails to load; the CLI's runner stops the server then. Unset (tests, a host that
        # reports through /v1/health/ready), the server keeps answering 503 for that model.
        self.on_load_failure: Callable[[], None] | None = None

    def load_failure(self) -> ModelLoadError | None:
        failed = [f"model {n} ({s.entry.source}) failed to load: {s.error}" for n, s in self.models.items() if s.error]
        return ModelLoadError("; ".join(failed)) if failed else None

    @property
    def ready(self) -> bool:
        return all(s.batcher is not None for s in self.models.values())

    async def load_all(self) -> None:
        """Load models one after another in a thread: the server answers probes meanwhile."""
        for name, served in self.models.items():
            try:
                backend = await asyncio.to_thread(served.entry.load)
            except Exception as exc:  # noqa: BLE001 - reported through /v1/health/ready and 503s
                served.error = f"{type(exc).__name__}: {exc}"
                log.error("model %s (%s) failed to load: %s", name, served.entry.source, served.error)
                if self.on_load_failure is not None:
                    self.on_load_failure()
                    return
                continue
            batcher = Batcher(backend.embed_tokens, backend.dimension, self.config.max_batch_tokens,
                              self.config.max_queue, self.metrics.batch_stats(name))
            await batcher.start()
            served.backend, served.batcher = backend, batcher
            log.info("serving %s from %s (%s)", name, served.entry.source, backend.describe())
            if served.entry.index is not None:
                await asyncio.to_thread(attach_index, served, served.entry.index)

    async def stop(self) -> None:
        for served in self.models.values():
            if served.batcher is not None:
                await served.batcher.stop()

    def resolve(self, name: str | None) -> Served:
        if name is None:
            if len(self.models) > 1:
                raise APIError(400, f"'model' is required: this server has {sorted(self.models)}",
                               code="missing_model", param="model")
            name = next(iter(self.models))
        served = self.models.get(name)
        if served is None:
            raise APIError(404, f"The model `{clip(name)}` does not exist. Served models: {sorted(self.models)}",
                           code="model_not_found", param="model")
        if served.batcher is None:
            reason = f"failed to load: {served.error}" if served.error else "is still loading"
            raise APIError(503, f"model `{name}` {reason}", code="model_not_ready",
                           headers=None if served.error else {"Retry-After": "5"})
        return served


def create_app(entries: Sequence[ModelEntry], config: ServeConfig | None = None,
               api_key: str | None = None, docs: bool = True) -> FastAPI:
    """The server's app; ``docs`` serves FastAPI's interactive API page at ``/docs`` (the spec itself,
    ``/openapi.json``, is always served: clients and fuzzers read it)."""
    config = config or ServeConfig()
    metrics = Metrics()
    state = ServerState(entries, config, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(state.load_all())
        try:
            yield
        finally:
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            await state.stop()

    app = FastAPI(title="embedtune embeddings", lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url=None)
    app.state.serve = state
    install_handlers(app)
    _add_routes(app, state, config, metrics)
    add_search_route(app, state)
    app.add_middleware(Guard, metrics=metrics, api_key=api_key, max_body=config.max_request_bytes)
    return app


def _add_routes(app: FastAPI, state: ServerState, config: ServeConfig, metrics: Metrics) -> None:
    # The documented responses are every one the route can give, so the spec is a contract a client (and
    # the schemathesis suite) can check: 4xx/5xx bodies are OpenAI's error shape, not FastAPI's.
    @app.post("/v1/embeddings", response_model=EmbeddingResponse,
              responses=error_responses(400, 401, 404, 413, 422, 429, 503))
    async def embeddings(request: EmbeddingRequest) -> Response:
        return await _embed(request, state, config, metrics)

    @app.get("/v1/models", responses=error_responses(401))
    async def list_models() -> ModelList:
        return ModelList(data=[_card(s) for s in state.models.values()])

    @app.get("/v1/models/{model:path}", responses=error_responses(401, 404))
    async def get_model(model: str) -> ModelCard:
        if model not in state.models:
            raise APIError(404, f"The model `{clip(model)}` does not exist", code="model_not_found", param="model")
        return _card(state.models[model])

    @app.get("/v1/health/live")
    async def live() -> dict:
        return {"object": "health.response", "message": "live"}

    @app.get("/v1/health/ready", responses=error_responses(503))
    async def ready() -> Response:
        if state.ready:
            return JSONResponse({"object": "health.response", "message": "ready"})
        failed = {n: s.error for n, s in state.models.items() if s.error}
        message = f"models failed to load: {failed}" if failed else "models are loading"
        return JSONResponse(error_body(503, message, "not_ready"), status_code=503)

    prometheus_text = {200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus exposition format"}}

    @app.get("/metrics", response_class=Response, responses=prometheus_text)
    @app.get("/v1/metrics", response_class=Response, responses=prometheus_text)  # NIM's path
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)


def _card(served: Served) -> ModelCard:
    b = served.backend
    return ModelCard(id=served.entry.name, created=served.created, root=served.entry.source,
                     backend=b.kind if b else None, dimension=b.dimension if b else None,
                     max_tokens=b.max_tokens if b else None, matryoshka_dims=b.matryoshka_dims if b else None)


def _inputs(raw: str | list, max_inputs: int) -> list[str] | list[list[int]]:
    """One shape for the four accepted ones: a list of texts or a list of token-id lists."""
    if isinstance(raw, str):
        inputs: list = [raw]
    elif raw and isinstance(raw[0], int):
        inputs = [raw]  # a flat list of ints is ONE tokenised input (OpenAI semantics)
    else:
        inputs = list(raw)
    if not inputs:
        raise APIError(400, "input must not be empty", code="empty_input", param="input")
    if len(inputs) > max_inputs:
        raise APIError(400, f"too many inputs: {len(inputs)} > {max_inputs} per request",
                       code="too_many_inputs", param="input")
    for i, item in enumerate(inputs):
        if len(item) == 0:
            kind = "an empty string" if isinstance(item, str) else "an empty token list"
            raise APIError(400, f"input {i} is {kind}", code="empty_input", param="input")
    return inputs


async def _embed(request: EmbeddingRequest, state: ServerState, config: ServeConfig,
                 metrics: Metrics) -> Response:
    served = state.resolve(request.model)
    backend, batcher = served.backend, served.batcher
    assert backend is not None and batcher is not None
    inputs = _inputs(request.input, config.max_inputs)
    try:
        backend.check_dimensions(request.dimensions)
    except DimensionsError as exc:
        raise APIError(400, str(exc), code="invalid_dimensions", param="dimensions") from None
    if batcher.pending_requests >= config.max_queue:  # refuse before spending time on tokenising
        raise _queue_full(config)
    try:
        ids = await run_in_threadpool(backend.tokenize, inputs, request.input_type, request.truncate)
    except InputTooLongError as exc:
        raise APIError(400, str(exc), code="input_too_long", param="input") from None
    except TokenIdError as exc:
        raise APIError(400, str(exc), code="invalid_token_id", param="input") from None
    n_tokens = sum(len(x) for x in ids)
    if n_tokens > config.max_request_tokens:  # one request must not hold the batcher for everyone else
        raise APIError(413, f"the request holds {n_tokens} tokens after tokenisation, more than the "
                       f"{config.max_request_tokens} one request may send (serve.max_request_tokens); "
                       "split it into several requests", code="request_too_large", param="input")
    try:
        vectors = await batcher.submit(ids)
    except QueueFullError:
        raise _queue_full(config) from None
    except ShuttingDownError as exc:
        raise APIError(503, str(exc), code="shutting_down") from None
    vectors = reduce_dimensions(vectors, request.dimensions)
    metrics.tokens.labels(served.entry.name).inc(n_tokens)
    return Response(_render(vectors, request, served.entry.name, n_tokens), media_type="application/json")


def _queue_full(config: ServeConfig) -> APIError:
    return APIError(429, f"the server is busy: {config.max_queue} requests are already queued; retry later",
                    code="rate_limit_exceeded", headers={"Retry-After": "1"})


def _render(vectors: np.ndarray, request: EmbeddingRequest, model: str, n_tokens: int) -> bytes:
    if request.encoding_format == "base64":  # little-endian float32, what the openai client decodes
        encoded: list = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    else:
        encoded = vectors.tolist()
    data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)]
    body = {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}
    return json.dumps(body, separators=(",", ":")).encode()
