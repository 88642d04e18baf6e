"""Sentence-aware chunking bounded in the embedding model's own tokens.

Sentences (sentencex: rule-based, ~300 languages, handles CJK/Devanagari/Arabic punctuation) are packed
greedily into chunks of at most ``max_tokens`` tokens; a sentence longer than that is cut at token
boundaries. Chunk ids are ``<doc_id>#<n>``: stable for the same document and settings.

Packing adds up per-sentence token counts, which is exact for WordPiece on spaced scripts but not for
SentencePiece tokenizers (XLM-R, e5): a piece of text cut out of a sentence, or a sentence on its own, gets
a leading "▁" token that it does not have inside the chunk, and Chinese/Japanese sentences run together
without spaces segment differently. So every chunk is counted again as the text it is, and one over the
limit is re-packed (or, for a single sentence, cut) with exact counts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from sentencex import segment
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    tokens: int


# A full-width 。！？ always ends a sentence (with any closing quotes/brackets after it). sentencex treats
# "。" like ".", which keeps "…ました。1868年…" together as if the digit continued a decimal number.
_CJK_SENTENCE_END = re.compile(r"[。！？]+[」』）】〕》〉”’]*")


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
            spans.extend(_split_cjk_ends(text, start, end))
            offset = end
        pos += len(paragraph) + 2
    return spans


def _split_cjk_ends(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    for match in _CJK_SENTENCE_END.finditer(text, start, end):
        if match.end() < end:
            piece = _trim(text, start, match.end())
            if piece[1] > piece[0]:
                yield piece
            start = match.end()
    start, end = _trim(text, start, end)
    if end > start:
        yield start, end


def chunk_text(
    text: str,
    tokenizer: PreTrainedTokenizerBase,
    max_tokens: int,
    language: str = "en",
    overlap_sentences: int = 0,
) -> list[tuple[int, int]]:
    """Character spans of chunks of ``text``, each at most ``max_tokens`` tokens (without specials)."""
    sentences = list(_token_bounded(text, sentence_spans(text, language), tokenizer, max_tokens))
    groups = list(_pack(sentences, max_tokens, overlap_sentences))
    return list(_fit(text, groups, tokenizer, max_tokens))


def _count(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


def _fit(text: str, groups: list[list[Span]], tokenizer: PreTrainedTokenizerBase,
         max_tokens: int) -> Iterator[tuple[int, int]]:
    """Chunk spans whose text really has at most ``max_tokens`` tokens (see the module docstring)."""
    counts = _count(tokenizer, [text[g[0].start : g[-1].end] for g in groups])
    for group, n in zip(groups, counts, strict=True):
        if n <= max_tokens:
            yield group[0].start, group[-1].end
            continue
        start = end = group[0].start
        for sent in group:  # rare: re-pack this group sentence by sentence, counting the joined text
            if end > start and _count(tokenizer, [text[start : sent.end]])[0] > max_tokens:
                yield from _cut(text, start, end, tokenizer, max_tokens)
                start = sent.start
            end = sent.end
        yield from _cut(text, start, end, tokenizer, max_tokens)


def _cut(text: str, start: int, end: int, tokenizer: PreTrainedTokenizerBase,
         max_tokens: int) -> Iterator[tuple[int, int]]:
    """``text[start:end]`` cut at token boundaries into pieces of at most ``max_tokens`` tokens each."""
    while start < end:
        offsets = tokenizer(text[start:end], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) <= max_tokens:
            yield start, end
            return
        take = max_tokens  # a piece ends where its next token starts (see _token_bounded)
        cut = start + offsets[take][0]
        while take > 1 and (cut <= start or _count(tokenizer, [text[start:cut]])[0] > max_tokens):
            take -= 1  # the piece alone tokenises longer than inside the sentence (e.g. a leading "▁")
            cut = start + offsets[take][0]
        cut = max(cut, start + 1)
        piece = _trim(text, start, cut)
        if piece[1] > piece[0]:
            yield piece
        start, end = _trim(text, cut, end)


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


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
        # Pieces run from one piece's first token to the next piece's first token, so that characters the
        # tokenizer drops (e.g. Devanagari virama and vowel signs under an accent-stripping WordPiece) stay
        # in a chunk instead of falling between two.
        firsts = range(0, len(ids), max_tokens)
        cuts = [start, *(start + offsets[i][0] for i in firsts[1:]), end]
        for i, a, b in zip(firsts, cuts, cuts[1:], strict=False):
            a, b = _trim(text, a, b)
            if b > a:
                yield Span(a, b, min(max_tokens, len(ids) - i))


def _pack(sentences: list[Span], max_tokens: int, overlap: int) -> Iterator[list[Span]]:
    current: list[Span] = []
    size = 0
    for sent in sentences:
        if current and size + sent.tokens > max_tokens:
            yield current
            current = current[-overlap:] if overlap else []
            size = sum(s.tokens for s in current)
            while current and size + sent.tokens > max_tokens:  # overlap must not overflow the next chunk
                size -= current.pop(0).tokens
        current.append(sent)
        size += sent.tokens
    if current:
        yield current


def merge_fragments(text: str, spans: list[tuple[int, int]], tokenizer: PreTrainedTokenizerBase,
                    max_tokens: int, min_chars: int) -> list[tuple[int, int]]:
    """``spans`` with every chunk shorter than ``min_chars`` merged into a neighbour when the two together
    still have at most ``max_tokens`` tokens (counted as the text they are): a lone heading or a line left
    at a document's end carries too little to be retrieved on its own. The previous chunk is tried first
    (a fragment usually ends what came before), then the next; a fragment that fits neither stays."""
    out = list(spans)
    i = 0
    while i < len(out) and len(out) > 1 and min_chars > 0:
        start, end = out[i]
        if end - start >= min_chars:
            i += 1
            continue
        for j in (i - 1, i + 1):
            if 0 <= j < len(out):
                a, b = min(start, out[j][0]), max(end, out[j][1])
                if _count(tokenizer, [text[a:b]])[0] <= max_tokens:
                    out[min(i, j)] = (a, b)
                    del out[max(i, j)]
                    i = min(i, j)  # look at the merged chunk again
                    break
        else:
            i += 1
    return out
