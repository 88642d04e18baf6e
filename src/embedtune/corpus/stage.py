"""The corpus stage: documents -> cleaned, de-duplicated, chunked passages (``corpus/chunks.jsonl``)."""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterator
from pathlib import Path

from embedtune.artifacts import Manifest, RunDir, write_jsonl
from embedtune.config import Recipe
from embedtune.console import log, track
from embedtune.corpus.chunking import chunk_text, merge_fragments
from embedtune.corpus.clean import normalize
from embedtune.corpus.loaders import Document, LoadStats, iter_documents
from embedtune.schemas import Chunk


def run_corpus(recipe: Recipe, run: RunDir, *, force: bool = False) -> Manifest:
    cfg = recipe.corpus
    if cfg.path is None:
        raise ValueError("corpus.path is not set: pass --corpus PATH")
    source = Path(cfg.path).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"corpus path does not exist: {source}")
    config = {"corpus": cfg.model_dump(mode="json"), "model": recipe.model.model_dump(mode="json")}
    stage = run.stage("corpus", config, inputs=[source])
    if (done := stage.up_to_date(force)) is not None:
        return done

    stats = LoadStats()
    docs, counts = _clean_and_dedup(iter_documents(source, stats), cfg.min_chars, cfg.max_documents)
    if not docs:
        raise ValueError(f"no usable documents in {source} ({stats.files} files read, "
                         f"{len(stats.not_read)} not read, {counts['dropped_empty']} empty)")
    from embedtune.models import load_model, max_tokens

    model = load_model(recipe.model)
    budget = cfg.chunk_tokens or chunk_budget(model.tokenizer, max_tokens(model), model.prompts)
    merged: list[int] = []
    chunks = chunk_documents(track(docs, "chunking", total=len(docs)), model.tokenizer, budget,
                             cfg.language, cfg.overlap_sentences, cfg.min_chunk_chars, merged)
    out = stage.dir / "chunks.jsonl"
    n_chunks = write_jsonl(out, chunks)
    # Every file under the corpus path that did not become documents is counted, by reason, and listed.
    counts.update(files=stats.files, skipped_files=len(stats.not_read), skipped_by_reason=stats.by_reason(),
                  documents=len(docs), chunks=n_chunks, merged_fragments=sum(merged), chunk_tokens=budget)
    outputs = [out]
    if stats.not_read:
        outputs.append(stage.dir / "skipped.jsonl")
        write_jsonl(outputs[-1], ({"path": p, "reason": r, "detail": d} for p, r, d in stats.not_read))
    return stage.finish(outputs=outputs, counts=counts)


def chunk_budget(tokenizer, model_max: int, prompts: dict[str, str] | None) -> int:
    """Tokens a chunk may have so that prompt + chunk + special tokens fit the model's max length."""
    prompt_tokens = max((len(tokenizer(p, add_special_tokens=False)["input_ids"])
                         for p in (prompts or {}).values() if p), default=0)
    specials = tokenizer.num_special_tokens_to_add(pair=False)
    return max(16, model_max - prompt_tokens - specials)


def _clean_and_dedup(docs: Iterator[Document], min_chars: int,
                     limit: int | None) -> tuple[list[Document], dict[str, int]]:
    seen: set[str] = set()
    kept: list[Document] = []
    counts = {"dropped_empty": 0, "dropped_duplicates": 0}
    ids: set[str] = set()
    for doc in docs:
        text = normalize(doc.text)
        if len(text) < max(1, min_chars):
            counts["dropped_empty"] += 1
            continue
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest in seen:
            counts["dropped_duplicates"] += 1
            continue
        if doc.id in ids:
            raise ValueError(f"duplicate document id {doc.id!r} (source {doc.source})")
        seen.add(digest)
        ids.add(doc.id)
        # Section offsets hold when the loader's text was normalised already (Markdown's is).
        kept.append(Document(doc.id, text, normalize(doc.title), doc.source,
                             doc.sections if text == doc.text else []))
        if limit and len(kept) >= limit:
            break
    if counts["dropped_empty"] or counts["dropped_duplicates"]:
        log.info("dropped %d empty and %d duplicate documents", counts["dropped_empty"],
                 counts["dropped_duplicates"])
    return kept, counts


def chunk_documents(docs, tokenizer, max_tokens: int, language: str = "en", overlap_sentences: int = 0,
                    min_chunk_chars: int = 0, merged: list[int] | None = None) -> Iterator[Chunk]:
    """Chunks of every document; fragments under ``min_chunk_chars`` merged (their count appended to
    ``merged``, per document); each chunk names the heading path it starts in. A document with sections
    (Markdown) is chunked section by section, so that a heading starts a chunk instead of ending one."""
    for doc in docs:
        bounds = [offset for offset, _ in doc.sections if 0 < offset < len(doc.text)]
        spans = [(a + s, a + e) for a, b in zip([0, *bounds], [*bounds, len(doc.text)], strict=True)
                 for s, e in chunk_text(doc.text[a:b], tokenizer, max_tokens, language, overlap_sentences)]
        kept = merge_fragments(doc.text, spans, tokenizer, max_tokens, min_chunk_chars)
        if merged is not None:
            merged.append(len(spans) - len(kept))
        offsets = [offset for offset, _ in doc.sections]
        for i, (start, end) in enumerate(kept):
            at = bisect.bisect_right(offsets, start) - 1
            yield Chunk(_id=f"{doc.id}#{i}", doc_id=doc.id, title=doc.title, text=doc.text[start:end],
                        source=doc.source, start=start, end=end, section=doc.sections[at][1] if at >= 0 else "")
