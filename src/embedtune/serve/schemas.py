"""Request and response bodies of ``/v1/embeddings`` (OpenAI fields + NIM's input_type and truncate)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


Input = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


class EmbeddingRequest(BaseModel):
    # Unknown fields are rejected, as OpenAI does: a misspelt "dimension" must not pass silently.
    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = Field(None, description="served model id; optional when one model is served")
    input: Input
    input_type: Literal["query", "passage", "document"] | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    truncate: Annotated[Literal["NONE", "START", "END"], BeforeValidator(_upper)] = "NONE"
    user: StrictStr | None = None


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
