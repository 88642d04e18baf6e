"""Issue 28: the recipe allow-list (declared in the config schema, default closed), split names checked where
they are joined, the fixes for inputs that answered 500, quotas, and the deployment delete/health-check race.

Everything here runs the real app in-process (TestClient, real SQLite file); the job that runs to completion
through a worker is in ``test_platform_exfiltration.py``.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import Field, create_model

from embedtune.config import TENANT, EvalConfig, Recipe, RecipeError, load_recipe
from embedtune.platform import PlatformSettings, create_app
from embedtune.platform import db as tables
from embedtune.platform.auth import create_key
from embedtune.platform.errors import PlatformError
from embedtune.platform.processes import HOST
from embedtune.platform.sandbox import check_final, check_recipe, field_policy, leaves
from embedtune.retrieval.beir import load_beir

WS = "/v2/workspaces/default"
KINDS = {"value", "allowed", "dataset", "platform", "closed"}
# A setting whose name says it reaches a file, folder, URL, model or environment variable: never a plain value.
SENSITIVE = re.compile(r"path|dir|url|uri|env|file|model|examples|host|port|collection_uri")
# ...except these, each for a stated reason:
PLAIN_ON_PURPOSE = {
    "sdg.llm.model": "the model name sent to the operator-allowed LLM endpoint; nothing is loaded here",
    "sdg.llm.judge_model": "same, for the judge",
    "finetune.report_to": "a choice (none | tensorboard); the logs go inside the job's own run folder",
}


def tgz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


DOCS = tgz({"docs/a.txt": b"Sails, tides and harbours: a document long enough to be chunked by the corpus stage."})


def beir_tgz(split: str = "test") -> bytes:
    return tgz({"v/corpus.jsonl": b'{"_id": "d1", "text": "sails and tides"}\n{"_id": "d2", "text": "bread"}\n',
                "v/queries.jsonl": b'{"_id": "q1", "text": "sailing"}\n',
                f"v/qrels/{split}.tsv": b"query-id\tcorpus-id\tscore\nq1\td1\t1\n"})


def shaped(resp, status: int, param: str | None = None) -> dict:  # noqa: ANN001
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    if param is not None:
        assert err["param"] == param, err
    return err


def running_app(data_dir: Path, **settings: object):  # noqa: ANN201
    settings_ = PlatformSettings(data_dir=data_dir, **settings)
    app = create_app(settings_)
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {(settings_.data_dir / 'admin.key').read_text().strip()}"
        client.platform = app.state.platform
        client.settings = settings_
        yield client


@pytest.fixture
def api(tmp_path):
    yield from running_app(tmp_path / "data")


@pytest.fixture(scope="module")
def shared_api(tmp_path_factory):
    """One app for the tests that only send requests the service refuses (an app costs ~10 s to start here)."""
    yield from running_app(tmp_path_factory.mktemp("shared") / "data")


def upload(api: TestClient, name: str, archive: bytes = DOCS, fmt: str = "corpus", ws: str = WS):  # noqa: ANN201
    return api.post(f"{ws}/datasets", data={"name": name, "format": fmt}, files=[("files", (f"{name}.tgz", archive))])


def job(api: TestClient, recipe: object, **body: object):  # noqa: ANN201
    return api.post(f"{WS}/customization/jobs", json={"model": "default", "dataset": "docs", "recipe": recipe, **body})


# ------------------------------------------------------------------------------------- the allow-list


def no_datasets(ref: str, param: str, formats: list[str]) -> str:
    raise AssertionError(f"{param} resolved a dataset")


def test_every_recipe_field_declares_what_a_tenant_may_do_with_it():
    keys = dict(leaves())
    assert len(keys) > 100 and "eval.split" in keys and "sdg.llm.base_url" in keys and "serve" in keys
    for key, info in keys.items():
        policy = field_policy(info)
        assert policy[TENANT] in KINDS, (key, policy)
        assert policy["declared"], f"{key} declares nothing: it is closed to tenants; declare it in config.py"
        if SENSITIVE.search(key.rsplit(".", 1)[-1]) and policy[TENANT] == "value":
            assert key in PLAIN_ON_PURPOSE, f"{key} looks like a path/URL/model/env name but is open as a value"
    open_ = sorted(k for k, i in keys.items() if field_policy(i)[TENANT] != "value")
    assert open_ == sorted(["name", "model.name", "corpus.path", "sdg.generator", "sdg.llm.base_url",
                            "sdg.llm.api_key_env", "sdg.local.model_path", "sdg.plugins", "sdg.examples",
                            "eval.dataset", "eval.queries", "eval.cache_dir", "index.uri", "index.token_env", "serve"])


def test_every_setting_that_is_not_a_plain_value_is_refused_by_name():
    settings = PlatformSettings(data_dir=Path("/nonexistent"))
    for key, info in leaves():
        kind = field_policy(info)[TENANT]
        if kind in ("value", "dataset"):
            continue
        recipe: dict = {}
        node = recipe
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = "/etc/passwd"
        with pytest.raises(PlatformError) as err:
            check_recipe(recipe, settings, no_datasets)
        assert err.value.status == 422 and err.value.param == f"recipe.{key}", key


def test_a_new_field_that_declares_nothing_is_closed():
    # A developer adds a setting to a section and forgets to declare it: tenants cannot set it.
    eval_plus = create_model("EvalPlus", __base__=EvalConfig, new_path=(str | None, Field(None)))
    recipe_plus = create_model("RecipePlus", __base__=Recipe, eval=(eval_plus, Field(default_factory=eval_plus)))
    settings = PlatformSettings(data_dir=Path("/nonexistent"))
    with pytest.raises(PlatformError) as err:
        check_recipe({"eval": {"new_path": "/etc"}}, settings, no_datasets, schema=recipe_plus)
    assert err.value.param == "recipe.eval.new_path"
    assert field_policy(dict(leaves(recipe_plus))["eval.new_path"]) == {TENANT: "closed", "declared": False}
    check_recipe({"eval": {"top_k": 5}}, settings, no_datasets, schema=recipe_plus)  # declared values pass


def test_allow_listed_defaults_are_checked_where_the_job_uses_them():
    settings = PlatformSettings(data_dir=Path("/nonexistent"), allowed_sdg_generators=["llm"])
    final = Recipe().model_dump(mode="json")
    with pytest.raises(PlatformError) as err:  # the default generator 'local' is not enabled here
        check_final(final, settings)
    assert err.value.param == "recipe.sdg.generator"
    final["sdg"]["generator"] = "llm"
    with pytest.raises(PlatformError) as err:  # the default endpoint is not on the (empty) URL list
        check_final(final, settings)
    assert err.value.param == "recipe.sdg.llm.base_url"


def test_recipe_sections_that_are_not_objects_are_a_422(api):
    # issue 28 item 2: these were TypeErrors in jobs._set -> 500
    assert upload(api, "docs").status_code == 201
    for recipe, param in (({"model": "x"}, "recipe.model"), ({"corpus": 5}, "recipe.corpus"),
                          ({"finetune": [1, 2]}, "recipe.finetune"), ({"sdg": {"llm": "x"}}, "recipe.sdg.llm")):
        shaped(job(api, recipe, optimizer={"learning_rate": 1e-4}, training={"max_seq_length": 64}), 422, param)
    shaped(job(api, [1, 2]), 422, "recipe")


def test_eval_split_cannot_name_a_file_outside_the_qrels_folder(api, tmp_path):
    # issue 28 item 1: eval.split was joined into folder/"qrels"/f"{split}.tsv" -> any server *.tsv was readable
    leak = tmp_path / "secret" / "leak.tsv"
    leak.parent.mkdir()
    leak.write_text("query-id\tcorpus-id\tscore\nq1\td1\tSECRET-SCORE-COLUMN-2\n")
    assert upload(api, "train", tgz({"t.jsonl": b'{"query": "q", "pos_doc": "p"}\n'}), "training").status_code == 201
    assert upload(api, "val", beir_tgz(), "beir").status_code == 201
    for split in (str(leak.with_suffix("")), "../../../secret/leak", "a/b", "..", ""):
        err = shaped(api.post(f"{WS}/customization/jobs", json={
            "model": "default", "dataset": {"training": "train", "validation": "val"}, "stages": ["finetune", "eval"],
            "recipe": {"finetune": {"max_steps": 1}, "eval": {"split": split}}}), 422, "recipe.eval.split")
        assert "eval.split" in err["message"] and "SECRET" not in err["message"]
    shaped(api.post(f"{WS}/evaluation/jobs", json={"model": "default", "dataset": "val", "split": "../x"}),
           422, "split")
    with api.platform.sessions() as s:
        assert s.query(tables.Job).count() == 0


@pytest.mark.parametrize("split", ["/etc/leak", "../leak", "../../x/leak", "a/b", ".", "..", "", "test\n"])
def test_load_beir_refuses_a_split_that_is_not_a_plain_name(tmp_path, split):
    with pytest.raises(ValueError, match="BEIR split .* is not a plain name"):
        load_beir(tmp_path, split)


def test_the_cli_refuses_a_path_as_split_too():
    with pytest.raises(RecipeError, match="'eval.split'"):
        load_recipe(None, ["eval.split=/etc/leak"])
    assert load_recipe(None, ["eval.split=dev-v2.1"]).eval.split == "dev-v2.1"


def test_eval_queries_is_a_dataset_of_the_workspace_resolved_by_the_platform(api):
    assert upload(api, "docs").status_code == 201
    assert upload(api, "val", beir_tgz(), "beir").status_code == 201
    assert api.post("/v2/workspaces", json={"name": "other"}).status_code == 201
    with api.platform.sessions() as s:
        _, key = create_key(s, "tenant", workspaces=["default"])
    tenant = {"Authorization": f"Bearer {key}"}
    assert upload(api, "theirs", beir_tgz(), "beir", ws="/v2/workspaces/other").status_code == 201
    val_path = api.get(f"{WS}/datasets/val").json()["path"]

    def post(queries: object):  # noqa: ANN202
        return api.post(f"{WS}/customization/jobs", headers=tenant, json={
            "model": "default", "dataset": "docs", "stages": ["corpus"], "recipe": {"eval": {"queries": queries}}})

    shaped(post(val_path), 422, "recipe.eval.queries")  # a server path, even the dataset's own: refused
    shaped(post("/etc"), 422, "recipe.eval.queries")
    shaped(post("docs"), 422, "recipe.eval.queries")  # a corpus, not BEIR
    err = shaped(post("other/theirs"), 404, "recipe.eval.queries")  # a workspace the key may not use
    assert "theirs" in err["message"]
    created = post("val")
    assert created.status_code == 201, created.text
    with api.platform.sessions() as s:
        assert s.get(tables.Job, created.json()["id"]).recipe["eval"]["queries"] == val_path


def test_tenant_uploaded_model_folders_are_not_loaded_by_sdg(api):
    # issue 28 item 8: a dataset upload holding a model folder was accepted as sdg.local.model_path
    files = {"m/config.json": b"{}", "m/pytorch_model.bin": b"not a pickle", "m/doc.txt": b"x" * 50}
    assert upload(api, "docs").status_code == 201
    assert upload(api, "weights", tgz(files)).status_code == 201
    folder = api.get(f"{WS}/datasets/weights").json()["path"]
    for value in (folder, str(Path(folder) / "pytorch_model.bin"), "weights"):
        shaped(job(api, {"sdg": {"local": {"model_path": value}}}), 422, "recipe.sdg.local.model_path")


# ----------------------------------------------------------------------------- input that answered 500


SURROGATE_BODIES = [
    ("post", f"{WS}/customization/jobs", {"model": "default", "dataset": "a\ud800b"}, "dataset"),
    ("post", f"{WS}/customization/jobs", {"model": "a\ud800", "dataset": "docs"}, "model"),
    ("post", f"{WS}/customization/jobs", {"name": "\udc00", "model": "default", "dataset": "docs"}, "name"),
    ("post", f"{WS}/customization/jobs", {"model": "default", "dataset": "docs",
                                          "recipe": {"model": {"query_prompt": "q\ud800"}}}, "recipe"),
    ("post", f"{WS}/customization/jobs", {"model": "default", "dataset": "docs",
                                          "recipe": {"sdg": {"query_mix": {"k\ud800": 1}}}}, "recipe"),
    ("post", "/v1/customization/jobs", {"dataset": {"namespace": "d\ud800", "name": "docs"}},
     "dataset.object.namespace"),
    ("post", f"{WS}/evaluation/jobs", {"model": "default", "dataset": "x\ud800"}, "dataset"),
    ("post", f"{WS}/evaluation/jobs", {"name": "\ud800", "model": "default", "dataset": "val"}, "name"),
    ("post", f"{WS}/deployments", {"model": "m\ud800"}, "model"),
    ("post", f"{WS}/models", {"name": "m", "path": "default", "description": "\ud800"}, "description"),
    ("post", f"{WS}/datasets/register", {"name": "d", "format": "corpus", "path": "/x", "description": "\ud800"},
     "description"),
    ("post", "/v2/workspaces", {"name": "w", "description": "\ud800"}, "description"),
]


@pytest.mark.parametrize(("method", "path", "body", "param"), SURROGATE_BODIES)
def test_a_lone_surrogate_in_any_text_field_is_a_422(shared_api, method, path, body, param):
    # issue 28 item 3: SQLite could not store the text -> UnicodeEncodeError -> 500
    raw = json.dumps(body)  # ensure_ascii: the surrogate travels as the escape "\ud800", as an attacker sends it
    resp = shared_api.request(method.upper(), path, content=raw, headers={"content-type": "application/json"})
    err = shaped(resp, 422)
    assert err["param"].startswith(param) and "surrogate" in err["message"], err


def test_an_upload_of_a_file_and_a_folder_of_the_same_name_is_a_400(api):
    # issue 28 item 4: 'x' then 'x/a.txt' -> FileExistsError -> 500 (the reverse order was already a 400)
    for names in (("x", "x/a.txt"), ("x/a.txt", "x"), ("x", "x/y/a.txt")):
        files = [("files", (n, b"some document text long enough to count")) for n in names]
        err = shaped(api.post(f"{WS}/datasets", data={"name": "d"}, files=files), 400, "files")
        assert err["code"] == "duplicate_file"
    assert not list((api.settings.data_dir / "datasets").iterdir())  # nothing half-written left behind


@pytest.fixture
def roots_api(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    settings = PlatformSettings(data_dir=tmp_path / "data", allow_path_registration=True, path_roots=[allowed])
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {(settings.data_dir / 'admin.key').read_text().strip()}"
        client.allowed = allowed
        yield client


def model_folder(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"\0" * 16)
    return path


def test_model_registration_refuses_links_and_folders_without_a_model(roots_api):
    # issue 28 item 5: a folder with a link out of the roots, or with only doc.txt, was registered (201)
    linked = model_folder(roots_api.allowed / "linked")
    os.symlink("/etc/passwd", linked / "tokenizer.json")
    err = shaped(roots_api.post(f"{WS}/models", json={"name": "a", "path": str(linked)}), 422, "path")
    assert "symbolic link" in err["message"]
    docs = roots_api.allowed / "docs"
    docs.mkdir()
    (docs / "doc.txt").write_text("not a model")
    err = shaped(roots_api.post(f"{WS}/models", json={"name": "b", "path": str(docs)}), 422, "path")
    assert "no model" in err["message"]
    ok = roots_api.post(f"{WS}/models", json={"name": "c", "path": str(model_folder(roots_api.allowed / "m"))})
    assert ok.status_code == 201, ok.text


def test_platform_db_and_its_journal_are_private(api):
    # issue 28 item 10: created 0644 (the umask's default)
    data = api.settings.data_dir
    assert upload(api, "docs").status_code == 201  # something written: the WAL exists
    for name in ("platform.db", "platform.db-wal", "platform.db-shm"):
        if (data / name).exists() or name == "platform.db":
            assert (data / name).stat().st_mode & 0o777 == 0o600, name


def test_two_authorization_headers_are_refused(api):
    # issue 28 item 10: the last header won. Sent as a list of pairs: httpx.Headers would fold the two into one
    # comma-joined header (a wrong token either way), and the test would pass on the old code.
    good = api.headers.pop("Authorization")
    pairs = [("authorization", "Bearer wrong"), ("authorization", good)]
    for order in (pairs, pairs[::-1]):
        shaped(api.get("/v2/workspaces", headers=order), 401)
    assert api.get("/v2/workspaces", headers=[("authorization", good)]).status_code == 200


def test_two_authorization_headers_are_refused_by_serve():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from embedtune.serve.guard import Guard
    from embedtune.serve.metrics import Metrics

    inner = Starlette(routes=[Route("/v1/models", lambda _: JSONResponse({"data": []}))])
    with TestClient(Guard(inner, Metrics(), api_key="right", max_body=1 << 20)) as client:
        assert client.get("/v1/models", headers={"Authorization": "Bearer right"}).status_code == 200
        pairs = [("authorization", "Bearer wrong"), ("authorization", "Bearer right")]
        for order in (pairs, pairs[::-1]):
            resp = client.get("/v1/models", headers=order)
            assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"


# ------------------------------------------------------------------------------------------- quotas


@pytest.fixture
def small(tmp_path, db_url):
    """Quotas are counted in the database: on SQLite and on PostgreSQL."""
    yield from running_app(tmp_path / "data", db_url=db_url, quota_jobs=2, quota_deployments=1, quota_bytes=4000)


def over(resp, limit: str) -> dict:  # noqa: ANN001
    err = shaped(resp, 429, limit)
    assert err["type"] == "rate_limit_error" and err["code"] == "quota_exceeded" and limit in err["message"]
    return err


def without_scheduler(client: TestClient) -> None:
    """Stop the app's scheduler: queued jobs stay queued, and no background health check races the test."""
    client.platform.scheduler.shutdown()
    client.platform.scheduler = None


