"""Hostile input files: every bad corpus, BEIR or training file is one error naming file and line.

Invalid UTF-8, JSON nested 100k deep, lone surrogate escapes, duplicate ids and empty queries; through
the readers, the corpus loader, the BEIR loader and the `embedtune corpus` CLI (no traceback).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from embedtune.artifacts import ArtifactError, read_json, read_jsonl_lines
from embedtune.cli import app
from embedtune.corpus import iter_documents
from embedtune.corpus.loaders import LoadStats
from embedtune.evaluate import load_beir

GOOD = '{"_id": "d1", "text": "A fine document about sailing boats."}\n'
DEEP = "[" * 100_000 + "]" * 100_000
BAD_LINES = {
    "invalid UTF-8": (b'{"_id": "d2", "text": "caf\xe9 au lait"}\n', r":2: not valid UTF-8 \(byte 0xe9 at column 27\)"),
    "nested 100k deep": (f'{{"_id": "d2", "text": "x", "meta": {DEEP}}}\n'.encode(), r":2: JSON nested too deeply"),
    "lone surrogate": (b'{"_id": "d2", "text": "half \\ud800 a pair"}\n', r":2: text holds a lone UTF-16 surrogate"),
    "truncated": (b'{"_id": "d2", "text": \n', r":2: malformed JSON"),
}


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_read_jsonl_lines_names_file_and_line(tmp_path, case):
    bad, expected = BAD_LINES[case]
    path = write(tmp_path / "train.jsonl", GOOD.encode() + bad + GOOD.encode())
    with pytest.raises(ArtifactError, match=r"train\.jsonl" + expected):
        list(read_jsonl_lines(path))


def test_read_jsonl_lines_accepts_a_bom_surrogate_pairs_and_crlf(tmp_path):
    path = write(tmp_path / "ok.jsonl", b'\xef\xbb\xbf{"a": "\\ud83d\\ude00"}\r\n\r\n{"a": "\xc3\xa9"}\r\n')
    assert list(read_jsonl_lines(path)) == [(1, {"a": "😀"}), (3, {"a": "é"})]


@pytest.mark.parametrize(("data", "expected"), [
    (b'{\n  "a": "\xff"\n}', r"x\.json:2: not valid UTF-8 \(byte 0xff at column 9\)"),
    (DEEP.encode(), r"x\.json:1: JSON nested too deeply"),
    (b'{"a": "\\udc00"}', r"x\.json: text holds a lone UTF-16 surrogate"),
])
def test_read_json_names_the_file(tmp_path, data, expected):
    with pytest.raises(ArtifactError, match=expected):
        read_json(write(tmp_path / "x.json", data))


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_corpus_jsonl_record_errors_name_file_and_line(tmp_path, case):
    bad, expected = BAD_LINES[case]
    write(tmp_path / "docs" / "corpus.jsonl", GOOD.encode() + bad)
    with pytest.raises(ArtifactError, match=r"corpus\.jsonl" + expected):
        list(iter_documents(tmp_path / "docs"))


def test_corpus_json_file_nested_too_deep_is_an_error(tmp_path):
    write(tmp_path / "docs" / "records.json", DEEP.encode())
    with pytest.raises(ArtifactError, match=r"records\.json:1: JSON nested too deeply"):
        list(iter_documents(tmp_path / "docs"))


def test_undecodable_text_document_is_skipped_with_its_line(tmp_path):
    write(tmp_path / "docs" / "ok.txt", b"Plain text about boats.\n")
    write(tmp_path / "docs" / "latin1.md", b"# Title\n\nfine line\ncaf\xe9\n")
    stats = LoadStats()
    assert [d.id for d in iter_documents(tmp_path / "docs", stats)] == ["ok.txt"]
    assert len(stats.skipped_files) == 1 and "latin1.md:4: not valid UTF-8" in stats.skipped_files[0]


@pytest.mark.parametrize("case", ["invalid UTF-8", "nested 100k deep"])
def test_corpus_cli_prints_one_line_not_a_traceback(tmp_path, case):
    bad, expected = BAD_LINES[case]
    corpus = write(tmp_path / "corpus.jsonl", GOOD.encode() + bad)
    result = CliRunner().invoke(app, ["corpus", str(corpus), "-r", str(tmp_path / "run")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output
    assert lines[0].split("error: ")[1].startswith(str(corpus))


def test_corpus_cli_subprocess_has_no_traceback(tmp_path):
    corpus = write(tmp_path / "corpus.jsonl", GOOD.encode() + BAD_LINES["nested 100k deep"][0])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "COLUMNS": "300"}
    proc = subprocess.run([sys.executable, "-m", "embedtune", "corpus", str(corpus), "-r", str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    assert f"{corpus}:2: JSON nested too deeply" in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------------ BEIR


def beir(root: Path, corpus: list | bytes, queries: list | bytes, qrels: bytes = b"q1\td1\t1\n") -> Path:
    def jsonl(rows: list | bytes) -> bytes:
        return rows if isinstance(rows, bytes) else "".join(json.dumps(r) + "\n" for r in rows).encode()

    write(root / "corpus.jsonl", jsonl(corpus))
    write(root / "queries.jsonl", jsonl(queries))
    write(root / "qrels" / "test.tsv", b"query-id\tcorpus-id\tscore\n" + qrels)
    return root


DOCS = [{"_id": "d1", "text": "one"}, {"_id": "d2", "text": "two"}]
QUERIES = [{"_id": "q1", "text": "which one?"}]


def test_beir_duplicate_corpus_id_names_both_lines(tmp_path):
    root = beir(tmp_path, [*DOCS, {"_id": "d1", "text": "another one"}], QUERIES)
    with pytest.raises(ArtifactError, match=r"corpus\.jsonl:3: duplicate _id 'd1' \(first on line 1\)"):
        load_beir(root)


def test_beir_duplicate_query_id_counts_int_and_str_as_one(tmp_path):
    root = beir(tmp_path, DOCS, [{"_id": 7, "text": "a"}, {"_id": "7", "text": "b"}], b"7\td1\t1\n")
    with pytest.raises(ArtifactError, match=r"queries\.jsonl:2: duplicate _id '7'"):
        load_beir(root)


@pytest.mark.parametrize("text", ["", "   \n\t"])
def test_beir_empty_query_names_file_and_line(tmp_path, text):
    root = beir(tmp_path, DOCS, [*QUERIES, {"_id": "q2", "text": text}])
    with pytest.raises(ArtifactError, match=r"queries\.jsonl:2: query 'q2' has empty text"):
        load_beir(root)


def test_beir_text_must_be_a_string(tmp_path):
    root = beir(tmp_path, [{"_id": "d1", "text": ["not", "a", "string"]}], QUERIES)
    with pytest.raises(ArtifactError, match=r"corpus\.jsonl:1: text must be a string, got list"):
        load_beir(root)


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_beir_bad_lines_name_file_and_line(tmp_path, case):
    bad, expected = BAD_LINES[case]
    root = beir(tmp_path, json.dumps(DOCS[0]).encode() + b"\n" + bad, QUERIES)
    with pytest.raises(ArtifactError, match=r"corpus\.jsonl" + expected):
        load_beir(root)


@pytest.mark.parametrize(("qrels", "expected"), [
    (b"q1\td1\t1\nq1\td\xff2\t1\n", r"test\.tsv:3: not valid UTF-8"),
    (b"q1\td1\t" + b"9" * 200_000 + b"\n", r"test\.tsv:2: unreadable TSV"),  # over csv's field limit
    (b"q1\td1\tvery\n", r"test\.tsv:2: relevance 'very' is not an integer"),
])
def test_beir_bad_qrels_name_file_and_line(tmp_path, qrels, expected):
    with pytest.raises(ArtifactError, match=expected):
        load_beir(beir(tmp_path, DOCS, QUERIES, qrels))


def test_beir_clean_folder_still_loads(tmp_path):
    ds = load_beir(beir(tmp_path, DOCS, [*QUERIES, {"_id": 2, "text": "two?"}], b"q1\td1\t1\n2\td2\t1\n"))
    assert ds.queries == {"q1": "which one?", "2": "two?"} and ds.qrels == {"q1": {"d1": 1}, "2": {"d2": 1}}


def test_non_utf8_file_name_is_skipped_and_named(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "ok.txt").write_text("Plain text about boats.\n")
    with open(os.fsencode(docs) + b"/caf\xe9.txt", "wb") as fh:  # a Latin-1 name on a UTF-8 system
        fh.write(b"Text whose file name is not UTF-8.\n")
    stats = LoadStats()
    assert [d.id for d in iter_documents(docs, stats)] == ["ok.txt"]
    assert stats.skipped_files == [f"{docs}/caf\\xe9.txt: the file name is not valid UTF-8; rename the file"]
    from embedtune.artifacts import sha256_path

    assert len(sha256_path(docs)) == 64  # the stage's input hash reads names as bytes


@pytest.mark.parametrize("data", [b"%PDF-1.4\n" + b"<<" * 50_000 + b"\n%%EOF", b"%PDF-1.4\n1 0 obj << /Type",
                                  b"not a pdf at all"])
def test_broken_pdf_is_skipped_with_a_reason(tmp_path, data):
    write(tmp_path / "docs" / "ok.txt", b"Plain text about boats.\n")
    write(tmp_path / "docs" / "bad.pdf", data)
    stats = LoadStats()
    assert [d.id for d in iter_documents(tmp_path / "docs", stats)] == ["ok.txt"]
    assert len(stats.skipped_files) == 1 and "bad.pdf" in stats.skipped_files[0]
