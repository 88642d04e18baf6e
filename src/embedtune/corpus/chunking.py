"""Sentence-aware chunking bounded in the embedding model's own tokens.

Sentences (sentencex: rule-based, ~300 languages, handles CJK/Devanagari/Arabic punctuation) are packed
greedily into chunks of at most ``max_tokens`` tokens; a sentence longer than that is cut at token
boundaries. Chunk ids are ``<doc_id>#<n>``: stable for the same document and settings.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from sentencex import segment
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    tokens: int


def sentence_spans(text: str, language: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of ``text`` (paragraph breaks always end a sentence)."""
    spans: list[tuple[int, int]] = []
    pos = 0
    for paragraph in text.split("\n\n"):
        offset = pos
        for sentence in segment(language, paragraph):
            start = text.find(sentence.strip(), offset)
            if start < 0 or not sentence.strip():
                continue
            end = start + len(sentence.strip())
            spans.append((start, end))
            offset = end
        pos += len(paragraph) + 2
    return spans


def chunk_text(
    text: str,
    tokenizer: PreTrainedTokenizerBase,
    max_tokens: int,
    language: str = "en",
    overlap_sentences: int = 0,
) -> list[tuple[int, int]]:
    """Character spans of chunks of ``text``, each at most ``max_tokens`` tokens (without specials)."""
    sentences = list(_token_bounded(text, sentence_spans(text, language), tokenizer, max_tokens))
    return list(_pack(sentences, max_tokens, overlap_sentences))


def _token_bounded(text: str, spans: list[tuple[int, int]], tokenizer: PreTrainedTokenizerBase,
                   max_tokens: int) -> Iterator[Span]:
    """Token counts per sentence; a sentence over the limit is split at token offsets."""
    if not spans:
        return
    # Sentences are counted, not encoded: silence transformers' "longer than max length" warning.
    tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    enc = tokenizer([text[s:e] for s, e in spans], add_special_tokens=False, return_offsets_mapping=True)
    for (start, end), ids, offsets in zip(spans, enc["input_ids"], enc["offset_mapping"], strict=True):
        if len(ids) <= max_tokens:
            yield Span(start, end, len(ids))
            continue
        for i in range(0, len(ids), max_tokens):
            piece = offsets[i : i + max_tokens]
            yield Span(start + piece[0][0], start + piece[-1][1], len(piece))


def _pack(sentences: list[Span], max_tokens: int, overlap: int) -> Iterator[tuple[int, int]]:
    current: list[Span] = []
    size = 0
    for sent in sentences:
        if current and size + sent.tokens > max_tokens:
            yield current[0].start, current[-1].end
            current = current[-overlap:] if overlap else []
            size = sum(s.tokens for s in current)
            while current and size + sent.tokens > max_tokens:  # overlap must not overflow the next chunk
                size -= current.pop(0).tokens
        current.append(sent)
        size += sent.tokens
    if current:
        yield current[0].start, current[-1].end