def test_queued_and_running_jobs_are_capped_per_workspace(small):
    without_scheduler(small)
    assert upload(small, "docs").status_code == 201
    assert small.post("/v2/workspaces", json={"name": "other"}).status_code == 201
    assert upload(small, "docs", ws="/v2/workspaces/other").status_code == 201
    body = {"model": "default", "dataset": "docs", "stages": ["corpus"]}
    with small.platform.sessions() as s:  # two queued jobs, written as the scheduler would find them
        for i in range(2):
            s.add(tables.Job(id=f"cust-{i}", workspace="default", kind="customization", status="created",
                             spec={}, recipe={}, stages=["corpus"], run_dir="/nonexistent"))
        s.commit()
    over(small.post(f"{WS}/customization/jobs", json=body), "quota_jobs")
    over(small.post(f"{WS}/evaluation/jobs", json={"model": "default", "dataset": "docs"}), "quota_jobs")
    resp = small.post("/v2/workspaces/other/customization/jobs", json=body)  # another workspace's own quota
    assert resp.status_code == 201, resp.text
    with small.platform.sessions() as s:  # a finished job frees its slot
        tables.transition(s, "cust-0", "created", status="cancelled")
    assert small.post(f"{WS}/customization/jobs", json=body).status_code == 201


def test_running_deployments_are_capped_per_workspace(small):
    without_scheduler(small)
    with small.platform.sessions() as s:
        s.add(tables.Deployment(workspace="default", name="d1", model="default", model_path="default",
                                status="ready", url="http://127.0.0.1:9", served_model="m"))
        s.add(tables.Deployment(workspace="default", name="gone", model="default", model_path="default",
                                status="deleted"))
        s.commit()
    over(small.post(f"{WS}/deployments", json={"model": "default", "name": "d2"}), "quota_deployments")


