"""Query filters shared by every generator; each returns a rejection reason (or None to keep).

Texts without spaces between words (Chinese, Japanese) are measured in characters: a "word" there is one
character, and copy detection uses character n-grams instead of word n-grams.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import numpy as np

# Han, Hiragana, Katakana, CJK punctuation-free ranges, Thai, Lao, Khmer, Myanmar: scripts written without
# spaces between words.
_SPACELESS = re.compile(
    r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff]"
)
_WORD = re.compile(r"\w+", re.UNICODE)
_CODE_HINTS = re.compile(
    r"```|</?[a-z]+[^>]*>|\bdef |\bimport |\breturn\b.*;|=>|::|\{\s*\"|;\s*$|^\s*[#$>] |https?://"
)
_PROMPT_LEAK = re.compile(r"^\s*(passage|query|question|answer)\s*:", re.IGNORECASE)
# A sentence end followed by another sentence: generated prose, not a query (a query is one sentence).
_SECOND_SENTENCE = re.compile(r"[.!?。！？]\s*\S+\s+\S+")
_QUESTION_START = re.compile(
    r"^(what|which|who|whom|whose|when|where|why|how|is|are|was|were|do|does|did|can|could|should|would|will|"
    r"has|have|had|wie|was|wer|wo|warum|welche[rsn]?|ist|sind|qu[ée]|c[oó]mo|por qu[ée]|quel(le)?s?)\b",
    re.IGNORECASE)


def is_spaceless(text: str) -> bool:
    """True when most letters belong to scripts written without spaces (e.g. Chinese, Japanese)."""
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(bool(_SPACELESS.match(c)) for c in letters) / len(letters) > 0.5


def word_count(text: str) -> int:
    """Words, counting each character of a spaceless script as one word."""
    spaceless = len(_SPACELESS.findall(text))
    rest = _SPACELESS.sub(" ", text)
    return spaceless + len(_WORD.findall(rest))


def check_length(text: str, min_words: int, max_words: int) -> str | None:
    n = word_count(text)
    if n < min_words:
        return "too_short"
    if n > max_words:
        return "too_long"
    return None


def check_is_query(text: str) -> str | None:
    """Rejects empty text, punctuation/number soup, code and echoes of the prompt format."""
    stripped = text.strip()
    if not stripped:
        return "not_a_query"
    letters = sum(unicodedata.category(c).startswith("L") for c in stripped)
    if letters == 0 or letters / len(stripped.replace(" ", "")) < 0.5:
        return "not_a_query"
    if _CODE_HINTS.search(stripped) or _PROMPT_LEAK.search(stripped):
        return "not_a_query"
    if _SECOND_SENTENCE.search(stripped):
        return "multi_sentence"
    return None


def looks_like_question(text: str) -> bool:
    """Ends with a question mark or starts with a question word (used to rank, never to reject)."""
    stripped = text.strip()
    return stripped.endswith(("?", "？")) or bool(_QUESTION_START.match(stripped))


def normalize(text: str) -> str:
    """Case-folded words (or characters of spaceless scripts) joined by single spaces."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_tokens(text))


def _tokens(text: str) -> list[str]:
    if is_spaceless(text):
        return [c for c in text if c.isalnum()]
    return _WORD.findall(text)


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    tokens = _tokens(unicodedata.normalize("NFKC", text).casefold())
    if len(tokens) < n:
        return {tuple(tokens)} if tokens else set()
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def copy_overlap(query: str, passage: str, n: int | None = None) -> float:
    """Share of the query's n-grams found verbatim in the passage (word 3-grams; character 3-grams for
    spaceless scripts, where one character carries roughly what a short word does)."""
    n = n or 3
    q = ngrams(query, n)
    if not q:
        return 0.0
    return len(q & ngrams(passage, n)) / len(q)


def check_copied(query: str, passages: Sequence[str], max_overlap: float) -> str | None:
    if any(copy_overlap(query, p) > max_overlap for p in passages):
        return "copied_from_passage"
    return None


class ExactDeduper:
    """Rejects a query whose normalised text was seen before."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def check(self, text: str) -> str | None:
        key = normalize(text)
        if key in self.seen:
            return "duplicate"
        self.seen.add(key)
        return None


def near_duplicates(embeddings: np.ndarray, threshold: float, block: int = 512) -> np.ndarray:
    """Greedy de-duplication in order: a row is dropped when its cosine with an earlier KEPT row is
    >= ``threshold``. ``embeddings`` must be L2-normalised. Returns a boolean mask of rows to keep."""
    n = len(embeddings)
    keep = np.zeros(n, dtype=bool)
    kept_rows: list[np.ndarray] = []
    for start in range(0, n, block):
        part = embeddings[start:start + block]
        prior = np.vstack(kept_rows) if kept_rows else np.zeros((0, embeddings.shape[1]), embeddings.dtype)
        blocked = (part @ prior.T >= threshold).any(axis=1) if len(prior) else np.zeros(len(part), bool)
        inner = part @ part.T
        kept_here: list[int] = []
        for i in range(len(part)):
            if blocked[i] or any(inner[i, j] >= threshold for j in kept_here):
                continue
            kept_here.append(i)
            keep[start + i] = True
        if kept_here:
            kept_rows.append(part[kept_here])
    return keep


def roundtrip_ranks(query_emb: np.ndarray, passage_emb: np.ndarray,
                    positives: Sequence[Sequence[int]], block: int = 1024) -> np.ndarray:
    """For each query, the 1-based rank of its best-ranked positive among all passages (ties favour the
    positive). ``positives[i]`` holds row indices into ``passage_emb``."""
    ranks = np.empty(len(query_emb), dtype=np.int64)
    for start in range(0, len(query_emb), block):
        scores = query_emb[start:start + block] @ passage_emb.T
        for i, row in enumerate(scores):
            best = row[list(positives[start + i])].max()
            ranks[start + i] = 1 + int((row > best).sum())
    return ranks


def check_roundtrip(rank: int, top_k: int, min_rank: int) -> str | None:
    if rank > top_k:
        return "roundtrip_miss"
    if rank < min_rank:
        return "roundtrip_too_easy"
    return None
