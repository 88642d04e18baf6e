"""`torchrun --nproc_per_node 2 -m embedtune finetune` on CPU (gloo): DDP, gathered negatives."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from _train_helpers import make_run, synthetic_examples, tiny_recipe
from embedtune.config import dump_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two processes, each importing torch + transformers: 17 s (load 6) to 52 s (load 17)
def test_two_process_ddp_training(tmp_path, tiny_bert_dir):
    run = make_run(tmp_path / "run", synthetic_examples(48))
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(
        dump_recipe(tiny_recipe(tiny_bert_dir, epochs=1, checkpoint_steps=2, validation_fraction=0.1))
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            "-m",
            "embedtune",
            "finetune",
            "-c",
            str(recipe_file),
            "-r",
            str(run.root),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = run.manifest("finetune")
    assert manifest is not None
    assert manifest.counts["world_size"] == 2 and manifest.counts["gather_across_devices"] is True
    assert manifest.counts["per_device_batch_size"] * 2 == manifest.counts["global_batch_size"] == 16
    assert manifest.counts["steps"] >= 2
    assert run.path("finetune", "model", "modules.json").is_file()
    # Rank 0 alone wrote the outputs: one model folder, no leftovers of a second writer.
    assert not list(run.path("finetune").glob(".model.tmp-*"))
    assert "finetune done" in proc.stderr + proc.stdout
