"""Authentication and authorisation of the platform (issue 17 item 1), through the real app and a real SQLite file.

The matrix iterates ``app.routes``: a route added later is covered without editing this file.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from embedtune.platform import PlatformSettings, create_app
from embedtune.platform.auth import check_auth_setting, create_key, revoke_key

SRC = Path(__file__).resolve().parents[1] / "src"
PUBLIC = {"/v1/health/live", "/v1/health/ready"}


@pytest.fixture
def platform(tmp_path, db_url):
    """The service over HTTP on SQLite, then on PostgreSQL (keys, workspaces and the audit log live there)."""
    settings = PlatformSettings(data_dir=tmp_path / "data", db_url=db_url)
    app = create_app(settings)
    with TestClient(app) as client:
        state = app.state.platform
        admin = (settings.data_dir / "admin.key").read_text().strip()
        with state.sessions() as s:
            team_a = create_key(s, "alice", workspaces=["team-a"])[1]
            team_b = create_key(s, "bob", workspaces=["team-b"])[1]
            revoked_row, revoked = create_key(s, "eve", workspaces=["team-a"])
            revoke_key(s, revoked_row.id)
        for ws in ("team-a", "team-b"):
            assert client.post("/v2/workspaces", json={"name": ws}, headers=bearer(admin)).status_code == 201
        yield {"client": client, "app": app, "admin": admin, "a": team_a, "b": team_b, "revoked": revoked,
               "data_dir": settings.data_dir}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def tgz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def upload_docs(client: TestClient, token: str, workspace: str, name: str = "docs"):  # noqa: ANN201
    archive = tgz({"docs/a.txt": b"Sails and tides: a harbour text long enough to count as a document."})
    return client.post(f"/v2/workspaces/{workspace}/datasets", data={"name": name},
                       files=[("files", ("docs.tar.gz", archive))], headers=bearer(token))


def operations(app) -> list[tuple[str, set[str]]]:  # noqa: ANN001
    """(path template, methods) of every API route, whether mounted directly or through an included router."""
    out = []
    for route in app.routes:
        if isinstance(route, APIRoute):
            out.append((route.path_format, set(route.methods)))
        elif hasattr(route, "effective_route_contexts"):  # FastAPI >= 0.16x includes routers lazily
            out.extend((c.path_format, set(c.methods)) for c in route.effective_route_contexts())
    return out


def every_route(app) -> list[tuple[str, str, str]]:  # noqa: ANN001
    """(method, concrete path into workspace team-b, template) for every operation of the app."""
    out = []
    for template, methods in operations(app):
        path = (template.replace("{workspace}", "team-b").replace("{path}", "v1/embeddings")
                .replace("{job_id}", "cust-0").replace("{name}", "x").replace("{model}", "m")
                .replace("{deployment}", "d"))
        out.extend((method, path, template) for method in sorted(methods))
    return out


def call(client: TestClient, method: str, path: str, headers: dict[str, str]):  # noqa: ANN201
    body = {"dataset": {"namespace": "team-b", "name": "docs"}} if path == "/v1/customization/jobs" else {}
    return client.request(method, path, headers=headers, json=body if method in ("POST", "PUT", "PATCH") else None)


def assert_shaped(resp, status: int) -> dict:  # noqa: ANN001
    assert resp.status_code == status, (resp.request.method, resp.request.url, resp.text)
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_matrix_covers_every_route(platform):
    routes = every_route(platform["app"])
    templates = {t for _, _, t in routes}
    assert len(routes) >= 30 and templates >= PUBLIC and "/v2/admin/audit" in templates
    spec = platform["client"].get("/openapi.json").json()
    assert templates == set(spec["paths"])  # nothing the spec lists escapes the matrix


def test_no_key_wrong_key_revoked_key_are_401_on_every_route_but_health(platform):
    client, admin = platform["client"], platform["admin"]
    key_id = admin.split("-")[1]
    wrong = {
        "none": {},
        "not bearer": {"Authorization": f"Basic {admin}"},
        "garbage": bearer("not-a-key"),
        "right id, wrong secret": bearer(f"etk-{key_id}-{'A' * 43}"),
        "revoked": bearer(platform["revoked"]),
        "non-ascii": {"Authorization": "Bearer etk-clé-é".encode()},  # raw UTF-8 bytes on the wire
    }
    for method, path, template in every_route(platform["app"]):
        for label, headers in wrong.items():
            resp = call(client, method, path, headers)
            if template in PUBLIC:
                assert resp.status_code == 200, (label, path)
                continue
            err = assert_shaped(resp, 401)
            assert err["type"] == "authentication_error" and resp.headers["www-authenticate"] == "Bearer", label


def test_another_workspaces_key_sees_nothing_of_it(platform):
    client, key_a = platform["client"], platform["a"]
    for method, path, template in every_route(platform["app"]):
        resp = call(client, method, path, bearer(key_a))
        if template in PUBLIC:
            continue
        if "{workspace}" in template or template == "/v1/customization/jobs":
            err = assert_shaped(resp, 404)  # as if team-b did not exist
            assert "team-b" in err["message"] and "workspace" in err["message"], (path, err)
        elif template.startswith("/v2/admin") or (template == "/v2/workspaces" and method == "POST"):
            assert_shaped(resp, 403)
        else:
            assert template == "/v2/workspaces" and method == "GET", template  # a new route: decide its rule
            assert [w["name"] for w in resp.json()["data"]] == ["team-a"]


ITEM_PARAMS = ("{job_id}", "{name}", "{model}", "{deployment}")


def seed_items(platform, workspace: str, suffix: str) -> dict[str, str]:  # noqa: ANN001
    """One of each item in ``workspace`` (dataset, model, customization and evaluation job, deployment)."""
    from embedtune.platform import db as tables

    client, admin = platform["client"], platform["admin"]
    ids = {"dataset": f"docs-{suffix}", "model": f"m-{suffix}", "customization": f"cust-{suffix}",
           "evaluation": f"eval-{suffix}", "deployment": f"d-{suffix}"}
    assert upload_docs(client, admin, workspace, ids["dataset"]).status_code == 201
    with platform["app"].state.platform.sessions() as s:
        s.add(tables.Model(workspace=workspace, name=ids["model"], kind="base", path="default"))
        for kind in ("customization", "evaluation"):
            s.add(tables.Job(id=ids[kind], workspace=workspace, kind=kind, status="completed", spec={}, recipe={},
                             stages=["eval"], run_dir="/nonexistent"))
        s.add(tables.Deployment(workspace=workspace, name=ids["deployment"], model=ids["model"],
                                model_path="default", status="ready", url="http://127.0.0.1:9", served_model="m"))
        s.commit()
    return ids


def item_path(template: str, workspace: str, ids: dict[str, str]) -> str:
    job = ids["evaluation"] if "/evaluation/" in template else ids["customization"]
    name = ids["deployment"] if "/deployments/" in template else (
        ids["model"] if "/models/" in template else ids["dataset"])
    return (template.replace("{workspace}", workspace).replace("{job_id}", job).replace("{name}", name)
            .replace("{model}", ids["model"]).replace("{deployment}", ids["deployment"])
            .replace("{path}", "v1/models"))


def test_items_of_another_workspace_are_not_reached_through_ones_own(platform):
    """Every per-item route, with team-a's key on team-a's path naming team-b's items: 404 (each lookup checks
    the item's workspace). Both workspaces hold items, and team-a's own answer: the 404s are not vacuous."""
    client, key_a = platform["client"], platform["a"]
    platform["app"].state.platform.scheduler.shutdown()  # the seeded rows stay as written
    platform["app"].state.platform.scheduler = None
    mine, theirs = seed_items(platform, "team-a", "a"), seed_items(platform, "team-b", "b")
    per_item = [(t, m) for t, methods in operations(platform["app"]) for m in sorted(methods)
                if "{workspace}" in t and any(p in t for p in ITEM_PARAMS)]
    assert len(per_item) >= 12
    safe = [(t, m) for t, m in per_item if m == "GET"]  # reads: the item must be found in its own workspace
    for template, method in safe:
        own = client.request(method, item_path(template, "team-a", mine), headers=bearer(key_a))
        assert own.status_code != 404, (template, own.text)
    for template, method in per_item:
        resp = call(client, method, item_path(template, "team-a", theirs), bearer(key_a))
        assert_shaped(resp, 404)
    # and nothing of team-b was changed by the attempts
    for template, method in safe:
        resp = client.request(method, item_path(template, "team-b", theirs), headers=bearer(platform["b"]))
        assert resp.status_code != 404, (template, resp.text)


def test_admin_key_reaches_every_route_without_5xx(platform):
    client, admin = platform["client"], platform["admin"]
    for method, path, _ in every_route(platform["app"]):
        resp = call(client, method, path, bearer(admin))
        assert resp.status_code not in (401, 403) and resp.status_code < 500, (method, path, resp.text)


def test_cross_workspace_references_are_refused(platform):
    client, admin, key_a = platform["client"], platform["admin"], platform["a"]
    assert upload_docs(client, admin, "team-b").status_code == 201
    body = {"model": "default", "dataset": "team-b/docs", "stages": ["corpus"]}
    err = assert_shaped(client.post("/v2/workspaces/team-a/customization/jobs", json=body, headers=bearer(key_a)),
                        404)
    assert err["param"] == "dataset"
    err = assert_shaped(client.post("/v2/workspaces/team-a/customization/jobs", headers=bearer(key_a),
                                    json={"model": "team-b/default", "dataset": "docs"}), 404)
    assert err["param"] == "model"
    assert_shaped(client.post("/v2/workspaces/team-a/deployments", json={"model": "team-b/default"},
                              headers=bearer(key_a)), 404)
    assert_shaped(client.post("/v2/workspaces/team-a/evaluation/jobs", headers=bearer(key_a),
                              json={"model": "default", "dataset": "team-b/docs"}), 404)
    assert client.get("/v2/workspaces/team-b/datasets/docs", headers=bearer(platform["b"])).status_code == 200


def test_audit_log_records_who_did_what_and_only_admins_read_it(platform):
    client, admin, key_b = platform["client"], platform["admin"], platform["b"]
    assert upload_docs(client, key_b, "team-b").status_code == 201
    assert client.delete("/v2/workspaces/team-b/datasets/docs", headers=bearer(key_b)).status_code == 204
    bob = key_b.split("-")[1]
    events = client.get("/v2/admin/audit", params={"workspace": "team-b"}, headers=bearer(admin)).json()["data"]
    mine = [(e["action"], e["kind"], e["target"]) for e in events if e["actor"].startswith(bob)]
    assert mine == [("delete", "dataset", "docs"), ("create", "dataset", "docs")]  # newest first
    assert any(e["action"] == "create" and e["kind"] == "workspace" for e in events)
    assert_shaped(client.get("/v2/admin/audit", headers=bearer(key_b)), 403)
    keys = client.get("/v2/admin/keys", headers=bearer(admin)).json()["data"]
    assert {k["name"] for k in keys} == {"admin", "alice", "bob", "eve"}
    assert all(set(k) == {"id", "name", "admin", "workspaces", "created_at", "revoked_at"} for k in keys)


def test_keys_are_stored_hashed_and_the_admin_key_file_is_private(platform):
    import sqlite3

    data_dir = platform["data_dir"]
    assert (data_dir / "admin.key").stat().st_mode & 0o777 == 0o600
    with sqlite3.connect(data_dir / "platform.db") as con:
        dump = "\n".join(con.iterdump())
    for token in (platform["admin"], platform["a"], platform["b"]):
        secret = token.split("-", 2)[2]
        assert secret not in dump


def test_no_auth_is_refused_off_loopback():
    check_auth_setting(False, "127.0.0.1")
    check_auth_setting(False, "::1")
    check_auth_setting(True, "0.0.0.0")
    for host in ("0.0.0.0", "10.1.2.3", "example.org", "::"):
        with pytest.raises(ValueError, match="without authentication"):
            check_auth_setting(False, host)


def test_no_auth_flag_serves_anonymously_on_loopback(tmp_path):
    with TestClient(create_app(PlatformSettings(data_dir=tmp_path / "d", auth=False))) as client:
        assert client.get("/v2/workspaces").status_code == 200
    assert not (tmp_path / "d" / "admin.key").exists()


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "embedtune", "platform", *args], capture_output=True, text=True,
                          env=env, timeout=120, cwd=cwd)


def test_cli_data_dir_before_the_subcommand_is_the_one_used(tmp_path):
    """`platform --data-dir d keys ...` acts on d, as `platform keys ... --data-dir d` does, and writes no
    platform-data/ into the working folder (it once did, and a database file got committed)."""
    work, data = tmp_path / "work", tmp_path / "data"
    work.mkdir()
    created = run_cli("--data-dir", str(data), "keys", "create", "ci-bot", "--admin", cwd=work)
    assert created.returncode == 0, created.stderr
    key_id = created.stdout.strip().splitlines()[-1].split("-")[1]
    listed = run_cli("keys", "list", "--data-dir", str(data), cwd=work)  # the console writes to stderr
    assert key_id in listed.stderr
    upgraded = run_cli("--data-dir", str(data), "db", "upgrade", cwd=work)
    assert upgraded.returncode == 0 and str(data / "platform.db") in upgraded.stderr.replace("\n", "")
    assert list(work.iterdir()) == []


def test_cli_keys_create_list_revoke(tmp_path):
    data = tmp_path / "data"
    created = run_cli("keys", "create", "ci-bot", "--workspace", "team-c", "--data-dir", str(data))
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip().splitlines()[-1]
    key_id = token.split("-")[1]
    listed = run_cli("keys", "list", "--json", "--data-dir", str(data))
    assert key_id in listed.stdout and token.split("-", 2)[2] not in listed.stdout
    with TestClient(create_app(PlatformSettings(data_dir=data))) as client:
        assert [w["name"] for w in client.get("/v2/workspaces", headers=bearer(token)).json()["data"]] == ["team-c"]
        assert run_cli("keys", "revoke", key_id, "--data-dir", str(data)).returncode == 0
        assert client.get("/v2/workspaces", headers=bearer(token)).status_code == 401
    refused = run_cli("--no-auth", "--host", "0.0.0.0", "--data-dir", str(data))
    assert refused.returncode == 1 and "without authentication" in refused.stdout + refused.stderr
