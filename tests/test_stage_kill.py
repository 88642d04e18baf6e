"""kill -9 of the sdg and prep stages mid-run (real subprocesses, real SIGKILL), then a rerun.

Two ways to die: from outside while the generator works (sdg), and at a chosen atomic write, after the
temp file is complete but before it is renamed into place (the worst moment: a finished-looking file is
one rename away). The rerun must complete, reuse what was saved (sdg's response cache), produce what an
uninterrupted run produces (prep), and leave no orphan ``.tmp`` file anywhere in the run directory.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embedtune.artifacts import RunDir, read_jsonl, write_jsonl
from embedtune.config import dump_recipe, validate_recipe
from embedtune.prep import run_prep
from test_prep import make_chunks, make_queries
from test_prep import make_run as make_prep_run

ROOT = Path(__file__).resolve().parents[1]

# Runs the real CLI and SIGKILLs itself when a temp file is about to be renamed to KILL_UNDER/KILL_NAME
# (an artifact of the stage's folder): the temp file is written and fsynced, the rename has not happened.
DRIVER = """
import os, signal, sys
target = os.path.join(os.environ["KILL_UNDER"], os.environ["KILL_NAME"])
real_replace = os.replace
def replace(src, dst, *a, **kw):
    if str(src).endswith(".tmp") and os.fspath(dst) == target:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *a, **kw)
