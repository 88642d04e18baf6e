"""``POST /v1/search``: hybrid (dense + BM25), dense or BM25 search over a run's Milvus index.

The query is embedded by the served model through the same dynamic batcher as ``/v1/embeddings``; the
index is searched by :class:`~embedtune.retrieval.milvus.MilvusSearcher` with the fusion and weight the
run stored with the index, which is exactly what ``embedtune eval --index`` scores. A server whose loaded
model is not the one that filled the index refuses to search (503) rather than rank with mismatched vectors.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.concurrency import run_in_threadpool

from embedtune.serve.errors import APIError
from embedtune.serve.schemas import error_responses

if TYPE_CHECKING:
    from embedtune.retrieval.milvus import MilvusSearcher
    from embedtune.serve.app import Served, ServerState
    from embedtune.serve.backends import Backend

log = logging.getLogger("embedtune.serve")
MAX_TOP_K = 1000


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = Field(None, description="served model id; optional when one model is served")
    query: StrictStr = Field(..., min_length=1, max_length=20_000)
    top_k: StrictInt = Field(10, ge=1, le=MAX_TOP_K)
    mode: Literal["hybrid", "dense", "bm25"] | None = Field(
        None, description="default: the mode the run's release gate deployed (hybrid unless dense alone won)")
    dimensions: StrictInt | None = Field(None, ge=1)


class SearchHit(BaseModel):
    object: Literal["search.result"] = "search.result"
    rank: int
    id: str
    doc_id: str
    title: str
    text: str
    score: float


class SearchResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[SearchHit]
    model: str
    mode: str
    usage: dict[str, int]


def attach_index(served: Served, index: Path) -> None:
    """Open ``index`` for ``served`` (after its backend loaded); a mismatch or an unreachable store is
    kept as the reason /v1/search answers 503, never a crash of the server."""
    from embedtune.retrieval.deployment import read_info, searcher_for

    try:
        info = read_info(index)
        mismatch = _model_mismatch(info, served.entry.source, served.backend)
        if mismatch:
            served.search_error = mismatch
            log.error("model %s: /v1/search disabled: %s", served.entry.name, mismatch)
            return
        served.searcher = searcher_for(index, embed=_no_text_embedding)
        served.search_mode = info.mode
        log.info("model %s: /v1/search over collection %s (%d chunks, %s fusion, BM25 weight %s)",
                 served.entry.name, info.alias, info.chunks, info.fusion, info.bm25_weight)
    except Exception as exc:  # noqa: BLE001 - reported by /v1/search as 503
        served.search_error = f"index {index} could not be opened: {exc}"
        log.error("model %s: %s", served.entry.name, served.search_error)


def add_search_route(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/search", response_model=SearchResponse,
              responses=error_responses(400, 401, 404, 413, 422, 429, 503))
    async def search(request: SearchRequest) -> SearchResponse:
        served = state.resolve(request.model)
        searcher = _searcher_of(served)
        backend, batcher = served.backend, served.batcher
        assert backend is not None and batcher is not None
        ids = await run_in_threadpool(backend.tokenize, [request.query], "query", "END")
        vectors = await batcher.submit(ids)
        try:
            mode = request.mode or served.search_mode
            hits = await run_in_threadpool(searcher.search, [request.query], mode, request.top_k,
                                           request.dimensions, True, vectors)
        except ValueError as exc:
            raise APIError(400, str(exc), code="invalid_dimensions", param="dimensions") from None
        except Exception as exc:  # noqa: BLE001 - the store went away: a retryable 503, not a 500
            log.error("search failed: %s", exc)
            raise APIError(503, f"the vector store did not answer: {type(exc).__name__}", code="store_unavailable",
                           headers={"Retry-After": "5"}) from None
        n_tokens = sum(len(x) for x in ids)
        data = [SearchHit(rank=i, id=h.id, doc_id=h.doc_id, title=h.title, text=h.text, score=h.score)
                for i, h in enumerate(hits[0], 1)]
        return SearchResponse(data=data, model=served.entry.name, mode=mode,
                              usage={"prompt_tokens": n_tokens, "total_tokens": n_tokens})


def _searcher_of(served: Served) -> MilvusSearcher:
    if served.searcher is not None:
        return served.searcher
    if served.search_error:
        raise APIError(503, f"search is unavailable for model `{served.entry.name}`: {served.search_error}",
                       code="index_unavailable")
    raise APIError(404, f"model `{served.entry.name}` has no index: serve a run directory that has one "
                        "(`embedtune deploy -r RUN`) or pass --index", code="index_not_found", param="model")


def _model_mismatch(info, source: str, backend: Backend | None) -> str | None:
    """Why the served model differs from the one that filled the index (None: same weights, same precision)."""
    if backend is None:
        return "the model did not load"
    served_path, index_path = _weights_path(source), Path(info.model_path).resolve()
    kind = "onnx" if backend.kind.startswith("onnx") else "torch"
    precision = backend.kind.removeprefix("onnx-") if kind == "onnx" else None
    if (kind, served_path) != (info.model_kind, index_path) or (kind == "onnx" and precision != info.model_precision):
        return (f"the index was built with {info.model_kind} {info.model_precision or ''} {index_path}, this "
                f"server loaded {backend.kind} {served_path}: rerun `embedtune deploy` or serve the same model")
    return None


def _weights_path(source: str) -> Path:
    """A served source's folder: itself, or where a built-in name (``default``) resolves to."""
    path = Path(source).expanduser()
    if path.exists():
        return path.resolve()
    from embedtune.models import resolve

    return Path(resolve(source).path).resolve()


def _no_text_embedding(texts):  # the server passes vectors from its batcher; text is never embedded here
    raise RuntimeError("the server embeds queries through its batcher")
