"""Turn request inputs (texts or token ids) into the exact token ids the model will see.

Tokenising once, up front, gives the server what it needs before any encoding: real token counts for
``usage`` and for the batcher's token budget, the NIM-style 400 for too-long input, and START/END
truncation. The ids match what sentence-transformers produces for ``encode_query`` / ``encode_document``
(the prompt is prepended to the text, then the whole string is tokenised with special tokens), so served
embeddings equal the local model's.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Literal

QUERY, DOCUMENT = "query", "document"
InputType = Literal["query", "passage", "document"]
Truncate = Literal["NONE", "START", "END"]


class InputTooLongError(ValueError):
    """An input has more tokens than the model accepts and the request asked not to truncate."""

    def __init__(self, index: int, length: int, limit: int):
        super().__init__(
            f"Input length {length} exceeds maximum allowed token size {limit}"
            f" (input {index}; send truncate=END or START to cut it)"
        )
        self.index, self.length, self.limit = index, length, limit


class TokenIdError(ValueError):
    """A token-id input holds an id outside the model's vocabulary."""


def prompt_name(input_type: InputType | None) -> str:
    """NIM/OpenAI input_type -> sentence-transformers prompt name.

    Without an input_type the text is treated as a passage: OpenAI clients (and the libraries built on
    them) cannot send one, and what they embed in bulk is the collection being indexed. A query sent
    without input_type is still embedded sensibly; asymmetric models just lose their query prompt.
    """
    return QUERY if input_type == "query" else DOCUMENT


class Tokenization:
    """A tokenizer plus the model's prompts and length limit; safe to call from several threads."""

    def __init__(self, tokenizer, prompts: dict[str, str], max_tokens: int):
        self.tokenizer = tokenizer
        self.prompts = {QUERY: prompts.get(QUERY, ""), DOCUMENT: prompts.get(DOCUMENT, "")}
        self.max_tokens = int(max_tokens)
        self.vocab_size = len(tokenizer)
        # Fast tokenizers keep mutable truncation/padding state in Rust; concurrent calls can collide
        # ("Already borrowed"), so every call goes through one lock.
        self._lock = threading.Lock()
        self.prefix, self.suffix = self._special_tokens()
        self._prompt_ids = {name: self._ids(text) if text else [] for name, text in self.prompts.items()}

    def _ids(self, text: str, special: bool = False) -> list[int]:
        with self._lock:
            return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after a single sequence (e.g. [CLS] ... [SEP])."""
        probe = "hello"
        body, full = self._ids(probe), self._ids(probe, special=True)
        for start in range(len(full) - len(body) + 1):
            if full[start:start + len(body)] == body:
                return full[:start], full[start + len(body):]
        return [], []  # no template we can recognise: add nothing around token-id inputs

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))

    @property
    def pad_left(self) -> bool:
        return getattr(self.tokenizer, "padding_side", "right") == "left"

    # ------------------------------------------------------------------------------ public

    def encode_texts(self, texts: Sequence[str], input_type: InputType | None = None,
                     truncate: Truncate = "NONE") -> list[list[int]]:
        name = prompt_name(input_type)
        prompted = [self.prompts[name] + text for text in texts]
        with self._lock:
            full = self.tokenizer(prompted, add_special_tokens=True, verbose=False)["input_ids"]
        n_prompt = len(self._prompt_ids[name])
        return [self._fit(list(ids), i, truncate, n_prompt) for i, ids in enumerate(full)]

    def encode_token_ids(self, inputs: Sequence[Sequence[int]], input_type: InputType | None = None,
                         truncate: Truncate = "NONE") -> list[list[int]]:
        """Token-id inputs are ids of THIS model's vocabulary (as vLLM and TEI read them), used as given:
        decoding and re-tokenising could change them. The prompt and special tokens are added around
        them, as they would be around a text."""
        prompt = self._prompt_ids[prompt_name(input_type)]
        out = []
        for i, ids in enumerate(inputs):
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise TokenIdError(f"input {i} has token id {bad[0]} outside the vocabulary "
                                   f"(0..{self.vocab_size - 1})")
            out.append(self._fit(self.prefix + prompt + list(ids) + self.suffix, i, truncate, len(prompt)))
        return out

    def _fit(self, ids: list[int], index: int, truncate: Truncate, n_prompt: int) -> list[int]:
        if len(ids) <= self.max_tokens:
            return ids
        if truncate == "NONE":
            raise InputTooLongError(index, len(ids), self.max_tokens)
        head, tail = len(self.prefix), len(self.suffix)
        body = ids[head:len(ids) - tail]
        room = max(self.max_tokens - head - tail, 1)
        if truncate == "END":
            body = body[:room]
        else:  # START: drop the oldest tokens but keep the prompt, which tells the model what it reads
            keep = min(n_prompt, room - 1) if room > 1 else 0
            body = body[:keep] + body[len(body) - (room - keep):]
        return self.prefix + body + self.suffix