def test_stored_bytes_are_capped_per_workspace(small):
    without_scheduler(small)
    assert upload(small, "docs").status_code == 201  # ~90 bytes of the 4,000
    big = tgz({"docs/b.txt": b"A long document about sails. " * 200})  # ~5,800 bytes extracted
    over(upload(small, "big", big), "quota_bytes")
    assert [d["name"] for d in small.get(f"{WS}/datasets").json()["data"]] == ["docs"]
    assert len(list((small.settings.data_dir / "datasets").iterdir())) == 1  # the refused upload left nothing
    (small.settings.data_dir / "jobs" / "cust-x").mkdir(parents=True)  # a job's outputs count too
    with small.platform.sessions() as s:
        s.add(tables.Job(id="cust-x", workspace="default", kind="customization", status="completed", spec={},
                         recipe={}, stages=["corpus"], run_dir="/x"))
        s.commit()
    (small.settings.data_dir / "jobs" / "cust-x" / "model.bin").write_bytes(b"\0" * 4000)
    over(upload(small, "tiny", tgz({"t.txt": b"a small document about tides and harbours"})), "quota_bytes")
    over(small.post(f"{WS}/customization/jobs", json={"model": "default", "dataset": "docs"}), "quota_bytes")


def test_quota_flags_reach_the_settings():
    out = subprocess.run([sys.executable, "-m", "embedtune", "platform", "--help"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
                              "COLUMNS": "200"}, timeout=120)
    assert all(flag in out.stdout for flag in ("--quota-deployments", "--quota-jobs", "--quota-gb")), out.stdout


