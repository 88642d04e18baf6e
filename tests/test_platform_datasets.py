"""Dataset uploads and registrations through the real app (in-process client, real SQLite file):
archives are extracted safely, every format is validated, and every refusal is a 4xx in the OpenAI shape
that names the problem (file and line for JSONL)."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from embedtune.platform import PlatformSettings, create_app

WS = "/v2/workspaces/default"


@pytest.fixture
def api(tmp_path, db_url):
    """The service on SQLite, then on PostgreSQL (dataset rows, quotas and names live in the database)."""
    settings = PlatformSettings(data_dir=tmp_path / "data", db_url=db_url,
                                max_upload_bytes=200_000, max_extracted_bytes=400_000,
                                allow_path_registration=True, path_roots=[tmp_path])
    with TestClient(create_app(settings)) as client:
        client.data_dir = settings.data_dir
        client.headers["Authorization"] = f"Bearer {(settings.data_dir / 'admin.key').read_text().strip()}"
        yield client


def targz(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buf.getvalue()


def zipped(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


DOCS = {f"corpus/doc{i}.txt": f"Document {i} talks about sails, tides and harbours at length.".encode()
        for i in range(3)}


def upload(api, name: str, files: list[tuple[str, bytes]], fmt: str = "corpus"):  # noqa: ANN001, ANN201
    return api.post(f"{WS}/datasets", data={"name": name, "format": fmt},
                    files=[("files", (fn, data)) for fn, data in files])


def assert_error(resp, status: int, *fragments: str, code: str | None = None) -> dict:  # noqa: ANN001
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for fragment in fragments:
        assert fragment in err["message"], err["message"]
    if code:
        assert err["code"] == code
    return err


def beir_files(bad_query_line: bool = False) -> dict[str, bytes]:
    corpus = "".join(json.dumps({"_id": f"d{i}", "title": "", "text": f"passage {i}"}) + "\n" for i in range(4))
    queries = json.dumps({"_id": "q1", "text": "first"}) + "\n"
    queries += "{not json\n" if bad_query_line else json.dumps({"_id": "q2", "text": "second"}) + "\n"
    qrels = "query-id\tcorpus-id\tscore\nq1\td0\t1\nq2\td1\t1\n"
    return {"beir/corpus.jsonl": corpus.encode(), "beir/queries.jsonl": queries.encode(),
            "beir/qrels/test.tsv": qrels.encode()}


def test_corpus_archive_upload_list_get_delete(api):
    resp = upload(api, "docs", [("corpus.tar.gz", targz(DOCS))])
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert ds["format"] == "corpus" and ds["stats"]["files"] == 3 and ds["source"] == "upload"
    assert sorted(p.name for p in Path(ds["path"]).iterdir()) == ["doc0.txt", "doc1.txt", "doc2.txt"]
    assert [d["name"] for d in api.get(f"{WS}/datasets").json()["data"]] == ["docs"]
    assert api.get(f"{WS}/datasets/docs").json()["id"] == ds["id"]
    assert_error(upload(api, "docs", [("corpus.tar.gz", targz(DOCS))]), 409, "already exists")
    assert api.delete(f"{WS}/datasets/docs").status_code == 204
    assert not Path(ds["path"]).exists()
    assert_error(api.get(f"{WS}/datasets/docs"), 404, "dataset 'docs' not found", code="dataset_not_found")


def test_zip_and_plain_files_upload(api):
    assert upload(api, "z", [("c.zip", zipped(DOCS))]).json()["stats"]["files"] == 3
    plain = [("a.md", b"# Title\n\nSome text about ovens and bread."), ("b.txt", b"More text about flour.")]
    assert upload(api, "p", plain).json()["stats"]["files"] == 2


def test_too_big_upload_is_413_before_reading(api):
    err = assert_error(upload(api, "big", [("big.txt", b"x" * 2_000_000)]), 413, "exceeds the limit")
    assert err["code"] == "too_large"
    assert not list((api.data_dir / "datasets").iterdir())  # nothing left behind


def test_archive_bomb_is_413(api):
    bomb = targz({"corpus/zeros.txt": b"0" * 1_000_000})  # compresses to a few KB, extracts past the limit
    assert len(bomb) < 200_000
    assert_error(upload(api, "bomb", [("bomb.tar.gz", bomb)]), 413, "extracted size")


def test_bad_archive_is_400(api):
    assert_error(upload(api, "bad", [("corpus.tar.gz", b"this is not gzip at all")]), 400,
                 "not a readable archive", code="bad_archive")
    assert_error(upload(api, "bad2", [("corpus.zip", b"PK\x03\x04 broken")]), 400, code="bad_archive")


@pytest.mark.parametrize("make", [
    lambda: ("t.tar.gz", targz({"../evil.txt": b"pwned"})),
    lambda: ("t.tar.gz", targz({"/tmp/evil-abs.txt": b"pwned"})),
    lambda: ("t.zip", zipped({"docs/../../evil.txt": b"pwned"})),
    lambda: ("t.tar.gz", targz({"ok.txt": b"fine text here"}, symlinks={"link.txt": "/etc/passwd"})),
    lambda: ("../evil.txt", b"pwned via the multipart file name"),
], ids=["tar-dotdot", "tar-absolute", "zip-dotdot", "tar-symlink", "multipart-name"])
def test_path_traversal_is_refused(api, tmp_path, make):
    filename, data = make()
    err = assert_error(upload(api, "evil", [(filename, data)]), 400, code="unsafe_archive")
    assert "path traversal" in err["message"] or "link" in err["message"]
    written = [p for p in tmp_path.rglob("*evil*")]
    assert written == [], written
    assert not list((api.data_dir / "datasets").iterdir())


def test_training_jsonl_is_validated_and_normalised(api):
    good = (json.dumps({"query": "what is a mast", "pos_doc": "A mast holds the sails.",
                        "neg_doc": ["Flour is milled grain.", "Bonds pay interest."]}) + "\n"
            + json.dumps({"query": "how do tides work", "pos_doc": ["The moon pulls the sea."]}) + "\n")
    resp = upload(api, "train", [("training.jsonl", good.encode())], fmt="training")
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert ds["stats"] == {"examples": 2, "with_negatives": 1}
    rows = [json.loads(line) for line in Path(ds["path"]).read_text().splitlines()]
    assert rows[0]["pos_doc"] == ["A mast holds the sails."] and rows[0]["neg_ids"][0].startswith("d_")
    assert rows[1]["neg_doc"] == [] and rows[0]["query_id"] != rows[1]["query_id"]


@pytest.mark.parametrize(("body", "fragment"), [
    ('{"query": "a", "pos_doc": "b"}\n{"query": "c", "pos_doc": "d"}\n{oops\n', "training.jsonl:3: malformed JSON"),
    ('{"query": "a", "pos_doc": "b"}\n\n{"query": "c"}\n', "training.jsonl:3: pos_doc is missing"),
    ('{"query": "", "pos_doc": "b"}\n', "training.jsonl:1: query must be a non-empty string"),
    ('{"query": "a", "pos_doc": [1, 2]}\n', "training.jsonl:1: pos_doc must be a string or a list of strings"),
    ('[1, 2]\n', "training.jsonl:1: expected a JSON object"),
    ("", "no training examples"),
])
def test_malformed_training_jsonl_names_the_line(api, body, fragment):
    assert_error(upload(api, "t", [("training.jsonl", body.encode())], fmt="training"), 422, fragment,
                 code="invalid_dataset")


def test_corpus_jsonl_missing_text_names_the_line(api):
    body = b'{"_id": "a", "text": "fine text"}\n{"_id": "b", "title": "no text"}\n'
    assert_error(upload(api, "c", [("docs.jsonl", body)]), 422, "docs.jsonl:2: missing field text")


def test_beir_upload_and_bad_beir(api):
    ok = upload(api, "beir", [("beir.tar.gz", targz(beir_files()))], fmt="beir").json()
    assert ok["stats"]["documents"] == 4 and ok["stats"]["splits"]["test"] == {"queries": 2, "qrels": 2}
    assert Path(ok["path"]).name == "beir"
    assert_error(upload(api, "beir2", [("b.tar.gz", targz(beir_files(bad_query_line=True)))], fmt="beir"),
                 422, "queries.jsonl:2: malformed JSON")
    assert_error(upload(api, "beir3", [("c.tar.gz", targz(DOCS))], fmt="beir"), 422, "is not BEIR")


def test_register_server_path_is_not_deleted_with_the_dataset(api, tmp_path):
    folder = tmp_path / "shared-docs"
    folder.mkdir()
    (folder / "a.txt").write_text("Text about compilers and caches, long enough to count.")
    resp = api.post(f"{WS}/datasets/register", json={"name": "shared", "format": "corpus", "path": str(folder)})
    assert resp.status_code == 201 and resp.json()["source"] == "path" and resp.json()["path"] == str(folder)
    assert api.delete(f"{WS}/datasets/shared").status_code == 204
    assert (folder / "a.txt").is_file()
    missing = {"name": "x", "format": "corpus", "path": str(tmp_path / "nope")}
    assert_error(api.post(f"{WS}/datasets/register", json=missing), 422, "cannot be registered")


def test_workspaces_models_and_validation_errors(api, tmp_path):
    assert api.post("/v2/workspaces", json={"name": "team-a"}).status_code == 201
    assert_error(api.post("/v2/workspaces", json={"name": "team-a"}), 409, "already exists")
    err = assert_error(api.post("/v2/workspaces", json={"name": "bad name!"}), 422)
    assert err["param"] == "name"
    names = [m["name"] for m in api.get("/v2/workspaces/team-a/models").json()["data"]]
    assert names == ["default"]  # every workspace can start from the shipped model
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # a model folder: its config and weights (issue 28 item 5)
    (folder / "model.safetensors").write_bytes(b"\0" * 8)
    assert api.post("/v2/workspaces/team-a/models", json={"name": "mine", "path": str(folder)}).json()["kind"] == "base"
    err = assert_error(api.post("/v2/workspaces/team-a/models", json={"name": "x", "path": str(tmp_path / "no")}),
                       422, "cannot be registered")
    assert err["param"] == "path"
    assert_error(api.get("/v2/workspaces/nope/datasets"), 404, "workspace 'nope' not found")
    assert api.delete("/v2/workspaces/team-a").status_code == 204


def test_evaluation_job_requests_are_checked(api):
    upload(api, "docs", [("corpus.tar.gz", targz(DOCS))])
    upload(api, "beir", [("beir.tar.gz", targz(beir_files()))], fmt="beir")
    assert_error(api.post(f"{WS}/evaluation/jobs", json={"model": "default", "dataset": "docs"}), 422,
                 "needs BEIR")
    assert_error(api.post(f"{WS}/evaluation/jobs", json={"model": "default", "dataset": "beir", "split": "dev"}),
                 422, "no split 'dev'")
    assert_error(api.post(f"{WS}/evaluation/jobs", json={"model": "default", "deployment": "d", "dataset": "beir"}),
                 422, "exactly one of")
    assert_error(api.post(f"{WS}/evaluation/jobs", json={"deployment": "d", "dataset": "beir"}), 404,
                 "deployment 'd' not found")
