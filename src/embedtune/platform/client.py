"""A small Python client for the embedtune platform service (``embedtune platform``).

    from embedtune.platform.client import PlatformClient

    pc = PlatformClient("http://127.0.0.1:8080", workspace="team")   # key: api_key=... or $EMBEDTUNE_API_KEY
    pc.ensure_workspace()
    pc.upload_dataset("docs", "path/to/documents/")          # a folder is sent as a .tar.gz
    job = pc.create_customization_job(model="default", dataset="docs",
                                      hyperparameters={"epochs": 1, "learning_rate": 2e-5})
    job = pc.wait_job(job["id"])
    dep = pc.wait_deployment(pc.create_deployment(job["output_model"])["name"])
    openai = pc.openai(model=job["output_model"])            # official openai client on the gateway
    openai.embeddings.create(model=job["output_model"], input=["hello"])
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path
from typing import Any

import httpx

from embedtune.platform.db import TERMINAL

API_KEY_ENV = "EMBEDTUNE_API_KEY"


class PlatformAPIError(RuntimeError):
    """A 4xx/5xx answer; ``error`` is the OpenAI-style body's inner object."""

    def __init__(self, status: int, error: dict[str, Any]):
        super().__init__(f"{status}: {error.get('message', error)}")
        self.status, self.error = status, error


