"""Query filters shared by every generator, and :class:`QueryFilter`, the chain that applies them in order.

Each check returns a rejection reason (or None to keep).

Texts without spaces between words (Chinese, Japanese) are measured in characters: a "word" there is one
character, and copy detection uses character n-grams instead of word n-grams.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from embedtune.config import Recipe
from embedtune.schemas import Chunk
from embedtune.sdg.base import Candidate, Generator

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from embedtune.retrieval.encoders import OnnxModelEncoder
    from embedtune.retrieval.fusion import HybridRescorer

    Rescore = Callable[[int, int, torch.Tensor], torch.Tensor]

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
                    positives: Sequence[Sequence[int]], block: int = 1024,
                    rescore: Rescore | None = None) -> np.ndarray:
    """For each query, the 1-based rank of its best-ranked positive among all passages (ties favour the
    positive). ``positives[i]`` holds row indices into ``passage_emb``. ``rescore(start, end, dense)`` turns
    a block of dense scores into the judge's (e.g. :class:`embedtune.retrieval.fusion.HybridRescorer`)."""
    return roundtrip_rank_pairs(query_emb, passage_emb, positives, block, rescore)[0]


def roundtrip_rank_pairs(query_emb: np.ndarray, passage_emb: np.ndarray, positives: Sequence[Sequence[int]],
                         block: int = 1024, rescore: Rescore | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ranks by the judge, ranks by the dense scores alone), from one pass over the dense scores; the two are
    the same array without ``rescore``."""
    judged = np.empty(len(query_emb), dtype=np.int64)
    dense = np.empty(len(query_emb), dtype=np.int64) if rescore is not None else judged
    for start in range(0, len(query_emb), block):
        scores = query_emb[start:start + block] @ passage_emb.T
        if rescore is not None:
            import torch

            _block_ranks(scores, positives, start, dense)
            scores = rescore(start, start + len(scores), torch.from_numpy(np.ascontiguousarray(scores))).numpy()
        _block_ranks(scores, positives, start, judged)
    return judged, dense


def _block_ranks(scores: np.ndarray, positives: Sequence[Sequence[int]], start: int, out: np.ndarray) -> None:
    for i, row in enumerate(scores):
        best = row[list(positives[start + i])].max()
        out[start + i] = 1 + int((row > best).sum())


def check_roundtrip(rank: int, top_k: int, min_rank: int) -> str | None:
    if rank > top_k:
        return "roundtrip_miss"
    if rank < min_rank:
        return "roundtrip_too_easy"
    return None


@dataclass
class FilterResult:
    kept: list[Candidate]
    rejected: list[tuple[Candidate, str]]
    reasons: Counter[str]
    ranks: list[int]
    backend: str | None = None  # what encoded for the dedup/round-trip filters (None: nothing was encoded)
    #: with ``roundtrip_by: hybrid``, the kept queries the base model alone would have dropped (rank > top_k)
    rescued_by_bm25: int | None = None


class QueryFilter:
    """The shared filter chain (see the module docstring for the order and the reasons)."""

    def __init__(self, recipe: Recipe, generator: Generator, chunks: Sequence[Chunk], counts: Counter[str],
                 cache_dir: Path | None = None):
        self.recipe, self.generator, self.counts, self.cache_dir = recipe, generator, counts, cache_dir
        self.cfg = recipe.sdg.filters
        self.chunks = list(chunks)
        self.by_id = {c.id: c for c in chunks}
        self.rejected: list[tuple[Candidate, str]] = []
        self.reasons: Counter[str] = Counter()
        self._model = None
        self._onnx: OnnxModelEncoder | None | bool = None  # False: asked for and unavailable (torch instead)
        self._query_emb: np.ndarray | None = None
        self._rescued: int | None = None

    def apply(self, candidates: list[Candidate]) -> FilterResult:
        kept = self._cheap(candidates)
        kept = self._near_duplicates(kept)
        ranks: list[int] = []
        if self._roundtrip_on():
            kept = self._roundtrip(kept)
            ranks = [c.roundtrip_rank for c in kept if c.roundtrip_rank is not None]
        if self.generator.oversamples:
            kept = self._quota(kept)
        kept = self._judge(kept)
        backend = self.backend if self._onnx is not None else None
        return FilterResult(kept, self.rejected, self.reasons, ranks, backend, self._rescued)

    def _reject(self, cand: Candidate, reason: str) -> None:
        self.rejected.append((cand, reason))
        self.reasons[reason] += 1

    def _cheap(self, candidates: list[Candidate]) -> list[Candidate]:
        exact = ExactDeduper()
        kept = []
        for cand in candidates:
            unknown = [i for i in cand.positive_ids if i not in self.by_id]
            passages = [self.by_id[i].text for i in cand.positive_ids if i in self.by_id]
            reason = (
                ("unknown_positive" if unknown or not passages else None)
                or check_is_query(cand.text)
                or check_length(cand.text, self.cfg.min_words, self.cfg.max_words)
                or check_copied(cand.text, passages, self.cfg.max_ngram_overlap)
                or exact.check(cand.text)
            )
            if reason:
                self._reject(cand, reason)
            else:
                kept.append(cand)
        return kept

    def _embedder(self):
        if self._model is None:
            from embedtune.models import load_model

            self._model = load_model(self.recipe.model)
        return self._model

    def _onnx_encoder(self) -> OnnxModelEncoder | None:
        """The base model's cached ONNX int8 encoder when ``filters.backend`` asks for it and it exports."""
        if self._onnx is None:
            self._onnx = False
            if self.cfg.backend == "onnx-int8":
                from embedtune.convert.cached import cached_int8_encoder

                self._onnx = cached_int8_encoder(self.recipe.model) or False
        return self._onnx or None

    @property
    def backend(self) -> str:
        """The backend the filters actually encode with (``onnx-int8`` may have fallen back to torch)."""
        return "onnx-int8" if self._onnx_encoder() is not None else "torch"

    def _near_duplicates(self, cands: list[Candidate]) -> list[Candidate]:
        if len(cands) < 2:
            return cands
        self._query_emb = self._encode_queries([c.text for c in cands])
        mask = near_duplicates(self._query_emb, self.recipe.sdg.dedup_threshold)
        for cand, keep in zip(cands, mask, strict=True):
            if not keep:
                self._reject(cand, "near_duplicate")
        self._query_emb = self._query_emb[mask]
        return [c for c, keep in zip(cands, mask, strict=True) if keep]

    def _encode_queries(self, texts: list[str], block: int = 512) -> np.ndarray:
        """Base-model query embeddings, in blocks so that a long run reports progress."""
        from embedtune.console import track
        from embedtune.models import encode_queries

        onnx = self._onnx_encoder()
        if onnx is not None:
            def encode(part: list[str]) -> np.ndarray:
                return onnx.model.encode(part, prompt_name=onnx.prompt_name("query"), batch_size=onnx.batch_size)
            dim = onnx.model.dimension
        else:
            model = self._embedder()
            def encode(part: list[str]) -> np.ndarray:
                return encode_queries(model, part)
            dim = (getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension)() or 0
        starts = range(0, len(texts), block)
        parts = [encode(texts[s:s + block])
                 for s in track(starts, "sdg filters: encoding queries", total=len(texts), unit="queries",
                                weight=lambda s: min(block, len(texts) - s))]
        return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)

    def _roundtrip_on(self) -> bool:
        return self.cfg.roundtrip if self.cfg.roundtrip is not None else self.generator.needs_roundtrip

    def _roundtrip(self, cands: list[Candidate]) -> list[Candidate]:
        if not cands:
            return cands
        q = self._query_emb
        if q is None or len(q) != len(cands):
            q = self._encode_queries([c.text for c in cands])
        p = self._passage_embeddings()
        row = {c.id: i for i, c in enumerate(self.chunks)}
        positives = [[row[i] for i in c.positive_ids] for c in cands]
        rescorer = self._hybrid_rescorer([c.text for c in cands])
        # What BM25 added: kept queries whose positive the base model alone ranks beyond top_k.
        ranks, dense = roundtrip_rank_pairs(q, p, positives, rescore=rescorer)
        kept, rescued = [], 0
        for cand, rank, dense_rank in zip(cands, ranks, dense, strict=True):
            cand.roundtrip_rank = int(rank)
            reason = check_roundtrip(int(rank), self.cfg.roundtrip_top_k, self.cfg.roundtrip_min_rank)
            if reason:
                self._reject(cand, reason)
            else:
                kept.append(cand)
                rescued += int(dense_rank > self.cfg.roundtrip_top_k)
        self._rescued = rescued if rescorer is not None else None
        return kept

    def _hybrid_rescorer(self, queries: list[str]) -> HybridRescorer | None:
        """prep's hybrid teacher over all chunks when ``roundtrip_by: hybrid`` (None: dense ranks)."""
        from embedtune.retrieval.fusion import hybrid_rescorer

        if self.cfg.roundtrip_by == "dense":
            return None
        return hybrid_rescorer(queries, [c.passage for c in self.chunks], self.recipe.prep.bm25_weight,
                               self.recipe.corpus.language, "sdg.filters.roundtrip_by=hybrid")

    def _passage_embeddings(self) -> np.ndarray:
        """All chunks' base-model embeddings, from the run's embedding cache (prep's mining reuses the torch
        ones; the int8 ones are keyed apart, so they never stand in for torch vectors)."""
        from embedtune.models import resolve
        from embedtune.retrieval.cache import EmbeddingCache, encode_cached, encode_passages_cached

        cache = EmbeddingCache(self.cache_dir) if self.cache_dir else None
        texts = [c.passage for c in self.chunks]
        if (onnx := self._onnx_encoder()) is not None:
            return encode_cached(onnx, texts, "passage", cache, what="base model (onnx int8), chunks")
        return encode_passages_cached(self._embedder(), resolve(self.recipe.model).path, texts, cache,
                                      what="base model, chunks")

    def _quota(self, cands: list[Candidate]) -> list[Candidate]:
        """At most ``queries_per_chunk`` per source chunk, preferring question-shaped queries, then those
        whose positive the base model ranks higher (more likely answerable)."""
        per_source: Counter[str] = Counter()
        kept = []
        ordered = sorted(cands, key=lambda c: (not looks_like_question(c.text),
                                               c.roundtrip_rank or 0))
        for cand in ordered:
            per_source[cand.source] += 1
            if per_source[cand.source] > self.recipe.sdg.queries_per_chunk:
                self._reject(cand, "over_quota")
            else:
                kept.append(cand)
        return kept

    def _judge(self, cands: list[Candidate]) -> list[Candidate]:
        if not cands:
            return cands
        scores = self.generator.judge(cands, self.by_id, self.counts)
        if scores is None:
            return cands
        kept = []
        for cand, score in zip(cands, scores, strict=True):
            if score is None:
                self._reject(cand, "judge_unparseable")
                continue
            cand.scores = score
            if (score.overall or 0.0) < self.recipe.sdg.judge_threshold:
                self._reject(cand, "judge_low_score")
            else:
                kept.append(cand)
        return kept
