"""Datasets: upload (multipart archive or files), register a server path (operator-enabled), list, get, delete."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import Response
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from embedtune.platform import datasets as ds
from embedtune.platform import db, quotas
from embedtune.platform.auth import Principal, audit
from embedtune.platform.errors import PlatformError
from embedtune.platform.routes.common import ERRORS, WS, P, S, Who, find_dataset, list_named
from embedtune.platform.sandbox import registrable_path
from embedtune.platform.schemas import DatasetOut, DatasetRegister, ListOf

router = APIRouter(prefix="/v2/workspaces/{workspace}/datasets", tags=["datasets"], responses=ERRORS)
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,255}$"


def _check_new_dataset(s: Session, workspace: str, name: str) -> None:
    if s.scalar(select(db.Dataset.id).where(db.Dataset.workspace == workspace, db.Dataset.name == name)):
        raise PlatformError(409, f"dataset '{name}' already exists in workspace '{workspace}'", param="name",
                            code="already_exists")


def _record_dataset(s: Session, who: Principal, row: db.Dataset, folder: Path) -> db.Dataset:
    s.add(row)
    audit(s, who, "create", "dataset", row.name, workspace=row.workspace,
          detail={"id": row.id, "source": row.source, "format": row.format})
    try:
        s.commit()
    except IntegrityError:
        s.rollback()
        shutil.rmtree(folder, ignore_errors=True)
        raise PlatformError(409, f"dataset '{row.name}' already exists", param="name", code="already_exists") from None
    return row


@router.post("", response_model=DatasetOut, status_code=201,
             summary="Upload a dataset (multipart: one archive, or the files themselves)")
def upload_dataset(
    workspace: WS,
    who: Who,
    p: P,
    s: S,
    name: Annotated[str, Form(pattern=NAME)],
    files: Annotated[list[UploadFile], File(description=".tar.gz/.tgz/.tar/.zip of a folder, or files")],
    format: Annotated[Literal["corpus", "beir", "training"], Form()] = "corpus",  # noqa: A002
    description: Annotated[str, Form(max_length=4096)] = "",
) -> db.Dataset:
    _check_new_dataset(s, workspace, name)
    settings = p.settings
    quotas.check_bytes(s, settings, workspace)
    if len(files) > settings.max_upload_files:
        raise PlatformError(413, f"more than {settings.max_upload_files:,} files in one upload", param="files",
                            code="too_large")
    dataset_id = db.new_id("dataset")
    final = settings.data_dir / "datasets" / dataset_id
    with ds.staging_dir(settings.data_dir / "datasets") as staging:
        content = staging / "files"
        content.mkdir()
        budget = settings.max_upload_bytes
        for upload in files:
            filename = upload.filename or "upload"
            rel = ds.safe_file_name(filename, what="upload file name")
            if ds.is_archive(filename) and len(files) == 1:
                archive = staging / "upload.archive"
                budget -= ds.copy_limited(upload.file, archive, budget, "the upload")
                ds.extract_archive(archive, filename, content, settings)
                archive.unlink()
            else:
                target = content / rel
                # 'x' then 'x/a.txt' (or the reverse): a name cannot be a file and a folder at once
                clash = target.exists() or any((content / p).is_file() for p in rel.parents)
                if clash:
                    raise PlatformError(400, f"uploaded file '{ds.shown(filename)}' clashes with another "
                                             "uploaded file of the same name (or a file where its folder "
                                             "would be)", param="files", code="duplicate_file")
                target.parent.mkdir(parents=True, exist_ok=True)
                budget -= ds.copy_limited(upload.file, target, budget, "the upload")
        root = ds.single_root(content)
        path, stats = ds.validate(format, root, staging, name, settings.max_archive_members)
        size = ds.folder_size(staging, settings.max_archive_members)
        quotas.check_bytes(s, settings, workspace, adding=size)
        os.rename(staging, final)
    row = db.Dataset(id=dataset_id, workspace=workspace, name=name, format=format, source="upload",
                     path=str(final / path.relative_to(staging)), description=description, size_bytes=size,
                     stats=stats)
    return _record_dataset(s, who, row, final)


@router.post("/register", response_model=DatasetOut, status_code=201,
             summary="Register a file or folder on the service's machine (operator-enabled, configured roots)")
def register_dataset(workspace: WS, body: DatasetRegister, who: Who, p: P, s: S) -> db.Dataset:
    src = registrable_path(p.settings, body.path)
    _check_new_dataset(s, workspace, body.name)
    limit = p.settings.max_archive_members
    ds.refuse_links(src, limit)
    dataset_id = db.new_id("dataset")
    own = p.settings.data_dir / "datasets" / dataset_id
    with ds.staging_dir(p.settings.data_dir / "datasets") as staging:
        path, stats = ds.validate(body.format, src, staging, body.name, limit)
        if body.format == "training":  # the normalised copy lives with the platform
            quotas.check_bytes(s, p.settings, workspace, adding=ds.folder_size(staging, limit))
            os.rename(staging, own)
            path = own / path.relative_to(staging)
    row = db.Dataset(id=dataset_id, workspace=workspace, name=body.name, format=body.format, source="path",
                     path=str(path), description=body.description, size_bytes=ds.folder_size(path, limit),
                     stats=stats)
    return _record_dataset(s, who, row, own)


@router.get("", response_model=ListOf[DatasetOut])
def list_datasets(workspace: WS, s: S) -> dict:
    return {"data": list_named(s, db.Dataset, workspace)}


@router.get("/{name}", response_model=DatasetOut)
def get_dataset(workspace: WS, name: str, who: Who, s: S) -> db.Dataset:
    return find_dataset(s, who, workspace, name, param="name")


@router.delete("/{name}", status_code=204)
def delete_dataset(workspace: WS, name: str, who: Who, p: P, s: S) -> Response:
    row = find_dataset(s, who, workspace, name, param="name")
    if row.workspace != workspace:
        raise PlatformError(403, "a dataset is deleted from its own workspace", param="name", code="forbidden")
    active = s.scalars(select(db.Job).where(db.Job.workspace == workspace,
                                            db.Job.status.in_(("created", "pending", *db.ACTIVE)))).all()
    if any(name in (j.spec.get("_training_dataset"), j.spec.get("_validation_dataset"), j.spec.get("dataset"))
           for j in active):
        raise PlatformError(409, f"dataset '{name}' is used by an active job", code="in_use")
    shutil.rmtree(p.settings.data_dir / "datasets" / row.id, ignore_errors=True)  # never a registered path
    s.delete(row)
    audit(s, who, "delete", "dataset", name, workspace=workspace, detail={"id": row.id})
    s.commit()
    return Response(status_code=204)
