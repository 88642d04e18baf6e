"""Request and response bodies of ``/v1/embeddings`` (OpenAI fields + NIM's input_type and truncate)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr
from pydantic_core import PydanticCustomError


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


def _valid_unicode(value: str) -> str:
    """JSON may escape a lone UTF-16 surrogate ("\\ud800"): Python accepts it, the tokenizer and every
    UTF-8 encoder do not. Refused here so it is a 4xx naming the field, not a crash further down."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError(
            "invalid_unicode", "text holds a lone UTF-16 surrogate at character {position}, which is not "
            "valid Unicode", {"position": exc.start}) from None
    return value


Text = Annotated[StrictStr, AfterValidator(_valid_unicode)]
Input = Text | list[Text] | list[StrictInt] | list[list[StrictInt]]


class EmbeddingRequest(BaseModel):
    # Unknown fields are rejected, as OpenAI does: a misspelt "dimension" must not pass silently.
    model_config = ConfigDict(extra="forbid")

    model: Text | None = Field(None, description="served model id; optional when one model is served")
    input: Input
    input_type: Literal["query", "passage", "document"] | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    truncate: Annotated[Literal["NONE", "START", "END"], BeforeValidator(_upper)] = "NONE"
    user: Text | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "embedtune"
    root: str | None = None
    backend: str | None = None
    dimension: int | None = None
    max_tokens: int | None = None
    matryoshka_dims: list[int] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class EmbeddingObject(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32")


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    """What ``/v1/embeddings`` returns (rendered by hand for speed; this model documents it)."""

    object: Literal["list"] = "list"
    data: list[EmbeddingObject]
    model: str
    usage: Usage


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """OpenAI's error shape, used for every 4xx and 5xx."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI ``responses`` entries for these statuses, all in the OpenAI error shape."""
    why = {400: "invalid request", 401: "missing or wrong API key", 404: "unknown model",
           413: "body over serve.max_request_bytes or tokens over serve.max_request_tokens",
           422: "body does not match the schema", 429: "queue full, retry later",
           503: "model loading, failed, or shutting down"}
    return {s: {"model": ErrorBody, "description": why.get(s, "error")} for s in statuses}