os.replace = replace
from embedtune.cli import app
app(sys.argv[1:], prog_name="embedtune")
"""


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def cli(*args: str, log: Path, kill_under: Path | None = None, kill_name: str = "") -> subprocess.Popen:
    cmd = [sys.executable, "-c", DRIVER] if kill_under else [sys.executable, "-m", "embedtune"]
    extra = {"KILL_UNDER": str(kill_under), "KILL_NAME": kill_name} if kill_under else {}
    return subprocess.Popen([*cmd, *args], env={**env(), **extra}, stdout=log.open("w"), stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"stage did not finish in {timeout}s:\n{log.read_text()[-3000:]}")


def temp_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and ".tmp" in p.name)


def cached_responses(db: Path) -> int:
    if not db.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return int(con.execute("SELECT COUNT(*) FROM responses").fetchone()[0])
    except sqlite3.OperationalError:  # the table is not created yet, or the writer holds a lock
        return 0


# ------------------------------------------------------------------------------------------------ sdg

TEXTS = [
    "Sailors trim the mainsail and turn the rudder to hold their course when the wind rises.",
    "Bread dough rises for an hour in a warm kitchen before it is shaped into loaves.",
    "A small telescope shows the four large moons of Jupiter and the rings of Saturn.",
    "Central banks raise interest rates to slow inflation and make loans more expensive.",
]


def sdg_run(root: Path, model_dir: Path) -> tuple[RunDir, Path]:
    run = RunDir(root)
    chunks = [{"_id": f"d{i}#0", "doc_id": f"d{i}", "title": "", "text": t} for i, t in enumerate(TEXTS)]
    out = run.path("corpus", "chunks.jsonl")
    write_jsonl(out, chunks)
    run.stage("corpus", {"test": True}).finish(outputs=[out])
    # One chunk per generation batch (a 16-token budget: the fast engine batches by tokens), short samples:
    # each batch is committed to the cache on its own.
    recipe = validate_recipe({"model": {"name": str(model_dir)}, "sdg": {
        "generator": "local", "local": {"batch_size": 1, "samples_per_chunk": 2, "max_new_tokens": 16, "threads": 1,
                                        "max_passage_tokens": 16},
        "filters": {"roundtrip": False}}})
    recipe_file = root.parent / "sdg-recipe.yaml"
    recipe_file.write_text(dump_recipe(recipe))
    return run, recipe_file


@pytest.mark.slow  # three CLI processes, each loading SmolLM2-135M: 7.5 min at load 20 on 2 cores
def test_sdg_killed_mid_generation_and_mid_write_reruns_to_completion(tmp_path, tiny_bert_dir):
    run, recipe_file = sdg_run(tmp_path / "run", tiny_bert_dir)
    args = ("sdg", "-c", str(recipe_file), "-r", str(run.root))
    db = run.path("sdg", "cache", "responses.sqlite")

    # 1. kill -9 from outside once the first batches are committed, before all four are.
    proc = cli(*args, log=tmp_path / "1.log")
    deadline = time.monotonic() + 240
    while cached_responses(db) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert finish(proc, tmp_path / "1.log") == -signal.SIGKILL, (tmp_path / "1.log").read_text()[-3000:]
    done_before_kill = cached_responses(db)
    assert 1 <= done_before_kill < len(TEXTS), "killed too late to test a mid-run kill"
    assert run.manifest("sdg") is None

    # 2. killed again with queries.jsonl written in full but not renamed into place yet.
    proc = cli(*args, log=tmp_path / "2.log", kill_under=run.stage_dir("sdg"), kill_name="queries.jsonl")
    assert finish(proc, tmp_path / "2.log") == -signal.SIGKILL, (tmp_path / "2.log").read_text()[-3000:]
    assert temp_files(run.stage_dir("sdg")), "the kill must leave a temp file for the rerun to clear"
    assert run.manifest("sdg") is None and not run.path("sdg", "queries.jsonl").exists()
    assert cached_responses(db) == len(TEXTS)

    # 3. the rerun completes from the cache and leaves nothing behind.
    proc = cli(*args, log=tmp_path / "3.log")
    assert finish(proc, tmp_path / "3.log") == 0, (tmp_path / "3.log").read_text()[-3000:]
    manifest = run.manifest("sdg")
    assert manifest is not None and manifest.counts["cache_hits"] == len(TEXTS)
    assert manifest.counts["generated"] == 2 * len(TEXTS)
    assert len(list(read_jsonl(run.path("sdg", "queries.jsonl")))) == manifest.counts["kept"]
    assert temp_files(run.root) == []


# ----------------------------------------------------------------------------------------------- prep


@pytest.fixture(scope="module")
def prep_reference(tmp_path_factory, tiny_bert_dir):
    """An uninterrupted prep (in-process) and the recipe it ran with."""
    chunks = make_chunks()
    recipe = validate_recipe({"model": {"name": str(tiny_bert_dir)},
                              "prep": {"test_ratio": 0.25, "teacher": "dense", "negatives_used": 2}})
    run = make_prep_run(tmp_path_factory.mktemp("reference"), chunks, make_queries(chunks))
    manifest = run_prep(recipe, run)
    return recipe, run, manifest


# train.jsonl: the first artifact; manifest.json: every artifact is in place, yet the stage must not look done.
@pytest.mark.slow  # two CLI processes per case (each loads a tiny model): 47 s a case at load 15 on 2 cores
@pytest.mark.parametrize("kill_name", ["train.jsonl", "manifest.json"])
def test_prep_killed_at_a_write_reruns_to_the_same_result(tmp_path, prep_reference, kill_name):
    recipe, reference, ref_manifest = prep_reference
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(dump_recipe(recipe))
    chunks = make_chunks()
    run = make_prep_run(tmp_path / "run", chunks, make_queries(chunks))
    args = ("prep", "-c", str(recipe_file), "-r", str(run.root))
    proc = cli(*args, log=tmp_path / "killed.log", kill_under=run.stage_dir("prep"), kill_name=kill_name)
    assert finish(proc, tmp_path / "killed.log") == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert run.manifest("prep") is None
    assert temp_files(run.stage_dir("prep")), "the kill must leave a temp file for the rerun to clear"

    proc = cli(*args, log=tmp_path / "rerun.log")
    assert finish(proc, tmp_path / "rerun.log") == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    manifest = run.manifest("prep")
    assert manifest is not None and not manifest.skipped
    assert manifest.counts == ref_manifest.counts
    for name in ("train.jsonl", "eval/queries.jsonl", "eval/corpus.jsonl"):
        assert run.path("prep", name).read_bytes() == reference.path("prep", name).read_bytes(), name
    assert temp_files(run.root) == []
