"""The index stage: a real Milvus Lite collection that other tools can read, hybrid search, alias swaps,
kill -9 recovery, and a Milvus server reached by URI (Milvus Lite's own gRPC server on loopback)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import make_documents
from embedtune.artifacts import RunDir
from embedtune.config import load_recipe
from embedtune.corpus import run_corpus
from embedtune.deploy import run_deploy
from embedtune.retrieval import milvus
from embedtune.retrieval.deployment import open_searcher, read_info

RARE = "zyxqvw"  # a token no chunk but one contains: only BM25 can find it
ALIAS = "run"  # the alias is the run directory's name


def _docs() -> list[dict[str, str]]:
    docs = make_documents(n_per_topic=2)  # 12 documents, 6 topics
    docs[5]["text"] += f" The {RARE} protocol was named after its inventor."
    return docs


def _write_corpus(folder: Path) -> Path:
    path = folder / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in _docs()))
    return path


def _recipe(tmp_path: Path, tiny_bert_dir: Path, *extra: str):
    return load_recipe(None, [f"corpus.path={_write_corpus(tmp_path)}", f"model.name={tiny_bert_dir}",
                              "name=idx", *extra])


@pytest.fixture
def indexed(tmp_path, tiny_bert_dir):
    recipe = _recipe(tmp_path, tiny_bert_dir)
    run = RunDir(tmp_path / "run")
    run_corpus(recipe, run)
    manifest = run_deploy(recipe, run)
    return recipe, run, manifest


def test_index_writes_a_collection_a_plain_milvus_client_can_query(indexed):
    from pymilvus import MilvusClient

    recipe, run, manifest = indexed
    info = read_info(run.root)
    chunks = [json.loads(line) for line in run.path("corpus", "chunks.jsonl").read_text().splitlines()]
    assert manifest.counts["chunks"] == info.chunks == len(chunks) >= 12
    client = MilvusClient(str(run.path("deploy", "milvus.db")))  # not our code: pymilvus as a user would
    assert client.describe_alias(info.alias)["collection_name"] == info.collection
    client.load_collection(info.alias)  # a reopened collection starts released, as on any Milvus
    rows = client.query(info.alias, filter=f'id == "{chunks[3]["_id"]}"',
                        output_fields=["doc_id", "title", "text", "dense"])
    assert rows[0]["doc_id"] == chunks[3]["doc_id"] and rows[0]["title"] == chunks[3]["title"]
    assert chunks[3]["text"] in rows[0]["text"] and len(rows[0]["dense"]) == info.dimension == 32
    assert abs(np.linalg.norm(rows[0]["dense"]) - 1) < 1e-4
    lexical = client.search(info.alias, data=[RARE], anns_field="sparse", limit=3, output_fields=["doc_id"],
                            search_params={"metric_type": "BM25"})[0]
    assert [h["entity"]["doc_id"] for h in lexical] == [_docs()[5]["_id"]]  # the only chunk with the term
    dense = client.search(info.alias, data=[rows[0]["dense"]], anns_field="dense", limit=1,
                          search_params={"metric_type": "IP"})[0]
    assert dense[0]["id"] == chunks[3]["_id"]
    # LangChain's Milvus store reads these names (primary_field="id", text_field="text", vector_field="dense").
    fields = {f["name"] for f in client.describe_collection(info.alias)["fields"]}
    assert {"id", "doc_id", "title", "source", "text", "dense", "sparse"} <= fields


def test_hybrid_ranks_a_lexical_only_match_first(tmp_path, tiny_bert_dir):
    # A weight at which a term found in one chunk only must outweigh the dense half (z ~ sqrt(chunks)).
    recipe = _recipe(tmp_path, tiny_bert_dir, "index.bm25_weight=0.7")
    run = RunDir(tmp_path / "run")
    run_corpus(recipe, run)
    run_deploy(recipe, run)
    searcher = open_searcher(run.root, recipe.model)
    query = f"which protocol is called {RARE}"
    hybrid = searcher.search([query], mode="hybrid", top_k=5)[0]
    dense = searcher.search([query], mode="dense", top_k=5)[0]
    assert hybrid[0].doc_id == _docs()[5]["_id"]
    assert RARE in hybrid[0].text
    # The random tiny model cannot know the token: the fusion, not the dense half, put the chunk first.
    assert dense[0].doc_id != _docs()[5]["_id"]


def test_rerun_with_same_inputs_is_skipped_and_a_new_model_swaps_the_alias(indexed, tmp_path, tiny_bert_dir):
    recipe, run, first = indexed
    assert run_deploy(recipe, run).skipped
    old = first.counts["collection"]
    seen_during_build: list[str | None] = []

    import embedtune.deploy.index as stage

    original = stage.milvus.create_collection

    def watch(client, name, *args, **kwargs):  # the new collection is being created: who serves now?
        seen_during_build.append(milvus.resolve_alias(client, ALIAS))
        return original(client, name, *args, **kwargs)

    stage.milvus.create_collection = watch
    try:
        second = run_deploy(load_recipe(None, [*_overrides(recipe), "index.dimensions=16"]), run)
    finally:
        stage.milvus.create_collection = original
    assert seen_during_build == [old]  # searches kept hitting the complete old collection
    client = milvus.connect(str(run.path("deploy", "milvus.db")))
    assert milvus.resolve_alias(client, ALIAS) == second.counts["collection"] != old
    assert second.counts["previous_collection"] == old and client.has_collection(old)  # kept for rollback
    assert read_info(run.root).dimension == 16


def _overrides(recipe) -> list[str]:
    return [f"corpus.path={recipe.corpus.path}", f"model.name={recipe.model.name}", "name=idx"]


def test_a_killed_build_reruns_cleanly(tmp_path, tiny_bert_dir):
    recipe = _recipe(tmp_path, tiny_bert_dir, "index.batch_size=4")
    run = RunDir(tmp_path / "run")
    run_corpus(recipe, run)
    script = textwrap.dedent(f"""
        import os, signal
        import embedtune.deploy.index as reindex
        from embedtune.artifacts import RunDir
        from embedtune.config import load_recipe
        from embedtune.deploy import run_deploy
        reindex.INSERT_BATCH = 4
        inserted = []
        original = reindex._row
        def dying_row(*args):
            inserted.append(1)
            if len(inserted) == 6:  # some rows are in the store, the build is not complete
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args)
        reindex._row = dying_row
        recipe = load_recipe(None, {_overrides(recipe) + ["index.batch_size=4"]!r})
        run_deploy(recipe, RunDir({str(run.root)!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert run.manifest("deploy") is None  # no manifest: never mistaken for a finished index
    manifest = run_deploy(recipe, run)
    client = milvus.connect(str(run.path("deploy", "milvus.db")))
    assert milvus.resolve_alias(client, ALIAS) == manifest.counts["collection"]
    assert milvus.row_count(client, manifest.counts["collection"]) == manifest.counts["chunks"]
    assert [c for c in client.list_collections() if c.startswith(f"{ALIAS}__")] == [manifest.counts["collection"]]
    assert not list(run.root.rglob("*.tmp")) and not list(run.root.rglob(".*.tmp*"))


def test_bad_uri_gives_a_clear_error(tmp_path, tiny_bert_dir):
    recipe = _recipe(tmp_path, tiny_bert_dir, "index.uri=ftp://example/x", "index.timeout=2")
    run = RunDir(tmp_path / "run")
    run_corpus(recipe, run)
    with pytest.raises(milvus.MilvusIndexError, match="neither a Milvus Lite file"):
        run_deploy(recipe, run)
    with pytest.raises(milvus.MilvusIndexError, match=r"cannot connect to Milvus at 'http://127.0.0.1:\d+'"):
        milvus.connect(f"http://127.0.0.1:{_free_port()}", timeout=2)
    cli = subprocess.run([sys.executable, "-m", "embedtune", "deploy", "-r", str(run.root), "--uri",
                          "relative/not-a-db", "-o", f"model.name={tiny_bert_dir}"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert cli.returncode == 1 and "Traceback" not in cli.stderr
    assert "neither a Milvus Lite file" in cli.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_index_on_a_milvus_server_by_uri(tmp_path, tiny_bert_dir):
    """The same code against a server: Milvus Lite's own gRPC server in another process, on loopback."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(tmp_path / "srv"),
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        uri = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                milvus.connect(uri, timeout=2)
                break
            except milvus.MilvusIndexError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)
        recipe = _recipe(tmp_path, tiny_bert_dir, f"index.uri={uri}")
        run = RunDir(tmp_path / "run")
        run_corpus(recipe, run)
        manifest = run_deploy(recipe, run)
        assert read_info(run.root).uri == uri
        assert not run.path("deploy", "milvus.db").exists()
        hits = open_searcher(run.root, recipe.model).search([f"{RARE} protocol"], top_k=3)[0]
        assert hits[0].doc_id == _docs()[5]["_id"] and manifest.counts["chunks"] >= 12
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_zscore_fuse_matches_the_exact_fusion_when_every_nonzero_hit_is_listed():
    import torch

    from embedtune.retrieval.fusion import fuse

    rng = np.random.default_rng(0)
    dense = rng.normal(0.3, 0.1, 50)
    lexical = np.where(rng.random(50) < 0.3, rng.gamma(2.0, 2.0, 50), 0.0)
    exact = fuse(torch.tensor(dense[None]), torch.tensor(lexical[None]), 0.3)[0].numpy()
    ids = [f"c{i}" for i in range(50)]
    fused = milvus.zscore_fuse(dict(zip(ids, dense, strict=True)),
                               {i: s for i, s in zip(ids, lexical, strict=True) if s > 0}, 0.3,
                               float(dense.mean()), float(dense.std()), 50)
    # Ranking depends on the ratio of the two spreads only: population/population = sample/sample.
    assert [k for k, _ in sorted(fused.items(), key=lambda kv: -kv[1])] == [ids[i] for i in np.argsort(-exact)]


def test_search_cli_in_another_process_reads_the_index(indexed):
    """`embedtune search` opens the index the stage wrote (collections start released in a new process)."""
    _, run, _ = indexed
    cli = subprocess.run([sys.executable, "-m", "embedtune", "search", "-r", str(run.root), "-k", "2",
                          "--mode", "bm25", f"{RARE} protocol"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "COLUMNS": "200"})
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert _docs()[5]["_id"] in cli.stdout and "bm25:" in cli.stdout
