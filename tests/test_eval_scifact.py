"""Correctness anchor: all-MiniLM-L6-v2 on BEIR SciFact test must give the published nDCG@10 0.64508."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

PUBLISHED_NDCG10 = 0.64508


@pytest.fixture(scope="session")
def shared_data(shared_data_root):
    return shared_data_root


@pytest.fixture(scope="session")
def shared_data_root(request) -> Path:
    """conftest's ``shared_data``, or ``shared/data`` found further up (a worktree sits one level deeper
    than the repository, where conftest's relative path does not reach)."""
    from conftest import SHARED_DATA

    found = next((p / "shared" / "data" for p in Path(__file__).resolve().parents
                  if (p / "shared" / "data" / "scifact").is_dir()), None)
    root = SHARED_DATA if SHARED_DATA.is_dir() else found
    if root is None:
        pytest.skip(f"shared data not present at {SHARED_DATA}")
    return root


@pytest.mark.slow
@pytest.mark.shared
def test_minilm_scifact_ndcg10_matches_published(shared_data, tmp_path, monkeypatch):
    from embedtune.cli import app

    monkeypatch.setenv("EMBEDTUNE_CACHE_DIR", str(tmp_path / "cache"))  # really encode, once
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["eval", "--dataset", str(shared_data / "scifact"), "--split", "test",
                                   "--model", "default", "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert (results["n_queries"], results["n_docs"]) == (300, 5183)
    assert results["default"]["ndcg@10"] == pytest.approx(PUBLISHED_NDCG10, abs=0.002)
    assert results["bm25"]["ndcg@10"] == pytest.approx(0.665, abs=0.02)  # BEIR paper's Elasticsearch BM25
