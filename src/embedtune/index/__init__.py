"""Index stage: the corpus reindexed into Milvus with the run's served model, dense + BM25, behind an alias.

- :func:`run_index` — the pipeline stage;
- :func:`open_searcher` — a :class:`~embedtune.retrieval.milvus.MilvusSearcher` over a run's index, for
  `embedtune search` and `embedtune eval --index` (the server builds its own with its loaded model).
"""

from embedtune.index.info import IndexInfo, read_info
from embedtune.index.searcher import open_searcher
from embedtune.index.stage import run_index

__all__ = ["IndexInfo", "open_searcher", "read_info", "run_index"]
