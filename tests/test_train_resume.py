"""kill -9 during training, rerun: it resumes from the last checkpoint and ends at the same step count."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
