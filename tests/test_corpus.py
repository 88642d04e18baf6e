"""Corpus stage: mixed folders, cleaning, de-duplication, token-bounded chunking, bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from embedtune.artifacts import ArtifactError, RunDir, read_jsonl
from embedtune.cli import app
from embedtune.config import load_recipe
from embedtune.corpus import iter_documents, run_corpus
from embedtune.corpus.chunking import chunk_text
from embedtune.corpus.clean import normalize

LONG = " ".join(f"Sentence number {i} talks about the harbour and its tides." for i in range(80))


def _pdf(path, text):
    from reportlab.pdfgen import canvas

    c = canvas.Canvas(str(path))
    c.drawString(72, 720, text)
    c.save()


@pytest.fixture
def mixed_folder(tmp_path):
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("Plain text about sailing boats and the wind in their sails.\n")
    (root / "b.md").write_text("# Baking\n\nFlour, butter and an oven make bread dough rise.\n")
    (root / "sub" / "c.html").write_text(
        "<html><head><title>Stars</title><script>var x=1;</script></head>"
        "<body><nav>menu</nav><p>Telescopes show   galaxies &amp; nebulae.</p></body></html>")
    _pdf(root / "sub" / "d.pdf", "Vaccines train the immune system against disease.")
    rows = [{"_id": "j1", "title": "Bonds", "text": "Interest rates move bond prices in the market."},
            {"_id": "j2", "text": "Interest rates move bond prices in the market."},  # exact duplicate text
            {"_id": "j3", "text": "  "}]  # empty
    (root / "e.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "long.txt").write_text(LONG)
    (root / "bad.txt").write_bytes(b"\xff\xfe\xfa not utf-8 \xc3\x28")
    (root / "image.png").write_bytes(b"\x89PNG")
    return root


def test_reads_every_format_and_skips_undecodable(mixed_folder):
    from embedtune.corpus.loaders import LoadStats

    stats = LoadStats()
    docs = {d.id: d for d in iter_documents(mixed_folder, stats)}
    assert {"a.txt", "b.md", "sub/c.html", "sub/d.pdf", "j1", "j2", "j3", "long.txt"} <= set(docs)
    assert docs["b.md"].title == "Baking"
    assert docs["sub/c.html"].title == "Stars" and "var x" not in docs["sub/c.html"].text
    assert "menu" not in docs["sub/c.html"].text
    assert "Vaccines" in docs["sub/d.pdf"].text
    assert len(stats.skipped_files) == 1 and "bad.txt" in stats.skipped_files[0]
    assert stats.unsupported_files == 1


def test_run_corpus_writes_chunks_manifest_and_counts(mixed_folder, tmp_path):
    recipe = load_recipe(None, [f"corpus.path={mixed_folder}", "corpus.chunk_tokens=64"])
    run = RunDir(tmp_path / "run")
    manifest = run_corpus(recipe, run)
    rows = list(read_jsonl(run.path("corpus", "chunks.jsonl")))
    c = manifest.counts
    assert c["dropped_duplicates"] == 1 and c["dropped_empty"] == 1 and c["skipped_files"] == 2
    assert c["skipped_by_reason"] == {"unsupported extension": 1, "unreadable": 1}
    skipped = {r["path"]: r["reason"] for r in read_jsonl(run.path("corpus", "skipped.jsonl"))}
    assert skipped == {"image.png": "unsupported extension", "bad.txt": "unreadable"}
    assert c["documents"] == 6 and c["chunks"] == len(rows)
    assert set(rows[0]) >= {"_id", "doc_id", "title", "text", "source", "start", "end"}
    long_chunks = [r for r in rows if r["doc_id"] == "long.txt"]
    assert len(long_chunks) > 1
    assert [r["_id"] for r in long_chunks] == [f"long.txt#{i}" for i in range(len(long_chunks))]
    html = next(r for r in rows if r["doc_id"] == "sub/c.html")
    assert html["text"] == "Telescopes show galaxies & nebulae."
    assert run_corpus(recipe, run).skipped


def test_chunks_respect_token_budget_and_keep_text(default_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    text = normalize(LONG + "\n\n" + "word " * 300)  # includes one sentence far over the budget
    spans = chunk_text(text, tok, max_tokens=50)
    for s, e in spans:
        assert len(tok(text[s:e], add_special_tokens=False)["input_ids"]) <= 50
    covered = "".join(text[s:e] for s, e in spans).replace(" ", "")
    assert covered == text.replace(" ", "").replace("\n", "")


def test_overlap_repeats_sentences(default_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    spans = chunk_text(LONG, tok, max_tokens=40, overlap_sentences=1)
    assert all(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))  # each chunk starts inside the last


def test_normalize_nfc_and_whitespace():
    assert normalize("Cafe\u0301\t\t au  lait\r\n\n\n\nfin\x00") == "Café au lait\n\nfin"


def test_malformed_beir_line_is_an_error_naming_file_and_line(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"_id": "1", "text": "fine text here for a doc"}\n{"_id": "2", "text": \n')
    recipe = load_recipe(None, [f"corpus.path={corpus}"])
    with pytest.raises(ArtifactError, match=r"corpus.jsonl:2"):
        run_corpus(recipe, RunDir(tmp_path / "run"))
    assert not (tmp_path / "run" / "corpus" / "chunks.jsonl").exists()


def test_cli_errors_for_missing_and_empty_corpus(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["run", "--corpus", str(tmp_path / "nope"), "--to", "corpus",
                              "-r", str(tmp_path / "r")])
    assert res.exit_code == 1 and "does not exist" in res.output
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("   ")
    res = runner.invoke(app, ["run", "--corpus", str(tmp_path / "empty"), "--to", "corpus",
                              "-r", str(tmp_path / "r")])
    assert res.exit_code == 1 and "no usable documents" in res.output


def test_cli_run_to_corpus_then_skip_and_typo(mixed_folder, tmp_path):
    runner = CliRunner()
    args = ["run", "--corpus", str(mixed_folder), "--to", "corpus", "-r", str(tmp_path / "r")]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert (tmp_path / "r" / "corpus" / "manifest.json").is_file()
    assert (tmp_path / "r" / "recipe.yaml").is_file()
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "skipped" in again.output
    typo = runner.invoke(app, [*args, "-o", "corpus.chunk_tokns=64"])
    assert typo.exit_code == 2 and "corpus.chunk_tokens" in typo.output


def test_config_show_prints_resolved_recipe():
    res = CliRunner().invoke(app, ["config", "show", "-o", "finetune.epochs=7"])
    assert res.exit_code == 0 and "epochs: 7" in res.output


def test_a_beir_folder_contributes_its_corpus_only(tmp_path):
    """Its queries (and qrels) are not documents: indexing them would put every test query in the index."""
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text(json.dumps({"_id": "d1", "title": "T", "text": "Comets orbit stars."}) + "\n")
    (beir / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "what orbits stars?"}) + "\n")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    docs = list(iter_documents(beir))
    assert [d.id for d in docs] == ["d1"]
