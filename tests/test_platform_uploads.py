"""Uploads cannot fill the disk and bad input is a 4xx, never a 500 (issue 17 items 4 and 5, platform part).

Real app, real SQLite file, bodies sent as a client would: declared lengths, chunked bodies, bombs.
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile

import pytest
from fastapi.testclient import TestClient

from embedtune.platform import PlatformSettings, create_app

WS = "/v2/workspaces/default"


@pytest.fixture
def api(tmp_path, db_url):
    """The service on SQLite, then on PostgreSQL (dataset rows, quotas and names live in the database)."""
    settings = PlatformSettings(data_dir=tmp_path / "data", db_url=db_url,
                                max_upload_bytes=300_000, max_extracted_bytes=20_000_000,
                                max_compression_ratio=20, max_json_bytes=100_000)
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {(settings.data_dir / 'admin.key').read_text().strip()}"
        client.data_dir = settings.data_dir
        yield client


def targz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def upload(api: TestClient, files: list[tuple[str, bytes]], fmt: str = "corpus", name: str = "d"):  # noqa: ANN201
    return api.post(f"{WS}/datasets", data={"name": name, "format": fmt},
                    files=[("files", (fn, data)) for fn, data in files])


def error(resp, status: int, *fragments: str) -> dict:  # noqa: ANN001
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for fragment in fragments:
        assert fragment in err["message"], err["message"]
    return err


def nothing_left(api: TestClient) -> None:
    assert not list((api.data_dir / "datasets").iterdir())


def no_server_path(api: TestClient, err: dict) -> None:
    assert str(api.data_dir) not in err["message"] and "/tmp" not in err["message"], err["message"]


def multipart(fields: dict[str, str], filename: str, payload: bytes) -> tuple[bytes, str]:
    boundary = "----embedtune-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{filename}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n".encode() + payload + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def raw_post(api: TestClient, path: str, content_type: str, body: bytes, chunk: int = 65536,
             authorization: str | None = "admin") -> tuple[int, int]:
    """POST ``body`` to the running app as a chunked transfer (no content-length), one ASGI message per chunk;
    returns (status, bytes the app pulled). Raw ASGI, because the test client hands the app the whole body."""
    pulled = 0
    messages: list[dict] = []
    pieces = iter([body[i:i + chunk] for i in range(0, len(body), chunk)])

    async def receive() -> dict:
        nonlocal pulled
        piece = next(pieces, None)
        if piece is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += len(piece)
        return {"type": "http.request", "body": piece, "more_body": True}

    async def send(message: dict) -> None:
        messages.append(message)

    headers = [(b"content-type", content_type.encode()), (b"transfer-encoding", b"chunked")]
    if authorization:
        key = api.headers["Authorization"] if authorization == "admin" else authorization
        headers.append((b"authorization", key.encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    api.portal.call(api.app, scope, receive, send)
    return messages[0]["status"], pulled


def test_chunked_upload_is_cut_at_the_limit(api):
    body, ctype = multipart({"name": "big"}, "big.txt", b"x" * 3_000_000)
    status, pulled = raw_post(api, f"{WS}/datasets", ctype, body)
    assert status == 413
    assert pulled < 300_000 + (1 << 20) + 65536  # reading stopped at the cap (+ the multipart envelope allowance)
    nothing_left(api)


def test_anonymous_upload_is_refused_before_a_byte_is_read(api):
    body, ctype = multipart({"name": "anon"}, "a.txt", b"x" * 200_000)
    for authorization in (None, "Bearer etk-key000000000000-wrong"):
        status, pulled = raw_post(api, f"{WS}/datasets", ctype, body, authorization=authorization)
        assert (status, pulled) == (401, 0)
    nothing_left(api)


def test_declared_oversized_upload_is_refused_before_reading(api):
    error(upload(api, [("big.txt", b"x" * 2_000_000)]), 413, "exceeds the limit")
    nothing_left(api)


def test_json_body_cap_declared_and_chunked(api):
    big = json.dumps({"model": "default", "dataset": "x", "recipe": {"corpus": {"language": "x" * 200_000}}})
    error(api.post(f"{WS}/customization/jobs", content=big, headers={"content-type": "application/json"}), 413)
    status, pulled = raw_post(api, f"{WS}/customization/jobs", "application/json", big.encode(), chunk=8192)
    assert status == 413 and pulled < 100_000 + 8192


def test_compression_ratio_bomb_stops_while_extracting(api):
    bomb = targz({"docs/zeros.txt": b"0" * 5_000_000})  # ~5 KB compressed: 1000x, the cap is 20x
    assert len(bomb) < 300_000
    error(upload(api, [("bomb.tar.gz", bomb)]), 413, "compressed size")
    nothing_left(api)


def test_zip_bomb_and_total_cap(api):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i in range(4):
            zf.writestr(f"docs/{i}.txt", b"0" * 2_000_000)
    error(upload(api, [("bomb.zip", buf.getvalue())]), 413, "extracted size")
    nothing_left(api)


def test_truncated_and_fake_archives_are_400_without_server_paths(api):
    good = targz({"docs/a.txt": b"some text about boats and the sea, long enough"})
    for name, data in (("t.tar.gz", good[: len(good) // 2]), ("t.tar.gz", b"\x1f\x8b" + b"\0" * 50),
                       ("t.zip", b"PK\x03\x04" + b"\0" * 40), ("t.tgz", b"plain text")):
        err = error(upload(api, [(name, data)]), 400)
        assert err["code"] == "bad_archive"
        no_server_path(api, err)
    nothing_left(api)


@pytest.mark.parametrize("filename", ["docs/", "a/b/", ".", "x" * 300 + ".txt", "d/" + "y" * 300])
def test_bad_upload_file_names_are_400(api, filename):
    err = error(upload(api, [(filename, b"text about tides and sails")]), 400)
    assert err["code"] == "bad_file_name" and len(err["message"]) < 300
    nothing_left(api)


def test_long_member_name_in_an_archive_is_400(api):
    err = error(upload(api, [("t.tar.gz", targz({"docs/" + "z" * 300 + ".txt": b"text"}))]), 400)
    assert err["code"] == "bad_file_name"
    no_server_path(api, err)


INVALID_UTF8 = b'{"_id": "d1", "text": "caf\xe9 au lait"}\n'
DEEP = ("[" * 100_000 + "]" * 100_000).encode() + b"\n"


def beir(corpus: bytes = b'{"_id": "d0", "text": "a passage"}\n', queries: bytes = b'{"_id": "q0", "text": "q"}\n',
         qrels: bytes = b"query-id\tcorpus-id\tscore\nq0\td0\t1\n") -> bytes:
    return targz({"b/corpus.jsonl": corpus, "b/queries.jsonl": queries, "b/qrels/test.tsv": qrels})


@pytest.mark.parametrize(("files", "fmt", "fragment"), [
    ([("docs.jsonl", b'{"_id": "d0", "text": "fine"}\n' + INVALID_UTF8)], "corpus", "docs.jsonl:2: not valid UTF-8"),
    ([("docs.jsonl", DEEP)], "corpus", "docs.jsonl:1: JSON nested too deeply"),
    ([("t.jsonl", INVALID_UTF8)], "training", "t.jsonl:1: not valid UTF-8"),
    ([("t.jsonl", b'{"query": "q", "pos_doc": "p"}\n' + DEEP)], "training", "t.jsonl:2: JSON nested too deeply"),
    ([("b.tar.gz", beir(queries=INVALID_UTF8))], "beir", "queries.jsonl:1: not valid UTF-8"),
    ([("b.tar.gz", beir(corpus=DEEP))], "beir", "corpus.jsonl:1: JSON nested too deeply"),
    ([("b.tar.gz", beir(qrels=b"query-id\tcorpus-id\tscore\nq\xff0\td0\t1\n"))], "beir",
     "qrels/test.tsv:2: not valid UTF-8"),
], ids=["corpus-utf8", "corpus-deep", "training-utf8", "training-deep", "beir-utf8", "beir-deep", "qrels-utf8"])
def test_bad_bytes_and_deep_json_name_file_and_line(api, files, fmt, fragment):
    err = error(upload(api, files, fmt=fmt), 422, fragment)
    no_server_path(api, err)
    nothing_left(api)


def test_deeply_nested_json_request_body_is_4xx(api):
    deep = '{"model": "default", "dataset": "x", "recipe": ' + "[" * 40_000 + "]" * 40_000 + "}"
    resp = api.post(f"{WS}/customization/jobs", content=deep, headers={"content-type": "application/json"})
    assert 400 <= resp.status_code < 500 and set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert len(resp.text) < 2000  # the body is not echoed back


def test_validation_errors_do_not_echo_megabytes(api):
    resp = api.post("/v2/workspaces", json={"name": "n" * 90_000})
    assert resp.status_code == 422 and len(resp.text) < 2000
