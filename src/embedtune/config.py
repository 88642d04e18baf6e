"""The recipe: one pydantic model per stage, loaded from YAML, overridable with ``-o section.key=value``.

Defaults follow NVIDIA's published recipe for llama-nemotron-embed-1b-v2 unless a comment says why not.
Every model forbids unknown keys, so a typo is an error (with the closest valid name), never a silent no-op.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from embedtune.artifacts import check_path_name


class RecipeError(ValueError):
    """A recipe that cannot be used: unknown keys, bad values, unreadable YAML. ``key``: the first bad key."""

    key: str | None = None


class StrictModel(BaseModel):
    # inf/NaN pass a `gt=0` check (inf) or poison every later computation (NaN): refused with the key named.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# ------------------------------------------------------------------------ what a platform tenant may set
# Every recipe field declares here, in its annotation, whether a tenant of the platform (the ``recipe`` of a
# job request) may set it, and as what; :mod:`embedtune.platform.sandbox` enforces it. A field that declares
# nothing is refused to tenants: a new field is closed until someone decides otherwise. Kinds:
#   value    a number, flag, choice or text the stage only computes with: checked by its type and range
#   allowed  accepted only if the operator listed it (``setting`` names the PlatformSettings list); with
#            ``used_when``, the job's final value is checked too whenever that condition holds
#   dataset  a dataset of the job's workspace, by name; the platform puts its folder in the recipe
#   platform set by the platform from the request's references (``via`` names the request field)
#   closed   refused (a server path, an outbound store, an environment variable, an operator decision)
# The CLI ignores these: whoever runs ``embedtune`` already has the machine.
TENANT = "tenant"
T = TypeVar("T")


def tenant(kind: str, **extra: Any) -> FieldInfo:
    return Field(json_schema_extra={TENANT: kind, **extra})


def allowed(setting: str, used_when: dict[str, str] | None = None) -> FieldInfo:
    return tenant("allowed", setting=setting, used_when=used_when or {})


def workspace_dataset(*formats: str) -> FieldInfo:
    return tenant("dataset", formats=list(formats))


def managed(via: str) -> FieldInfo:
    return tenant("platform", via=via)


Tunable = Annotated[T, tenant("value")]
Closed = Annotated[T, tenant("closed")]
# A name the code joins into a path (``qrels/<split>.tsv``): one path component, no separators, not . or ..
PathName = Annotated[str, AfterValidator(check_path_name)]
FOR_LLM = {"sdg.generator": "llm"}
Dimension = Annotated[int, Field(gt=0, le=1_048_576)]


# Upper bounds below are not tuning advice: they reject values that are typos or attacks (a seed numpy and
# torch overflow on, a timeout of centuries, a batch no machine holds), before any stage runs.
SEED_MAX = 2**32 - 1  # numpy's and transformers.set_seed's range

# Hybrid search: how dense and BM25 scores are fused. One home for eval, the deployed index
# (retrieval.milvus.SearchSettings, stored in deploy/index.json) and serve.
Fusion = Literal["zscore", "rrf", "weighted"]
# 0.2 is where the fusion peaked on the synthetic held-out queries of the SciFact run, for the base and the
# fine-tuned model alike (no real query involved; bench/domain_adaptation.py).
DEFAULT_BM25_WEIGHT = 0.2
# The ONNX files the server runs: auto = int8 on a CPU when exported, fp32 on a GPU.
ServePrecision = Literal["auto", "int8", "fp32"]
DEFAULT_CANDIDATES = 100  # dense hits fetched per query for fusion
DEFAULT_LEXICAL_CANDIDATES = 1000  # BM25 hits per query: the z-score spread estimate wants most nonzero ones


class ModelConfig(StrictModel):
    """Which embedding model to start from (see :mod:`embedtune.models`)."""

    name: Annotated[str, managed("model")] = Field(
        "default", description="'default', 'multilingual-default', a local folder, a decoder LLM's GGUF file, a hub id"
    )
    query_prompt: Tunable[str | None] = Field(None, description="overrides the spec's query prompt")
    passage_prompt: Tunable[str | None] = Field(None, description="overrides the spec's passage prompt")
    max_seq_length: Tunable[int | None] = Field(None, gt=0, le=1_048_576)
    pooling: Tunable[Literal["mean", "cls", "lasttoken"] | None] = None


class CorpusConfig(StrictModel):
    path: Annotated[str | None, managed("dataset")] = Field(
        None, description="folder, file or BEIR corpus.jsonl with the documents")
    chunk_tokens: Tunable[int | None] = Field(
        None, gt=16, le=1_048_576, description="chunk size in the model's tokens; None fits the model's max length"
    )
    overlap_sentences: Tunable[int] = Field(
        0, ge=0, le=1000, description="sentences repeated at the start of the next chunk")
    min_chars: Tunable[int] = Field(20, ge=0, le=10**9, description="documents shorter than this are dropped")
    min_chunk_chars: Tunable[int] = Field(
        50, ge=0, le=100_000, description="a chunk shorter than this (a heading or a line left at a document's "
        "end) is merged into its neighbour in the same document when the two fit chunk_tokens; 0 keeps every chunk")
    language: Tunable[str] = Field("en", description="sentence splitter language (ISO 639-1), e.g. en, de, zh, ar, hi")
    max_documents: Tunable[int | None] = Field(None, gt=0, le=10**9)


class LLMGeneratorConfig(StrictModel):
    base_url: Annotated[str, allowed("allowed_llm_base_urls", FOR_LLM)] = "http://localhost:8000/v1"
    model: Tunable[str] = "meta/llama-3.3-70b-instruct"
    api_key_env: Annotated[str, allowed("allowed_secret_env", FOR_LLM)] = Field(
        "OPENAI_API_KEY", description="name of the environment variable holding the key")
    temperature: Tunable[float] = Field(0.6, ge=0, le=2)
    top_p: Tunable[float] = Field(0.95, gt=0, le=1)
    max_tokens: Tunable[int] = Field(2048, gt=0, le=1_048_576)
    timeout: Tunable[float] = Field(120.0, gt=0, le=86_400)
    concurrency: Tunable[int] = Field(8, ge=1, le=1024)
    max_retries: Tunable[int] = Field(5, ge=0, le=100)
    structured_output: Tunable[bool] = Field(True, description="ask for response_format=json_object")
    parse_retries: Tunable[int] = Field(2, ge=0, le=100, description="new attempts when an answer holds no valid JSON")
    judge_model: Tunable[str | None] = Field(None, description="defaults to `model`")


class LocalGeneratorConfig(StrictModel):
    model_path: Closed[str | None] = Field(None, description="GGUF file or HF folder; None = shipped SmolLM2-135M")
    batch_size: Tunable[int] = Field(8, ge=1, le=65_536, description="chunks per forward pass")
    samples_per_chunk: Tunable[int] = Field(4, ge=1, le=1024, description="sampled queries per chunk, before filtering")
    max_passage_tokens: Tunable[int] = Field(
        256, gt=0, le=1_048_576, description="the passage is cut to this many tokens")
    max_new_tokens: Tunable[int] = Field(40, gt=0, le=65_536)
    threads: Tunable[int | None] = Field(
        None, ge=1, le=1024, description="torch CPU threads while generating; 1 is far faster on an oversubscribed CPU"
    )
    int8: Tunable[bool] = Field(
        True, description="int8 dynamic quantisation of the LM's well-scaled projections (the fast engine); "
        "on a plain-AVX2 CPU the demo's sdg took 354 s with it and 548 s without")
    temperature: Tunable[float] = Field(
        0.7, ge=0, le=100, description="0 = greedy (one sample per chunk makes sense then)")
    top_p: Tunable[float] = Field(0.95, gt=0, le=1)
    max_prefix_tokens: Tunable[int] = Field(
        512, ge=64, le=8192, description="token budget of the few-shot examples before each passage: as many "
        "of sdg.examples as fit (in the file's order), at least one")
    example_max_words: Tunable[int] = Field(
        40, ge=8, le=2048, description="an example's passage is cut to this many words, keeping the sentences "
        "that share most words with its query")


class QueryFilterConfig(StrictModel):
    min_words: Tunable[int] = Field(3, ge=1, le=100_000)
    max_words: Tunable[int] = Field(64, ge=1, le=100_000)
    max_ngram_overlap: Tunable[float] = Field(0.8, ge=0, le=1, description="share of query n-grams copied verbatim")
    roundtrip: Tunable[bool | None] = Field(None, description="None: on for `local`, off for `llm`")
    roundtrip_top_k: Tunable[int] = Field(
        20, ge=1, le=100_000, description="a positive must rank within this many chunks")
    roundtrip_min_rank: Tunable[int] = Field(
        1, ge=1, le=100_000,
        description="drop queries whose best positive ranks above this (2 drops rank-1 'easy' ones)")
    roundtrip_by: Tunable[Literal["dense", "hybrid"]] = Field(
        "dense", description="who ranks the positive in the round trip. dense: the base model (Promptagator). "
        "hybrid: the base model fused with BM25 (prep.teacher's fusion at prep.bm25_weight), so a query the base "
        "model misses but whose passage BM25 confirms is kept: the queries a fine-tune learns from. Falls back "
        "to dense for languages written without spaces")
    backend: Tunable[Literal["torch", "onnx-int8"]] = Field(
        "torch", description="how the base model encodes for sdg's dedup and round-trip filters and prep's mining "
        "(which reuses sdg's chunk embeddings). onnx-int8: its ONNX int8 export, built once into the embedtune "
        "cache (torch when the model cannot be exported): 2-4x faster, 99% the same filter decisions; mined "
        "negatives and teacher scores then come from int8 embeddings"
    )

    @model_validator(mode="after")
    def _rank_window(self) -> QueryFilterConfig:
        if self.roundtrip_min_rank > self.roundtrip_top_k:
            raise ValueError("sdg.filters.roundtrip_min_rank must be <= sdg.filters.roundtrip_top_k")
        return self


class SdgConfig(StrictModel):
    generator: Annotated[str, allowed("allowed_sdg_generators")] = Field(
        "local", description="registered generator name: local, llm or a plug-in")
    # A file on the server: closed to tenants until the platform resolves it as a workspace dataset.
    examples: Closed[str | None] = Field(
        None, description="JSONL of a few real queries of your users, each with its passage (or the doc_id of "
        "a corpus document): every synthetic query is written in their style (Promptagator's few-shot setting; "
        "5-8 are enough). These queries are left out of eval.dataset's scores. None: a generic prompt")
    queries_per_chunk: Tunable[int] = Field(2, ge=1, le=1024)
    max_chunks: Tunable[int | None] = Field(None, gt=0, le=10**9, description="sample at most this many chunks")
    seed: Tunable[int] = Field(42, ge=0, le=SEED_MAX)
    query_mix: Tunable[dict[str, Annotated[float, Field(ge=0, le=1e6)]]] = Field(
        default_factory=lambda: {"multi_hop": 0.2, "structural": 0.3, "contextual": 0.5}
    )
    reasoning_types: Tunable[list[str]] = Field(
        default_factory=lambda: ["factual", "relational", "inferential", "temporal", "procedural", "causal"]
    )
    min_complexity: Tunable[int] = Field(2, ge=1, le=5)
    max_complexity: Tunable[int] = Field(5, ge=1, le=5)
    min_hops: Tunable[int] = Field(1, ge=1, le=3)
    max_hops: Tunable[int] = Field(3, ge=1, le=3)
    dedup_threshold: Tunable[float] = Field(0.9, gt=0, le=1)
    judge_threshold: Tunable[float] = Field(7.0, ge=0, le=10)
    llm: LLMGeneratorConfig = Field(default_factory=LLMGeneratorConfig)
    local: LocalGeneratorConfig = Field(default_factory=LocalGeneratorConfig)
    filters: QueryFilterConfig = Field(default_factory=QueryFilterConfig)
    plugins: Closed[dict[str, dict[str, Any]]] = Field(
        default_factory=dict, description="settings of plug-in generators, by name; each plug-in validates its "
        "own section (its Settings model)")


class PrepConfig(StrictModel):
    test_ratio: Tunable[float] = Field(0.2, ge=0, lt=1, description="share of query-bearing documents held out")
    seed: Tunable[int] = Field(42, ge=0, le=SEED_MAX)
    max_pos_docs: Tunable[int] = Field(5, ge=1, le=10_000, description="queries with more positives are dropped")
    hard_negatives_to_mine: Tunable[int] = Field(5, ge=0, le=10_000)
    negatives_used: Tunable[int] = Field(4, ge=0, le=10_000, description="minimum negatives per query (fill_missing)")
    margin: Tunable[float] = Field(0.95, ge=0, le=1000)
    margin_type: Tunable[Literal["perc", "abs"]] = Field(
        "perc", description="perc: negatives < margin x weakest positive; abs: < weakest positive - margin"
    )
    fill_missing: Tunable[Literal["random", "drop"]] = Field(
        "random", description="queries short of negatives_used: add random allowed chunks, or drop the query"
    )
    test_chunks_as_negatives: Tunable[bool] = Field(False, description="allow held-out documents' chunks as negatives")
    exclude_same_document: Tunable[bool] = Field(
        True, description="never take a negative from a positive's own document (frequent false negatives)"
    )
    teacher: Tunable[Literal["dense", "hybrid"]] = Field(
        "hybrid", description="who mines and scores negatives: the base model, or it fused with BM25 (see "
        "embedtune.prep.teacher; falls back to dense for languages written without spaces)"
    )
    bm25_weight: Tunable[float] = Field(0.5, ge=0, le=1, description="BM25's share in the hybrid teacher")
    mining_batch_size: Tunable[int] = Field(64, ge=1, le=65_536, description="encoding batch size")
    mining_query_block: Tunable[int] = Field(
        256, ge=1, le=1_048_576, description="queries scored at once against all candidates")
    query_max_length: Tunable[int | None] = Field(None, gt=0, le=1_048_576)
    passage_max_length: Tunable[int | None] = Field(None, gt=0, le=1_048_576)


class LoraConfig(StrictModel):
    rank: Tunable[int] = Field(16, ge=1, le=4096)
    alpha: Tunable[int] = Field(32, ge=1, le=65_536)
    dropout: Tunable[float] = Field(0.1, ge=0, lt=1)
    target_modules: Tunable[list[str] | None] = Field(None, description="None: chosen per architecture")


class FinetuneConfig(StrictModel):
    finetuning_type: Tunable[Literal["all_weights", "lora_merged"]] = "all_weights"
    epochs: Tunable[float] = Field(3, gt=0, le=10_000)
    max_steps: Tunable[int | None] = Field(None, gt=0, le=10**9)
    learning_rate: Tunable[float] = Field(1e-5, gt=0, le=10)
    warmup_steps: Tunable[int] = Field(5, ge=0, le=10**9)
    lr_scheduler: Tunable[str] = "cosine"
    weight_decay: Tunable[float] = Field(0.01, ge=0, le=1)
    global_batch_size: Tunable[int] = Field(128, ge=1, le=1_048_576)
    micro_batch_size: Tunable[int | None] = Field(
        None, ge=1, le=1_048_576, description="GradCache mini-batch; None: whole per-device batch in one forward pass"
    )
    loss: Tunable[str] = Field(
        "auto", description="a name in embedtune.train.losses.LOSSES (checked when finetune starts), or auto: "
        "cached_mnrl (GradCache) if micro_batch_size < per-device batch, else mnrl; "
        "margin_mse: distil prep's teacher score margins (positive minus each negative), as GPL does"
    )
    auto_scale_batch: Tunable[bool] = True
    passages_per_query: Tunable[int] = Field(5, ge=1, le=1024, description="1 positive + (n-1) hard negatives")
    temperature: Tunable[float] = Field(0.02, gt=1e-4, le=10)
    in_batch_negatives: Tunable[bool] = True
    matryoshka_dims: Tunable[list[Dimension] | Literal["auto"] | None] = "auto"
    validation_fraction: Tunable[float] = Field(0.1, ge=0, lt=1)
    eval_steps: Tunable[int | None] = Field(None, gt=0, le=10**9)
    checkpoint_steps: Tunable[int] = Field(50, gt=0, le=10**9)
    save_total_limit: Tunable[int | None] = Field(2, ge=1, le=10_000, description="checkpoints kept (plus the best)")
    val_corpus_size: Tunable[int] = Field(
        1000, ge=0, le=10**8, description="other passages added to the validation corpus")
    seed: Tunable[int] = Field(42, ge=0, le=SEED_MAX)
    attention_dropout: Tunable[float | None] = Field(
        0.0, ge=0, lt=1, description="dropout on the attention probabilities while training (the saved model's "
        "config keeps its own value). 0 lets SDPA run its fused kernel: SciFact's MiniLM steps (256-token passages, "
        "bf16) ran 2.6x faster on a CPU with 2.6x less peak memory, at the same nDCG. None: the model's own (0.1 "
        "for BERT-family models)"
    )
    cpu_bf16: Tunable[bool | None] = Field(
        None, description="bf16 mixed precision (autocast; fp32 master weights and optimizer) when training on a "
        "CPU. None: on where the CPU multiplies bf16 natively (AVX512-BF16 or AMX; MiniLM steps 1.6-1.7x faster), "
        "off elsewhere, where bf16 is emulated and slower than fp32. GPUs use bf16 wherever CUDA supports it"
    )
    report_to: Tunable[Literal["none", "tensorboard"]] = Field(
        "none", description="tensorboard: training loss, learning rate and validation metrics written to "
        "<run>/finetune/tensorboard/ (`tensorboard --logdir` it); needs the tensorboard package")
    lora: LoraConfig = Field(default_factory=LoraConfig)


class EvalConfig(StrictModel):
    k_values: Tunable[list[Annotated[int, Field(ge=1, le=10_000)]]] = Field(default_factory=lambda: [1, 5, 10, 100])
    top_k: Tunable[int] = Field(100, ge=1, le=10_000)
    batch_size: Tunable[int] = Field(64, ge=1, le=65_536)
    ignore_identical_ids: Tunable[bool] = Field(False, description="drop hits whose id equals the query id (BEIR)")
    bm25: Tunable[bool] = Field(True, description="add BM25 (bm25s) as the lexical reference row")
    bm25_stopwords: Tunable[str | None] = Field("en", description="bm25s stopword list; None for other languages")
    hybrid_bm25_weight: Tunable[float] = Field(
        DEFAULT_BM25_WEIGHT, ge=0, lt=1,
        description="also score each model fused with BM25 (z-scores, this weight on BM25); 0 turns it off",
    )
    hybrid_weight_grid: Tunable[list[Annotated[float, Field(ge=0, lt=1)]]] = Field(
        default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5],
        description="BM25 weights tried on the run's synthetic held-out queries; the best is the one the index "
        "deploys (no real query involved). Empty: deploy hybrid_bm25_weight",
    )
    matryoshka_sweep: Tunable[bool] = True
    matryoshka_dims: Tunable[list[Dimension] | None] = Field(
        None, description="dimensions to sweep; None: the fine-tune's Matryoshka dims, else 256/128/64"
    )
    search: Tunable[Literal["exact", "faiss"]] = Field("exact", description="exact: blocked torch; faiss: IndexFlatIP")
    dataset: Annotated[str | None, managed("dataset.validation")] = Field(
        None, description="BEIR folder of your own labelled queries (50 are enough to start): scored beside the "
        "synthetic held-out set, and the release gate decides on it. Queries that were sdg.examples are left out")
    heldout: Tunable[bool] = Field(
        True, description="with eval.dataset, also score the run's synthetic held-out queries (they choose the "
        "BM25 weight); off saves encoding the held-out corpus")
    queries: Annotated[str | None, workspace_dataset("beir")] = Field(
        None, description="BEIR folder to take queries from (cross-lingual)")
    split: Tunable[PathName] = Field("test", description="qrels/<split>.tsv: a file name, no path")
    cache_dir: Closed[str | None] = Field(None, description="embedding cache; None: <run>/eval/cache")


class ExportConfig(StrictModel):
    opset: Tunable[int] = Field(17, ge=14, le=30)
    int8: Tunable[bool] = True
    int8_per_channel: Tunable[bool] = Field(True, description="one weight scale per output channel (closer to fp32)")
    int8_reduce_range: Tunable[bool | None] = Field(
        None, description="7-bit weights; None: on for CPUs without VNNI, whose int8 kernels can saturate"
    )
    int8_exclude_sensitive: Tunable[bool | None] = Field(
        None, description="layers with activation outliers kept fp32: true = FFN down-projections (and a "
                          "decoder's first layers), false = none, null (auto) = a decoder's only (per-channel int8 "
                          "encoders lose nothing on SciFact)"
    )
    int8_quantize_attention: Tunable[bool] = Field(
        True, description="quantise the fused attention's QKV projection too (37 % of int8 time when fp32)"
    )
    gpu_precisions: Tunable[list[Literal["fp16", "fp8"]]] = Field(default_factory=lambda: ["fp16"])
    parity_min_cosine: Tunable[float] = Field(0.9999, gt=0, le=1)
    tolerance_low_k: Tunable[float] = Field(
        0.03, ge=0, le=1, description="allowed metric loss (derived below fp32) at k < 5")
    tolerance_high_k: Tunable[float] = Field(
        0.01, ge=0, le=1, description="allowed metric loss (derived below fp32) at k >= 5")
    allow_parity_failure: Tunable[bool] = False


class IndexConfig(StrictModel):
    """The vector store the run deploys into (Milvus; see :mod:`embedtune.retrieval.milvus`)."""

    uri: Closed[str | None] = Field(
        None, description="None: Milvus Lite in <run>/index/milvus.db; a *.db path; or a Milvus server URI "
        "(http://host:19530) for a corpus that outgrows one machine")
    token_env: Closed[str | None] = Field(
        None, description="environment variable holding the Milvus token (user:password)")
    collection: Tunable[str | None] = Field(
        None, description="the alias searches use; None: the run's name. Each build writes a new collection "
        "and swaps the alias to it when complete")
    dimensions: Tunable[int | None] = Field(
        None, gt=0, le=1_048_576, description="Matryoshka size stored; None: the model's full size")
    batch_size: Tunable[int] = Field(64, ge=1, le=65_536, description="chunks encoded and inserted at once")
    bm25: Tunable[bool] = Field(
        True, description="index the text for BM25 (Milvus's built-in function); off: dense only")
    bm25_weight: Tunable[float | None] = Field(
        None, ge=0, lt=1, description="hybrid fusion weight; None: the one eval chose on the synthetic held-out "
        "queries, else eval.hybrid_bm25_weight")
    fusion: Tunable[Fusion] = Field(
        "zscore", description="zscore: eval's fusion over candidate lists (what eval scored); rrf / weighted: "
        "Milvus's RRFRanker / WeightedRanker")
    candidates: Tunable[int] = Field(
        DEFAULT_CANDIDATES, ge=1, le=16384, description="dense hits per query fused in hybrid search")
    lexical_candidates: Tunable[int] = Field(
        DEFAULT_LEXICAL_CANDIDATES, ge=1, le=16384, description="BM25 hits per query fused in hybrid search")
    keep_previous: Tunable[int] = Field(1, ge=0, le=1000, description="older collections kept after a swap (rollback)")
    timeout: Tunable[float] = Field(30.0, gt=0, le=86_400, description="seconds to wait for the store")


class DeployConfig(StrictModel):
    """The release gate (see :mod:`embedtune.retrieval.release`) and the check of what it deployed."""

    force: Tunable[bool] = Field(
        False, description="deploy the challenger (the fine-tuned model's best retrieval) even when it does not "
        "beat the champion beyond the noise; `embedtune deploy --force` sets it")
    min_gain: Tunable[float] = Field(
        0.0, ge=-1, le=1, description="nDCG@10 the challenger must beat the champion by: the lower end of the paired "
        "interval must lie above it (0: any gain beyond the noise)")
    confidence: Tunable[float] = Field(0.95, ge=0.5, lt=1, description="level of the paired bootstrap interval")
    check: Tunable[bool] = Field(
        True, description="after reindexing, run the deployed search on the deciding query set and compare it with "
        "eval's figures (export.tolerance_low_k / tolerance_high_k); the alias is swapped only if it passes")


class ServeConfig(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key_env: str | None = Field(None, description="environment variable with the Bearer key")
    max_batch_tokens: int = Field(16384, gt=0, le=16_777_216)
    max_queue: int = Field(256, ge=1, le=1_000_000)
    max_inputs: int = Field(2048, ge=1, le=1_000_000)
    max_request_bytes: int = Field(8 * 1024 * 1024, gt=0, le=1 << 30)
    max_request_tokens: int = Field(
        65536, gt=0, le=16_777_216, description="tokens one request may hold after tokenisation (413 above); "
        "2,048 inputs of a few words fit, 2,048 long passages do not")
    backend: Literal["auto", "onnx", "torch"] = Field(
        "auto", description="auto = the ONNX export when the model folder or run has one, else torch")
    onnx_precision: ServePrecision = Field(
        "auto", description="auto = int8 on CPU when exported, fp32 on GPU")


class Recipe(StrictModel):
    name: Annotated[PathName, managed("the job id")] = Field("run", description="runs/<name>: a folder name")
    model: ModelConfig = Field(default_factory=ModelConfig)
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    sdg: SdgConfig = Field(default_factory=SdgConfig)
    prep: PrepConfig = Field(default_factory=PrepConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)
    serve: Closed[ServeConfig] = Field(default_factory=ServeConfig)

    @model_validator(mode="after")
    def _ranges_are_ordered(self) -> Recipe:
        s = self.sdg
        if s.min_complexity > s.max_complexity:
            raise ValueError("sdg.min_complexity must be <= sdg.max_complexity")
        if s.min_hops > s.max_hops:
            raise ValueError("sdg.min_hops must be <= sdg.max_hops")
        if self.prep.negatives_used > self.prep.hard_negatives_to_mine and self.prep.fill_missing == "drop":
            raise ValueError("prep.negatives_used exceeds prep.hard_negatives_to_mine with fill_missing=drop")
        return self


# --------------------------------------------------------------------------------------------- loading


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (or start from defaults), apply ``section.key=value`` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(Path(path))
    for item in overrides or []:
        apply_override(data, item)
    return validate_recipe(data)


def validate_recipe(data: dict[str, Any]) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        err = RecipeError(_explain(exc))
        err.key = ".".join(str(p) for p in exc.errors()[0]["loc"]) or None
        raise err from None


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as YAML (numbers, lists, null)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override {item!r} is not of the form section.key=value")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: the top level must be a mapping of sections")
    return data


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            hint = _closest_field(err["loc"])
            lines.append(f"unknown key '{loc}'" + (f" — did you mean '{hint}'?" if hint else ""))
        else:
            allowed = err.get("ctx", {}).get("expected")
            msg = f"'{loc}': {err['msg']}" if loc else err["msg"]
            if allowed:
                msg += f" (allowed: {allowed})"
            lines.append(msg + f" [got {err.get('input')!r}]")
    return "invalid recipe:\n  " + "\n  ".join(lines)


def _closest_field(loc: tuple[Any, ...]) -> str | None:
    """Walk the models along ``loc`` and return the dotted path of the nearest valid name."""
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    match = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.5)
    return ".".join([*map(str, loc[:-1]), match[0]]) if match else None
