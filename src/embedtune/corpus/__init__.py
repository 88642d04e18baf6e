"""Corpus stage: documents (txt, md, html, pdf, jsonl, BEIR) -> cleaned, de-duplicated, chunked passages.

:func:`run_corpus` (in :mod:`.stage`) is the front door; :mod:`.loaders` reads files, :mod:`.clean`
normalises text, :mod:`.chunking` cuts sentence-aware chunks bounded in the model's own tokens.
"""

from embedtune.corpus.loaders import Document, iter_documents
from embedtune.corpus.stage import chunk_documents, run_corpus
from embedtune.schemas import load_chunks

__all__ = ["Document", "chunk_documents", "iter_documents", "load_chunks", "run_corpus"]
