"""Index stage: the corpus reindexed into Milvus with the run's served model, dense + BM25, behind an alias.

:func:`run_index` (in :mod:`.stage`) is the front door. Reading an index (its ``index.json``, the searcher
that `/v1/search`, `embedtune search` and `eval --index` share) is :mod:`embedtune.retrieval.deployment`,
below the stages; the store itself is :mod:`embedtune.retrieval.milvus`.
"""

from embedtune.index.stage import run_index

__all__ = ["run_index"]
