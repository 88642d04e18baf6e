"""Shared fixtures: tiny random models built in-process, small corpora, the shared data folder."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest

from ci_policy import pytest_configure, pytest_runtest_makereport, pytest_sessionfinish  # noqa: F401 (hooks: no quiet skips in CI)
from pg_fixture import db_url, module_databases, module_db_url, postgres_server, postgres_url  # noqa: F401 (PostgreSQL fixtures)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `auto` times int8 against fp32 on CPUs without int8 dot products (retrieval/speed_probe.py); the tiny test
# graphs' timings are noise, so tests get the rule without the probe, and test_speed_probe.py turns it on.
os.environ.setdefault("EMBEDTUNE_INT8_PROBE", "0")
# A key-less `embedtune serve` creates its key file; tests keep it out of the developer's ~/.config.
os.environ.setdefault("EMBEDTUNE_SERVE_KEY_FILE",
                      os.path.join(tempfile.mkdtemp(prefix="embedtune-test-keys-"), "serve.key"))



def _find_shared_data() -> Path:
    """``$EMBEDTUNE_SHARED_DATA``, else the nearest ``shared/data`` beside the repo or one of its parents."""
    if env := os.environ.get("EMBEDTUNE_SHARED_DATA"):
        return Path(env)
    repo = Path(__file__).resolve().parents[1]
    for parent in repo.parents:
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data"
    return repo.parent / "shared" / "data"


SHARED_DATA = _find_shared_data()

TOPICS = {
    "astronomy": "stars planets galaxies telescopes orbit comets nebula gravity light years",
    "cooking": "recipes ovens flour butter baking sauces knives spices simmer dough",
    "finance": "stocks bonds interest rates inflation markets dividends banks loans",
    "medicine": "patients doctors vaccines diagnosis symptoms therapy hospitals dosage",
    "sailing": "boats wind sails harbour knots tides rudder mast anchor crew",
    "computing": "processors memory compilers software kernels threads caches networks",
}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (BEIR folders); tests that need it skip where it is absent (a user's clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from embedtune.models import resolve

    return Path(resolve("default").path)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, default_model_dir) -> Path:
    """A 2-layer random BERT saved as a sentence-transformers folder (mean pooling, 32 dims)."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("tiny-bert-hf")
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(base)
    _copy_tokenizer(default_model_dir, base)
    word = models.Transformer(str(base), max_seq_length=64)
    st = SentenceTransformer(modules=[word, models.Pooling(32, pooling_mode="mean"), models.Normalize()])
    out = tmp_path_factory.mktemp("tiny-bert")
    st.save(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, default_model_dir) -> Path:
    """A 2-layer random Llama saved as a plain transformers folder (to be made bidirectional)."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      pad_token_id=0)
    LlamaModel(cfg).save_pretrained(out)
    _copy_tokenizer(default_model_dir, out)
    return out


def is_bidirectional(st) -> bool:  # noqa: ANN001 - a SentenceTransformer
    """True when the model's first module is a transformer whose config disables causal attention."""
    auto_model = getattr(st[0], "auto_model", None)
    return auto_model is not None and getattr(auto_model.config, "is_causal", True) is False


def make_documents(n_per_topic: int = 4, seed: int = 0) -> list[dict[str, str]]:
    """Small topical documents: each a few sentences drawn from one topic's vocabulary."""
    rng = random.Random(seed)
    docs = []
    for topic, words in TOPICS.items():
        vocab = words.split()
        for i in range(n_per_topic):
            sentences = [" ".join(rng.sample(vocab, 6)).capitalize() + "." for _ in range(4)]
            docs.append({"_id": f"{topic}-{i}", "title": f"{topic} {i}", "text": " ".join(sentences)})
    return docs


@pytest.fixture
def topical_docs() -> list[dict[str, str]]:
    return make_documents()