# ------------------------------------------------------------------------ deployments: delete vs health


def test_a_deployment_deleted_during_a_health_check_stays_deleted(api, monkeypatch):
    # issue 28 item 6: the health check loaded the row, the DELETE committed, the check then wrote 'failed'
    without_scheduler(api)
    dead = subprocess.Popen(["true"])
    dead.wait()
    with api.platform.sessions() as s:
        s.add(tables.Deployment(workspace="default", name="d", model="default", model_path="default",
                                status="ready", url="http://127.0.0.1:9", pid=dead.pid,
                                host=HOST))
        s.commit()
    manager = api.platform.deployments
    original = manager._exited

    def exited_while_deleted(dep):  # noqa: ANN001, ANN202
        assert api.delete(f"{WS}/deployments/d").status_code == 200  # the user's DELETE lands mid-check
        return original(dep)

    monkeypatch.setattr(manager, "_exited", exited_while_deleted)
    manager.check()
    with api.platform.sessions() as s:
        (row,) = s.query(tables.Deployment).all()
        assert row.status == "deleted", row.error
    shaped(api.get(f"{WS}/deployments/d"), 404)
    assert api.get(f"{WS}/deployments", params={"include_deleted": True}).json()["data"][0]["status"] == "deleted"


def test_an_undeclared_method_is_a_405_naming_the_allowed_ones(shared_api):
    """RFC 9110: a 405 carries an Allow header (schemathesis' CLI run against the service found it missing)."""
    resp = shared_api.request("TRACE", f"{WS}/datasets")
    assert resp.status_code == 405
    assert set(resp.headers["allow"].replace(" ", "").split(",")) == {"GET", "POST"}
    assert resp.json()["error"]["code"] == "method_not_allowed"
