"""sdg resume from the local generator's response cache: after a crash, the rerun takes the chunks already
generated from the cache (no generation for them) and writes what an uninterrupted run writes.
(The llm generator's cache resume is in test_sdg_llm.py.)"""

from __future__ import annotations

import json
import shutil

import pytest

from embedtune.artifacts import RunDir, write_jsonl
from embedtune.config import load_recipe
from embedtune.schemas import Chunk
from embedtune.sdg import run_sdg
from embedtune.sdg.local import LocalGenerator


@pytest.fixture(scope="module")
def tiny_causal_lm(tmp_path_factory, default_model_dir):
    """A 2-layer random Llama causal LM with the default model's WordPiece tokenizer ([SEP] ends a query)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-causal-lm")
    cfg = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      pad_token_id=0, eos_token_id=102)
    LlamaForCausalLM(cfg).save_pretrained(out)
    for name in ("tokenizer.json", "vocab.txt", "special_tokens_map.json"):
        if (default_model_dir / name).exists():
            shutil.copy(default_model_dir / name, out / name)
    tok_config = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**tok_config, "eos_token": "[SEP]"}))
    return out


def _run(root, chunks) -> RunDir:
    run = RunDir(root)
    path = run.path("corpus", "chunks.jsonl")
    write_jsonl(path, chunks)
    run.stage("corpus", {"test": True}).finish(outputs=[path])
    return run


@pytest.mark.slow  # three sdg runs with the round-trip filter: 27 s on a lightly loaded 2-core box
def test_local_generator_resumes_from_its_cache_after_a_crash(tmp_path, topical_docs, tiny_causal_lm,
                                                             tiny_bert_dir, monkeypatch):
    chunks = [Chunk(_id=f"{d['_id']}#0", doc_id=d["_id"], title=d["title"], text=d["text"])
              for d in topical_docs[::4]]  # one document per topic: 6 chunks, 3 batches of 2
    # A small token budget: the fast engine batches by tokens, so this gives several batches of one chunk.
    recipe = load_recipe(None, ["sdg.generator=local", f"sdg.local.model_path={tiny_causal_lm}",
                                "sdg.local.batch_size=2", "sdg.local.samples_per_chunk=2",
                                "sdg.local.max_passage_tokens=16",
                                "sdg.local.max_new_tokens=8", f"model.name={tiny_bert_dir}"])
    generated: list[list[str]] = []
    real_plan = LocalGenerator._plan
    crash_after: list[int] = [2]

    def plan(self, todo):  # wraps whichever engine's sampler: the kill lands between two committed batches
        batches, sample = real_plan(self, todo)

        def watched(batch):
            if len(generated) == crash_after[0]:
                raise RuntimeError("killed")  # as a kill after two batches: their answers are committed
            generated.append([c.id for c in batch])
            return sample(batch)

        return batches, watched

    monkeypatch.setattr(LocalGenerator, "_plan", plan)
    run = _run(tmp_path / "run", chunks)
    with pytest.raises(RuntimeError, match="killed"):
        run_sdg(recipe, run)
    assert run.manifest("sdg") is None
    done = [cid for batch in generated for cid in batch]
    assert 0 < len(done) < len(chunks)  # the fast engine orders batches by length: which ones, not a prefix

    generated.clear()
    crash_after[0] = -1
    resumed = run_sdg(recipe, run)
    # Only the chunks the crashed run had not finished were generated; the others came from the cache.
    again = [cid for batch in generated for cid in batch]
    assert sorted(again) == sorted({c.id for c in chunks} - set(done)) and not set(again) & set(done)
    assert resumed.counts["cache_hits"] == len(done)
    assert resumed.counts["generator"]["samples"] == 2 * len(chunks)

    # Seeded per chunk: the resumed run wrote exactly what an uninterrupted run writes.
    generated.clear()
    fresh = _run(tmp_path / "fresh", chunks)
    reference = run_sdg(recipe, fresh)
    assert sum(map(len, generated)) == len(chunks) and reference.counts["cache_hits"] == 0
    for name in ("queries.jsonl", "rejected.jsonl"):
        assert run.path("sdg", name).read_bytes() == fresh.path("sdg", name).read_bytes(), name
    assert fresh.path("sdg", "rejected.jsonl").stat().st_size > 0  # there were candidates to compare
