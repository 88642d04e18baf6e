"""Issue 17's exfiltration scenario as a regression test, and the rules behind it (items 2 and 3).

The attack: register a server folder (``/etc``) as a dataset, start a job whose recipe sends SDG prompts to
an attacker's ``sdg.llm.base_url`` with ``sdg.llm.api_key_env`` naming a secret of the service; the worker,
which inherited the service's whole environment, posted the file's text and the secret. Every step is now
refused, and a fake attacker server on loopback receives nothing.
"""

from __future__ import annotations

import http.server
import io
import os
import shutil
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from embedtune.platform import PlatformSettings, create_app
from embedtune.platform import db as tables
from embedtune.platform.errors import PlatformError
from embedtune.platform.executors import PASSED_ENV, LocalExecutor, worker_env
from embedtune.platform.sandbox import check_recipe

WS = "/v2/workspaces/default"
SECRET = "s3cret-of-the-service"


class Recorder(http.server.ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 that records every request it gets (path, headers, body)."""

    def __init__(self) -> None:
        self.seen: list[dict] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _record(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                recorder.seen.append({"path": self.path, "headers": dict(self.headers),
                                      "body": self.rfile.read(length)})
                body = b'{"object": "list", "data": []}'
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _record

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture
def attacker():
    server = Recorder()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def api(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVICE_SECRET", SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    settings = PlatformSettings(data_dir=tmp_path / "data")
    app = create_app(settings)
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {(settings.data_dir / 'admin.key').read_text().strip()}"
        client.platform = app.state.platform
        yield client


def corpus_archive() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = b"Sails, tides and harbours: a document long enough to be chunked by the corpus stage."
        info = tarfile.TarInfo("docs/a.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def refused(resp, status: int, param: str | None = None) -> dict:  # noqa: ANN001
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    if param:
        assert err["param"] == param, err
    return err


def job(api: TestClient, recipe: dict):  # noqa: ANN201
    return api.post(f"{WS}/customization/jobs", json={"model": "default", "dataset": "docs", "recipe": recipe})


def test_the_exfiltration_attack_leaks_nothing(api, attacker):
    # 1. a server folder as a dataset: registration is off by default
    err = refused(api.post(f"{WS}/datasets/register", json={"name": "etc", "format": "corpus", "path": "/etc"}),
                  403, "path")
    assert err["code"] == "path_registration_disabled"
    # 2. the LLM endpoint: not on the (empty) allow-list
    assert api.post(f"{WS}/datasets", data={"name": "docs"},
                    files=[("files", ("docs.tar.gz", corpus_archive()))]).status_code == 201
    attack = {"sdg": {"generator": "llm", "llm": {"base_url": attacker.url, "api_key_env": "SERVICE_SECRET"}}}
    refused(job(api, attack), 422, "recipe.sdg.llm.base_url")
    # 3. even with the endpoint allowed by the operator, the secret's name is not one jobs may use
    api.platform.settings.allowed_llm_base_urls = [attacker.url]
    err = refused(job(api, attack), 422, "recipe.sdg.llm.api_key_env")
    assert SECRET not in err["message"] and "SERVICE_SECRET" not in err["message"]
    refused(job(api, {"sdg": {"generator": "llm", "llm": {"base_url": attacker.url}}}), 422,
            "recipe.sdg.llm.api_key_env")  # the default OPENAI_API_KEY is not allowed either
    # 4. server paths through the recipe
    refused(job(api, {"corpus": {"path": "/etc"}}), 422, "recipe.corpus.path")
    refused(job(api, {"model": {"name": "/root"}}), 422, "recipe.model.name")
    refused(job(api, {"eval": {"queries": "/etc"}}), 422, "recipe.eval.queries")
    refused(job(api, {"eval": {"cache_dir": "/tmp"}}), 422, "recipe.eval.cache_dir")
    refused(job(api, {"sdg": {"local": {"model_path": "/etc/passwd"}}}), 422, "recipe.sdg.local.model_path")
    refused(job(api, {"serve": {"api_key_env": "SERVICE_SECRET"}}), 422, "recipe.serve")
    refused(job(api, {"sdg": {"generator": "someone_elses_plugin"}}), 422, "recipe.sdg.generator")
    # 5. nothing was queued, and the attacker heard nothing
    with api.platform.sessions() as s:
        assert s.query(tables.Job).count() == 0
    time.sleep(0.2)
    assert attacker.seen == []


def test_recipe_names_no_server_path_even_inside_the_jobs_own_workspace(tmp_path):
    """A tenant never names a server path: a folder of its own dataset is referred to by the dataset's name,
    which the platform resolves (issue 28; the earlier rule accepted paths under the workspace's folders)."""
    settings = PlatformSettings(data_dir=tmp_path).prepare()
    mine = settings.data_dir / "datasets" / "dataset-mine"
    asked = []

    def resolve(ref: str, param: str, formats: list[str]) -> str:  # the route asks the database
        asked.append((ref, param, formats))
        return str(mine)

    assert check_recipe({"eval": {"queries": "mine"}}, settings, resolve) == {"eval.queries": str(mine)}
    assert asked == [("mine", "recipe.eval.queries", ["beir"])]
    for recipe, param in (({"eval": {"queries": str(mine)}}, "recipe.eval.queries"),
                          ({"eval": {"cache_dir": str(mine)}}, "recipe.eval.cache_dir"),
                          ({"sdg": {"local": {"model_path": str(mine)}}}, "recipe.sdg.local.model_path"),
                          ({"index": {"uri": "http://attacker.example:19530"}}, "recipe.index.uri"),
                          ({"index": {"token_env": "AWS_SECRET_ACCESS_KEY"}}, "recipe.index.token_env"),
                          ({"sdg": {"plugins": {"x": {"path": "/etc"}}}}, "recipe.sdg.plugins")):
        with pytest.raises(PlatformError) as err:
            check_recipe(recipe, settings, resolve)
        assert err.value.param == param
    assert len(asked) == 1


def test_worker_environment_is_minimal(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVICE_SECRET", SECRET)
    monkeypatch.setenv("LLM_KEY", "allowed-by-the-operator")
    settings = PlatformSettings(data_dir=tmp_path, allowed_secret_env=["LLM_KEY"]).prepare()
    env = worker_env(settings)
    assert "SERVICE_SECRET" not in env and SECRET not in "".join(env.values())
    assert env["LLM_KEY"] == "allowed-by-the-operator" and "PATH" in env and env["HF_HUB_OFFLINE"]
    assert set(env) <= {*PASSED_ENV, "LLM_KEY", "EMBEDTUNE_PLATFORM_SETTINGS"}
    # and what a real worker process gets: the interpreter the executor starts is a wrapper that writes its
    # environment to a file, then execs the real worker (which exits: the job does not exist). Reading
    # /proc/<pid>/environ instead raced the worker's exit (an exited process shows an empty environment).
    dump = tmp_path / "worker.environ"
    wrapper = tmp_path / "python"
    # /proc/$$/environ: the block the shell was started with, not what the shell adds to it (PWD...)
    wrapper.write_text(f"#!/bin/sh\n{shutil.which('cat')} /proc/$$/environ > {dump}\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(wrapper))
    executor = LocalExecutor(settings)
    executor.launch("cust-none", tmp_path / "w.log")
    assert executor.procs["cust-none"].wait(60) != 0  # ran (and refused the unknown job)
    assert "cust-none" in (tmp_path / "w.log").read_text()
    seen = dict(item.split("=", 1) for item in dump.read_bytes().decode().split("\0") if "=" in item)
    assert "SERVICE_SECRET" not in seen and seen["LLM_KEY"] == "allowed-by-the-operator"
    assert set(seen) <= {*PASSED_ENV, "LLM_KEY", "EMBEDTUNE_PLATFORM_SETTINGS"}


def test_gateway_never_forwards_the_platform_key(api):
    upstream = Recorder()  # stands in for a deployment's serving process
    try:
        with api.platform.sessions() as s:
            s.add(tables.Deployment(workspace="default", name="d", model="m", model_path="x", status="ready",
                                    url=upstream.url.removesuffix("/v1"), served_model="m"))
            s.commit()
        resp = api.post(f"{WS}/inference/gateway/provider/d/-/v1/embeddings", json={"model": "m", "input": "x"})
        assert resp.status_code == 200, resp.text
        (request,) = upstream.seen
        assert request["path"] == "/v1/embeddings"
        assert "authorization" not in {k.lower() for k in request["headers"]}
    finally:
        upstream.shutdown()
        upstream.server_close()


# ---------------------------------------------------------------------------------------- registration


@pytest.fixture
def roots_api(tmp_path):
    allowed = tmp_path / "allowed"
    (allowed / "docs").mkdir(parents=True)
    (allowed / "docs" / "a.txt").write_text("A document about sails and tides, long enough to count.")
    settings = PlatformSettings(data_dir=tmp_path / "data", allow_path_registration=True, path_roots=[allowed])
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {(settings.data_dir / 'admin.key').read_text().strip()}"
        client.allowed = allowed
        yield client


def register(api: TestClient, path: str | Path, name: str = "d"):  # noqa: ANN201
    return api.post(f"{WS}/datasets/register", json={"name": name, "format": "corpus", "path": str(path)})


def test_registration_is_limited_to_roots_and_does_not_tell_what_exists(roots_api, tmp_path):
    allowed = roots_api.allowed
    os.symlink("/etc", allowed / "etc-link")
    outside = tmp_path / "outside"
    outside.mkdir()
    bodies = {str(p): refused(register(roots_api, p), 422, "path")
              for p in ("/etc", "/etc/passwd", "/no/such/dir", allowed / "missing", allowed / "etc-link",
                        allowed / ".." / "outside", outside)}
    assert len({b["message"] for b in bodies.values()}) == 1, bodies  # one answer for "missing" and "forbidden"
    assert all(str(tmp_path) not in b["message"] for b in bodies.values())
    assert register(roots_api, allowed / "docs").status_code == 201


def test_registered_folder_with_a_link_inside_is_refused(roots_api):
    os.symlink("/etc/passwd", roots_api.allowed / "docs" / "passwd.txt")
    err = refused(register(roots_api, roots_api.allowed / "docs"), 422, "path")
    assert "symbolic link" in err["message"]


def test_model_registration_takes_built_ins_without_the_flag(tmp_path):
    settings = PlatformSettings(data_dir=tmp_path / "data")
    with TestClient(create_app(settings)) as api:
        api.headers["Authorization"] = f"Bearer {(settings.data_dir / 'admin.key').read_text().strip()}"
        assert api.post(f"{WS}/models", json={"name": "base", "path": "default"}).status_code == 201
        refused(api.post(f"{WS}/models", json={"name": "x", "path": str(tmp_path)}), 403, "path")
