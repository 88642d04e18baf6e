"""Logs written to a file are plain: no library progress bars, no trainer dicts; Ctrl-C says how to resume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from _train_helpers import make_run, synthetic_examples, tiny_recipe
from embedtune.config import dump_recipe

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_DISABLE", "HF_DATASETS_DISABLE"))}
    return {**env, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "EMBEDTUNE_CACHE_DIR": str(tmp_path / "cache"), "COLUMNS": "200"}


def test_finetune_log_file_has_plain_progress_lines_only(tmp_path, tiny_bert_dir):
    """The tiny model is loaded (transformers' 'Loading weights' bar) and trained (the trainer's bar and log
    dicts): with stdout and stderr going to a file, none of them may show, only our plain lines."""
    run = make_run(tmp_path / "run", synthetic_examples(48))
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(dump_recipe(tiny_recipe(tiny_bert_dir, epochs=2, validation_fraction=0.25,
                                                   checkpoint_steps=4, global_batch_size=8, auto_scale_batch=False)))
    log_file = tmp_path / "finetune.log"
    with log_file.open("wb") as out:
        proc = subprocess.run([sys.executable, "-m", "embedtune", "finetune", "-c", str(recipe_file), "-r",
                               str(run.root)], stdout=out, stderr=subprocess.STDOUT, env=_env(tmp_path), timeout=600)
    text = log_file.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text, [line for line in text.split("\n") if "\r" in line][:3]
    assert not [line for line in text.splitlines() if "{'" in line or '{"' in line], text[-3000:]
    progress = [line for line in text.splitlines() if " steps (" in line and "training" in line]
    assert progress and progress[-1].split(" INFO ")[-1].startswith("training (loss "), text[-3000:]
    assert "/" in progress[-1] and "steps/s" in progress[-1]


def test_encoding_reports_progress_in_a_few_batches_not_blocks_of_1024(monkeypatch):
    import numpy as np

    import embedtune.models as models
    from embedtune.retrieval.encoders import LocalEncoder

    sizes: list[int] = []

    def fake_encode(model, texts, batch_size):
        sizes.append(len(texts))
        return np.ones((len(texts), 4), dtype=np.float32)

    monkeypatch.setattr(models, "encode_passages", fake_encode)
    encoder = LocalEncoder(model=object(), batch_size=64)  # type: ignore[arg-type]
    assert encoder.encode([f"text {i}" for i in range(3001)], "passage").shape == (3001, 4)
    assert sum(sizes) == 3001 and max(sizes) <= 4 * 64  # the bar moves every few batches



def test_plain_tqdm_bars_are_off_in_a_log_file_even_when_tqdm_was_imported_first(tmp_path):
    """Bars drawn with plain tqdm (transformers' GGUF de-quantisation, sentence-transformers' model card) are
    not reached by the Hugging Face switches; tqdm reads TQDM_DISABLE only at import."""
    script = ("from tqdm.auto import tqdm as early\n"
              "from embedtune.console import setup_logging\n"
              "setup_logging()\n"
              "from tqdm.autonotebook import tqdm as late\n"
              "for bar in (early, late):\n"
              "    for _ in bar(range(3), desc='Converting tensors'):\n"
              "        pass\n"
              "for _ in early(range(3), desc='asked for', disable=False):\n"
              "    pass\n")
    env = {k: v for k, v in _env(tmp_path).items() if k != "TQDM_DISABLE"}
    log_file = tmp_path / "out.log"
    with log_file.open("wb") as out:
        proc = subprocess.run([sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT, env=env,
                              timeout=120)
    text = log_file.read_text()
    assert proc.returncode == 0, text
    assert "Converting tensors" not in text, text
    assert "asked for" in text  # a caller's explicit disable=False still draws its bar
