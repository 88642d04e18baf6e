"""Response bodies of the platform API (they make the OpenAPI spec precise)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator

T = TypeVar("T")


def unencodable_at(value: Any, where: str) -> str | None:
    """Where in ``value`` (a request field: text, or lists and objects of it) a string cannot be stored as
    UTF-8, i.e. holds a lone surrogate escape such as ``"\\ud800"``; None when every string can."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    if isinstance(value, dict):
        items = [(k, k, where) for k in value] + [(v, k, f"{where}.{k}") for k, v in value.items()]
        for item, key, at in items:
            bad = unencodable_at(item, at if item is not key else f"{where} (a key)")
            if bad:
                return bad
        return None
    if isinstance(value, list | tuple):
        return next((bad for i, v in enumerate(value) if (bad := unencodable_at(v, f"{where}.{i}"))), None)
    return None


class RequestModel(BaseModel):
    """A request body: unknown fields refused, and every text in every field storable (valid Unicode).

    JSON may escape a lone UTF-16 surrogate (``"a\\ud800b"``); Python accepts it, the database cannot
    store it. Checked for all fields at once, so a text field added later is covered too."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any, info: Any) -> Any:
        bad = unencodable_at(value, info.field_name)
        if bad:
            raise ValueError(f"{bad} holds a lone UTF-16 surrogate escape; send valid Unicode text")
        return value


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    @field_serializer("created_at", "updated_at", "started_at", "finished_at", check_fields=False)
    def _utc(self, value: datetime | None) -> str | None:
        return value.replace(tzinfo=UTC).isoformat() if value else None


class ListOf(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]


class WorkspaceCreate(RequestModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "team-a"}]})
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    description: str = ""


class WorkspaceOut(Out):
    name: str
    description: str
    created_at: datetime


class DatasetRegister(RequestModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,255}$")
    format: Literal["corpus", "beir", "training"]
    path: str = Field(description="a file or folder on the service's machine")
    description: str = ""


class DatasetOut(Out):
    id: str
    workspace: str
    name: str
    format: str
    source: str
    path: str
    description: str
    size_bytes: int
    stats: dict[str, Any]
    created_at: datetime


class ModelRegister(RequestModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "base", "path": "default"}]})
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,255}$")
    path: str = Field(description="a sentence-transformers/transformers folder, or a built-in spec")
    description: str = ""


class ModelOut(Out):
    id: str
    workspace: str
    name: str
    kind: str
    path: str
    description: str
    base_model: str | None
    dataset: str | None
    job_id: str | None
    hyperparameters: dict[str, Any]
    metrics: dict[str, Any]
    artifacts: dict[str, Any]
    created_at: datetime


class WorkerOut(BaseModel):
    executor: str | None
    pid: int | None
    host: str | None
    heartbeat_at: float | None
    attempts: int


class JobOut(Out):
    id: str
    workspace: str
    kind: str
    name: str
    status: str
    status_details: dict[str, Any]
    model: str | None = None
    dataset: dict[str, Any] | str | None = None
    stages: list[str]
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    output_model: str | None
    result: dict[str, Any]
    error: str | None
    worker: WorkerOut
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobStatusOut(BaseModel):
    id: str
    status: str
    status_details: dict[str, Any]
    error: str | None


class JobLogsOut(BaseModel):
    id: str
    logs: str
    size_bytes: int
    truncated: bool


class DeploymentCreate(RequestModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"model": "default", "name": "dep"}]})
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,255}$")
    model: str = Field(description="a registered model of the workspace")
    force: bool = Field(False, description="deploy a fine-tuned model that its job's release gate did not pass "
                                           "(it did not beat the base model beyond the noise)")


class DeploymentOut(Out):
    id: str
    workspace: str
    name: str
    model: str
    model_path: str
    status: str
    url: str | None
    port: int | None
    pid: int | None
    served_model: str | None
    error: str | None
    created_at: datetime
    updated_at: datetime


class Health(BaseModel):
    status: str
    database: str
    executor: str
