"""Models: the shipped built-ins, base model folders an operator allowed, fine-tuned models jobs registered."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response
from sqlalchemy import select

from embedtune.platform import datasets as ds
from embedtune.platform import db
from embedtune.platform.auth import audit
from embedtune.platform.errors import PlatformError
from embedtune.platform.routes.common import ERRORS, WS, P, S, Who, find_model, list_named
from embedtune.platform.sandbox import registrable_path
from embedtune.platform.schemas import ListOf, ModelOut, ModelRegister

router = APIRouter(prefix="/v2/workspaces/{workspace}/models", tags=["models"], responses=ERRORS)


@router.get("", response_model=ListOf[ModelOut])
def list_models(workspace: WS, s: S) -> dict:
    return {"data": list_named(s, db.Model, workspace, order=db.Model.created_at)}


@router.get("/{name}", response_model=ModelOut)
def get_model(workspace: WS, name: str, who: Who, s: S) -> db.Model:
    return find_model(s, who, workspace, name, param="name")


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def holds_model_files(folder: Path) -> bool:
    """A transformers/sentence-transformers folder: its config and its weights, not just any files."""
    return (folder / "config.json").is_file() and any((folder / name).is_file() for name in WEIGHT_FILES)


def _model_path(p: P, raw: str) -> str:
    """A built-in spec as is; a server folder only through operator-enabled registration, under its roots."""
    from embedtune.models import BUILTINS, ModelNotFoundError, _load_optional_builtins, resolve

    _load_optional_builtins()
    if raw in BUILTINS:
        return raw
    folder = registrable_path(p.settings, raw)
    ds.refuse_links(folder, p.settings.max_archive_members)  # as a registered dataset: no way out of the roots
    if folder.is_dir() and not holds_model_files(folder):
        raise PlatformError(422, "the folder holds no model: expected config.json with the weights "
                                 f"({', '.join(WEIGHT_FILES)})", param="path", code="invalid_value")
    try:
        spec = resolve(str(folder))
    except ModelNotFoundError:
        spec = None
    if spec is None or not spec.is_local:
        raise PlatformError(422, "the path is not a model folder (no hub downloads)", param="path",
                            code="invalid_value")
    return spec.path


@router.post("", response_model=ModelOut, status_code=201,
             summary="Register a base model: a built-in name, or a folder under the operator's roots")
def register_model(workspace: WS, body: ModelRegister, who: Who, p: P, s: S) -> db.Model:
    path = _model_path(p, body.path)
    if s.scalar(select(db.Model.id).where(db.Model.workspace == workspace, db.Model.name == body.name)):
        raise PlatformError(409, f"model '{body.name}' already exists in workspace '{workspace}'", param="name",
                            code="already_exists")
    row = db.Model(workspace=workspace, name=body.name, kind="base", path=path, description=body.description)
    s.add(row)
    audit(s, who, "create", "model", body.name, workspace=workspace, detail={"kind": "base"})
    s.commit()
    return row


@router.delete("/{name}", status_code=204)
def delete_model(workspace: WS, name: str, who: Who, s: S) -> Response:
    row = find_model(s, who, workspace, name, param="name")
    if row.workspace != workspace:
        raise PlatformError(403, "a model is deleted from its own workspace", param="name", code="forbidden")
    if s.scalar(select(db.Deployment.id).where(db.Deployment.workspace == workspace, db.Deployment.model == name,
                                               db.Deployment.status.in_(("pending", "ready")))):
        raise PlatformError(409, f"model '{name}' is deployed; delete the deployment first", code="in_use")
    s.delete(row)  # files of a fine-tuned model stay in its job's run dir
    audit(s, who, "delete", "model", name, workspace=workspace, detail={"id": row.id})
    s.commit()
    return Response(status_code=204)
