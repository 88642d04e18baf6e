"""kill -9 during training, rerun: it resumes from the last checkpoint and ends at the same step count."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _train_helpers import make_run, synthetic_examples, tiny_recipe
from embedtune.artifacts import read_json, read_jsonl
from embedtune.config import dump_recipe
from embedtune.train import run_finetune

ROOT = Path(__file__).resolve().parents[1]


def _start_cli(recipe_file: Path, run_dir: Path, log_file: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "embedtune", "finetune", "-c", str(recipe_file), "-r", str(run_dir)],
        env=env,
        stdout=log_file.open("w"),
        stderr=subprocess.STDOUT,
    )


def _wait_for_checkpoint(proc: subprocess.Popen, folder: Path, timeout: float = 240) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
        if done:
            return done[0]
        if proc.poll() is not None:
            pytest.fail(f"training exited (code {proc.returncode}) before its first checkpoint")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no checkpoint appeared in time")


@pytest.mark.slow  # a subprocess, a kill and two trainings: 127 s (load 6) to 190 s (load 20)
def test_resume_after_kill_reaches_the_same_step_count(tmp_path, tiny_bert_dir):
    rows = synthetic_examples(64)
    # 64 rows, batch 16 -> 4 steps per epoch, 4 epochs -> 16 steps; a checkpoint every 2 steps.
    recipe = tiny_recipe(
        tiny_bert_dir, epochs=4, checkpoint_steps=2, validation_fraction=0.0, save_total_limit=None
    )

    reference = run_finetune(recipe, make_run(tmp_path / "uninterrupted", rows))
    assert reference.counts["steps"] == 16

    run = make_run(tmp_path / "killed", rows)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(dump_recipe(recipe))
    proc = _start_cli(recipe_file, run.root, tmp_path / "first.log")
    try:
        first = _wait_for_checkpoint(proc, run.path("finetune", "checkpoints"))
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert run.manifest("finetune") is None, "the killed run must not look finished"
    killed_at = max(
        int(p.name.split("-")[1])
        for p in run.path("finetune", "checkpoints").glob("checkpoint-*")
        if (p / "trainer_state.json").is_file()
    )
    assert 2 <= killed_at < 16, f"killed too late to test resuming ({first.name})"

    resumed = run_finetune(recipe, run)
    assert resumed.metrics["resumed_from_step"] == killed_at
    assert resumed.counts["steps"] == reference.counts["steps"] == 16
    final_state = read_json(run.path("finetune", "checkpoints", "checkpoint-16", "trainer_state.json"))
    assert final_state["global_step"] == 16
    # The log carries the steps trained before the kill (restored trainer state) and those after it.
    steps = [r["step"] for r in read_jsonl(run.path("finetune", "train_log.jsonl")) if "loss" in r]
    assert steps[0] == 1 and steps[-1] == 16


# ------------------------------------------------------------------------------ checkpoint rules


def _checkpoint(folder: Path, step: int, state: str | None = '{"global_step": 0}') -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    if state is not None:
        (path / "trainer_state.json").write_text(state)
    return path


def test_last_checkpoint_is_the_highest_complete_step(tmp_path):
    from embedtune.train.trainer import last_checkpoint

    folder = tmp_path / "checkpoints"
    assert last_checkpoint(folder) is None  # no folder yet
    _checkpoint(folder, 9)
    ten = _checkpoint(folder, 10)  # numeric order: 10 after 9, not before it
    _checkpoint(folder, 12, state='{"global_st')  # kill -9 while the state file was written
    _checkpoint(folder, 14, state=None)  # killed before the state file
    (folder / "checkpoint-tmp").mkdir()
    assert last_checkpoint(folder) == ten


def test_clean_checkpoints_keeps_same_config_and_drops_incomplete_ones(tmp_path):
    from embedtune.train.trainer import clean_checkpoints

    folder = tmp_path / "checkpoints"
    clean_checkpoints(folder, "fp-a", resume=True)
    assert (folder / "fingerprint.txt").read_text() == "fp-a\n"
    kept = _checkpoint(folder, 2)
    _checkpoint(folder, 4, state="{")
    _checkpoint(folder, 6, state=None)
    clean_checkpoints(folder, "fp-a", resume=True)
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == [kept.name]
    assert (kept / "model.safetensors").read_bytes() == b"weights"


@pytest.mark.parametrize(("fingerprint", "resume", "marker"), [
    ("fp-b", True, "fp-a"),  # config or input changed
    ("fp-a", False, "fp-a"),  # --no-resume / --force
    ("fp-a", True, None),  # checkpoints of unknown origin (no fingerprint written)
])
def test_clean_checkpoints_discards_everything_it_cannot_resume_from(tmp_path, fingerprint, resume, marker):
    from embedtune.train.trainer import clean_checkpoints

    folder = tmp_path / "checkpoints"
    _checkpoint(folder, 2)
    _checkpoint(folder, 4)
    if marker is not None:
        (folder / "fingerprint.txt").write_text(marker + "\n")
    clean_checkpoints(folder, fingerprint, resume=resume)
    assert not list(folder.glob("checkpoint-*"))
    assert (folder / "fingerprint.txt").read_text() == fingerprint + "\n"


def test_stage_resumes_only_from_complete_checkpoints_of_the_same_config(tmp_path, tiny_bert_dir):
    """Through run_finetune: an interrupted run resumes from its last complete checkpoint (a half-written
    later one is dropped); after a config change the old checkpoints are discarded and training restarts."""
    import shutil

    rows = synthetic_examples(32)
    recipe = tiny_recipe(tiny_bert_dir, max_steps=2, checkpoint_steps=1, validation_fraction=0.0,
                         save_total_limit=None)
    run = make_run(tmp_path / "run", rows)
    first = run_finetune(recipe, run)
    assert first.counts["steps"] == 2 and first.metrics["resumed_from_step"] == 0
    checkpoints = run.path("finetune", "checkpoints")

    # As after a kill: no manifest, step 2's state file lost mid-write, a half checkpoint-3 folder.
    run.path("finetune", "manifest.json").unlink()
    (checkpoints / "checkpoint-2" / "trainer_state.json").write_text('{"best_metric": nu')
    _checkpoint(checkpoints, 3, state=None)
    resumed = run_finetune(recipe, run)
    assert resumed.metrics["resumed_from_step"] == 1
    assert resumed.counts["steps"] == 2
    assert not (checkpoints / "checkpoint-3").exists()
    assert read_json(checkpoints / "checkpoint-2" / "trainer_state.json")["global_step"] == 2  # rewritten

    # Another learning rate is another training: nothing of the old one may be resumed.
    run.path("finetune", "manifest.json").unlink()
    shutil.rmtree(checkpoints / "checkpoint-2")
    changed = tiny_recipe(tiny_bert_dir, max_steps=2, checkpoint_steps=1, validation_fraction=0.0,
                          save_total_limit=None, learning_rate=2e-3)
    restarted = run_finetune(changed, run)
    assert restarted.metrics["resumed_from_step"] == 0 and restarted.counts["steps"] == 2  # not from step 1


def test_a_run_stopped_after_its_last_step_finishes_from_the_checkpoint_without_training_more(tmp_path, tiny_bert_dir):
    """The stage killed after its last checkpoint but before its manifest: the rerun resumes from that
    checkpoint and ends at the same step with the same weights (transformers alone would train one more step)."""
    from sentence_transformers import SentenceTransformer

    recipe = tiny_recipe(tiny_bert_dir, max_steps=2, checkpoint_steps=2, validation_fraction=0.0,
                         save_total_limit=None)
    run = make_run(tmp_path / "run", synthetic_examples(64))
    first = run_finetune(recipe, run)
    texts = ["a query about ships", "a passage about bread and butter"]
    before = SentenceTransformer(str(run.root / "finetune" / "model"), device="cpu").encode(texts)
    (run.root / "finetune" / "manifest.json").unlink()  # what a kill between the last step and the manifest leaves

    again = run_finetune(recipe, run)
    assert first.counts["steps"] == again.counts["steps"] == 2
    assert again.metrics["resumed_from_step"] == 2
    after = SentenceTransformer(str(run.root / "finetune" / "model"), device="cpu").encode(texts)
    assert abs(before - after).max() < 1e-6


# ------------------------------------------------------------------------------ resume continues the run


class Killed(Exception):
    """Stands in for a kill -9 in the middle of training (after a checkpoint, before the next one)."""


def _count_steps(monkeypatch, kill_at: int | None = None) -> list[int]:  # noqa: ANN001
    """Count optimizer steps the trainer computes (its ``training_step`` calls); with ``kill_at``, raise
    :class:`Killed` as step ``kill_at`` starts, the checkpoints written before it left in place."""
    from sentence_transformers import SentenceTransformerTrainer

    real = SentenceTransformerTrainer.training_step
    calls: list[int] = []

    def training_step(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(self.state.global_step + 1)
        if kill_at is not None and len(calls) == kill_at:
            raise Killed
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SentenceTransformerTrainer, "training_step", training_step)
    return calls


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {str(p.relative_to(folder)): load_file(p) for p in sorted(folder.rglob("*.safetensors"))}


def test_a_run_killed_after_a_checkpoint_continues_from_it_to_the_uninterrupted_weights(
        tmp_path, tiny_bert_dir, monkeypatch):
    """Killed at step 5 of 6 (checkpoint-4 written, in the second epoch), the rerun trains steps 5 and 6 only and
    ends with the weights of a run that was never interrupted, bit for bit: it continued from the checkpoint's
    weights, optimizer moments, scheduler, data position and RNG state. A rerun that starts over would train six
    steps (and a resume that dropped the optimizer state or the RNG would end elsewhere)."""
    rows = synthetic_examples(48)
    # 48 rows, batch 16 -> 3 steps per epoch, 2 epochs -> 6 steps; a checkpoint every 2 steps; fp32 (bf16
    # autocast is deterministic too, but fp32 keeps the comparison independent of the CPU).
    recipe = tiny_recipe(tiny_bert_dir, epochs=2, checkpoint_steps=2, validation_fraction=0.0,
                         save_total_limit=None, global_batch_size=16, cpu_bf16=False)
    with monkeypatch.context() as m:
        steps = _count_steps(m)
        reference = run_finetune(recipe, make_run(tmp_path / "uninterrupted", rows))
    assert reference.counts["steps"] == 6 and steps == [1, 2, 3, 4, 5, 6]

    run = make_run(tmp_path / "killed", rows)
    with monkeypatch.context() as m, pytest.raises(Killed):
        _count_steps(m, kill_at=5)
        run_finetune(recipe, run)
    assert run.manifest("finetune") is None
    assert sorted(p.name for p in run.path("finetune", "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-2", "checkpoint-4"]

    with monkeypatch.context() as m:
        steps = _count_steps(m)
        resumed = run_finetune(recipe, run)
    assert steps == [5, 6]  # continued: the four steps before the kill were not trained again
    assert resumed.metrics["resumed_from_step"] == 4 and resumed.counts["steps"] == 6
    expected, got = _weights(tmp_path / "uninterrupted" / "finetune" / "model"), _weights(run.path("finetune", "model"))
    assert expected and list(got) == list(expected)
    for name, tensors in expected.items():
        assert list(got[name]) == list(tensors)
        for key, value in tensors.items():
            assert torch.equal(got[name][key], value), f"{name}:{key} differs from the uninterrupted run"
    # and the run did move: the final weights are not the untrained model's
    assert any(not torch.equal(v, _weights(tiny_bert_dir)[n][k]) for n, t in expected.items() for k, v in t.items())