class PlatformClient:
    def __init__(self, base_url: str, workspace: str = "default", timeout: float = 300.0,
                 http: httpx.Client | None = None, api_key: str | None = None):
        """``api_key``: the platform key (default: ``$EMBEDTUNE_API_KEY``); sent as ``Authorization: Bearer``."""
        self.base_url = base_url.rstrip("/")
        self.workspace = workspace
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.http = http or httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> PlatformClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------- plumbing

    def _ws(self, *parts: str) -> str:
        return "/".join([f"/v2/workspaces/{self.workspace}", *parts])

    def request(self, method: str, url: str, **kw: Any) -> Any:
        resp = self.http.request(method, url, **kw)
        if resp.status_code >= 400:
            try:
                error = resp.json().get("error", {"message": resp.text})
            except ValueError:
                error = {"message": resp.text}
            raise PlatformAPIError(resp.status_code, error)
        return resp.json() if resp.content else None

    # --------------------------------------------------------------------------------------- workspaces

    def ensure_workspace(self, description: str = "") -> dict:
        try:
            return self.request("POST", "/v2/workspaces", json={"name": self.workspace, "description": description})
        except PlatformAPIError as exc:
            if exc.status not in (403, 409):  # 403: a workspace key may use, not create, a workspace
                raise
            return self.request("GET", self._ws())

    def audit_log(self, workspace: str | None = None, limit: int = 1000) -> list[dict]:
        """Admin keys only: who created, cancelled and deleted what (newest first)."""
        params = {"limit": limit, **({"workspace": workspace} if workspace else {})}
        return self.request("GET", "/v2/admin/audit", params=params)["data"]

    def list_workspaces(self) -> list[dict]:
        return self.request("GET", "/v2/workspaces")["data"]

    # ----------------------------------------------------------------------------------------- datasets

    def upload_dataset(self, name: str, path: str | Path, format: str = "corpus",  # noqa: A002
                       description: str = "") -> dict:
        """Upload a folder (sent as a .tar.gz), an archive, or a single file."""
        path = Path(path)
        if path.is_dir():
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w:gz") as tar:
                tar.add(path, arcname=path.name)
            files = [("files", (f"{path.name}.tar.gz", buf.getvalue(), "application/gzip"))]
        else:
            files = [("files", (path.name, path.read_bytes(), "application/octet-stream"))]
        data = {"name": name, "format": format, "description": description}
        return self.request("POST", self._ws("datasets"), data=data, files=files)

    def register_dataset(self, name: str, path: str | Path, format: str = "corpus",  # noqa: A002
                         description: str = "") -> dict:
        body = {"name": name, "format": format, "path": str(path), "description": description}
        return self.request("POST", self._ws("datasets", "register"), json=body)

    def list_datasets(self) -> list[dict]:
        return self.request("GET", self._ws("datasets"))["data"]

    def get_dataset(self, name: str) -> dict:
        return self.request("GET", self._ws("datasets", name))

    def delete_dataset(self, name: str) -> None:
        self.request("DELETE", self._ws("datasets", name))

    # ------------------------------------------------------------------------------------------- models

    def register_model(self, name: str, path: str | Path, description: str = "") -> dict:
        return self.request("POST", self._ws("models"), json={"name": name, "path": str(path),
                                                              "description": description})

    def list_models(self) -> list[dict]:
        return self.request("GET", self._ws("models"))["data"]

    def get_model(self, name: str) -> dict:
        return self.request("GET", self._ws("models", name))

    def delete_model(self, name: str) -> None:
        self.request("DELETE", self._ws("models", name))

    # --------------------------------------------------------------------------------------------- jobs

    def create_customization_job(self, **body: Any) -> dict:
        """Body fields as in the API: model, dataset, stages, training, schedule, batch, optimizer,
        hyperparameters (older flat form), output, recipe."""
        return self.request("POST", self._ws("customization", "jobs"), json=body)

    def create_evaluation_job(self, **body: Any) -> dict:
        return self.request("POST", self._ws("evaluation", "jobs"), json=body)

    def _jobs(self, kind: str, *parts: str) -> str:
        return self._ws(kind, "jobs", *parts)

    def get_job(self, job_id: str, kind: str = "customization") -> dict:
        return self.request("GET", self._jobs(kind, job_id))

    def list_jobs(self, kind: str = "customization", status: str | None = None) -> list[dict]:
        return self.request("GET", self._jobs(kind), params={"status": status} if status else None)["data"]

    def job_status(self, job_id: str, kind: str = "customization") -> dict:
        return self.request("GET", self._jobs(kind, job_id, "status"))

    def job_logs(self, job_id: str, kind: str = "customization", tail: int | None = None) -> str:
        return self.request("GET", self._jobs(kind, job_id, "logs"), params={"tail": tail} if tail else None)["logs"]

    def cancel_job(self, job_id: str, kind: str = "customization") -> dict:
        return self.request("POST", self._jobs(kind, job_id, "cancel"))

    def wait_job(self, job_id: str, kind: str = "customization", timeout: float = 3600,
                 poll: float = 1.0, until: tuple[str, ...] = TERMINAL) -> dict:
        """Poll until the job reaches one of ``until``; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get_job(job_id, kind)
            if job["status"] in until:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:.0f} s")
            time.sleep(poll)

    # -------------------------------------------------------------------------------------- deployments

    def create_deployment(self, model: str, name: str | None = None, force: bool = False) -> dict:
        """``force``: deploy a fine-tune that its release gate did not pass."""
        body = {"model": model, "name": name} | ({"force": True} if force else {})
        return self.request("POST", self._ws("deployments"), json=body)

    def get_deployment(self, name: str) -> dict:
        return self.request("GET", self._ws("deployments", name))

    def list_deployments(self) -> list[dict]:
        return self.request("GET", self._ws("deployments"))["data"]

    def delete_deployment(self, name: str) -> dict:
        return self.request("DELETE", self._ws("deployments", name))

    def wait_deployment(self, name: str, timeout: float = 300, poll: float = 0.5) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            dep = self.get_deployment(name)
            if dep["status"] in ("ready", "failed"):
                return dep
            if time.monotonic() > deadline:
                raise TimeoutError(f"deployment {name} still {dep['status']} after {timeout:.0f} s")
            time.sleep(poll)

    # ------------------------------------------------------------------------------------------ gateway

    def gateway_url(self, *, model: str | None = None, deployment: str | None = None) -> str:
        """Base URL for an OpenAI client: ``.../model/{name}/-/v1`` or ``.../provider/{deployment}/-/v1``."""
        if (model is None) == (deployment is None):
            raise ValueError("give exactly one of model or deployment")
        target = f"model/{model}" if model else f"provider/{deployment}"
        return f"{self.base_url}{self._ws('inference', 'gateway', target, '-', 'v1')}"

    def openai(self, *, model: str | None = None, deployment: str | None = None,  # noqa: ANN201
               api_key: str | None = None):
        """The official openai client on the gateway, authenticated with the platform key."""
        from openai import OpenAI

        key = api_key or self.api_key or "none"
        return OpenAI(base_url=self.gateway_url(model=model, deployment=deployment), api_key=key)
