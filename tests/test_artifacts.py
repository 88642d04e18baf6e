"""Run directory: atomic writes, manifests, skip when unchanged, rerun when inputs or config change."""

from __future__ import annotations

import hashlib
import json

import pytest

from embedtune.artifacts import ArtifactError, RunDir, atomic_open, read_jsonl, write_jsonl


def test_atomic_write_leaves_old_file_intact_on_failure(tmp_path):
    target = tmp_path / "data.jsonl"
    write_jsonl(target, [{"a": 1}])
    with pytest.raises(RuntimeError), atomic_open(target) as fh:
        fh.write('{"a": 2}\n{"half')
        raise RuntimeError("killed midway")
    assert list(read_jsonl(target)) == [{"a": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]  # no temp file left behind


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n{"a": \n')
    with pytest.raises(ArtifactError, match=r"x.jsonl:3: malformed JSON"):
        list(read_jsonl(path))
    path.write_text('[1, 2]\n')
    with pytest.raises(ArtifactError, match=r"x.jsonl:1: expected a JSON object"):
        list(read_jsonl(path))


def _run_stage(run, src, config, force=False):
    st = run.stage("demo", config, inputs=[src])
    if (done := st.up_to_date(force)) is not None:
        return done
    out = st.dir / "out.jsonl"
    write_jsonl(out, [{"n": len(src.read_text())}])
    return st.finish(outputs=[out], counts={"rows": 1})


def test_stage_skips_when_unchanged_and_reruns_otherwise(tmp_path):
    run = RunDir(tmp_path / "run")
    src = tmp_path / "in.txt"
    src.write_text("hello")
    first = _run_stage(run, src, {"k": 1})
    assert not first.skipped and first.counts == {"rows": 1}
    assert _run_stage(run, src, {"k": 1}).skipped
    assert not _run_stage(run, src, {"k": 2}).skipped  # config changed
    assert not _run_stage(run, src, {"k": 2}, force=True).skipped
    src.write_text("hello again")
    assert not _run_stage(run, src, {"k": 2}).skipped  # input changed
    (run.path("demo", "out.jsonl")).write_text("tampered\n")
    assert not _run_stage(run, src, {"k": 2}).skipped  # output no longer what the manifest recorded


def test_interrupted_rerun_leaves_no_manifest(tmp_path):
    run = RunDir(tmp_path / "run")
    src = tmp_path / "in.txt"
    src.write_text("x")
    _run_stage(run, src, {"k": 1})
    st = run.stage("demo", {"k": 99}, inputs=[src])
    assert st.up_to_date() is None  # must rerun: the old manifest is gone before any new file is written
    assert run.manifest("demo") is None
    with pytest.raises(ArtifactError, match="has not completed"):
        run.require("demo", "out.jsonl")


def test_manifest_records_hashes_counts_and_time(tmp_path):
    run = RunDir(tmp_path / "run")
    src = tmp_path / "in.txt"
    src.write_text("abc")
    _run_stage(run, src, {"k": 1})
    data = json.loads(run.path("demo", "manifest.json").read_text())
    assert set(data) >= {"stage", "version", "config", "inputs", "outputs", "counts", "seconds"}
    # The hashes are the files' SHA-256 (computed here with hashlib, not the code under test).
    out = run.path("demo", "out.jsonl")
    # outside the run folder by absolute path; inside it relative to it (the folder can move)
    assert data["inputs"] == {str(src.resolve()): hashlib.sha256(b"abc").hexdigest()}
    assert data["outputs"] == {"demo/out.jsonl": hashlib.sha256(out.read_bytes()).hexdigest()}
    assert out.read_bytes() == b'{"n": 3}\n'
    assert data["stage"] == "demo" and data["config"] == {"k": 1} and data["counts"] == {"rows": 1}
    assert 0 <= data["seconds"] < 60


def test_a_moved_or_copied_run_folder_stays_up_to_date(tmp_path, monkeypatch):
    """Manifests name the run's own files relative to it: a copied folder (an ablation reusing sdg), a
    moved one, or one named by another relative path skips its finished stages; a changed output reruns."""
    import shutil

    src = tmp_path / "in.txt"
    src.write_text("abc")
    _run_stage(RunDir(tmp_path / "run"), src, {"k": 1})
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    shutil.rmtree(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    copy = RunDir("copy")  # a relative name, from another folder than the one the stage ran in
    assert copy.stage("demo", {"k": 1}, inputs=[src]).up_to_date() is not None
    copy.path("demo", "out.jsonl").write_text("changed\n")
    assert copy.stage("demo", {"k": 1}, inputs=[src]).up_to_date() is None


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_rerun_removes_temp_files_of_killed_writers_only(tmp_path):
    import os

    run = RunDir(tmp_path / "run")
    src = tmp_path / "in.txt"
    src.write_text("x")
    _run_stage(run, src, {"k": 1})
    dead, alive = _dead_pid(), os.getpid()
    orphans = [run.path("demo", f".out.jsonl.{dead}.abc123de.tmp"),
               run.root / "cache" / "embeddings" / f".k.npy.{dead}.zz_9yy8x.tmp"]
    in_flight = run.path("demo", f".other.jsonl.{alive}.q1w2e3r4.tmp")  # a live writer's file stays
    foreign = run.path("demo", "notes.tmp")  # not ours: left alone
    for p in [*orphans, in_flight, foreign]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("partial")
    assert _run_stage(run, src, {"k": 1}).skipped  # an up-to-date stage touches nothing
    assert all(p.exists() for p in orphans)
    assert not _run_stage(run, src, {"k": 2}).skipped
    assert not any(p.exists() for p in orphans)
    assert in_flight.exists() and foreign.exists()


def test_atomic_open_temp_name_carries_the_writer_pid(tmp_path):
    import os

    with atomic_open(tmp_path / "f.txt") as fh:
        names = [p.name for p in tmp_path.iterdir()]
        fh.write("x")
    assert len(names) == 1 and names[0].startswith(f".f.txt.{os.getpid()}.") and names[0].endswith(".tmp")
