"""Deploy stage: the release gate, the corpus reindexed into Milvus with what won (dense + BM25, behind an
alias), and the deployed search checked against eval.

:func:`run_deploy` (in :mod:`.stage`) is the front door; the gate itself is
:mod:`embedtune.retrieval.release` (the eval report states the same verdict), reindexing is :mod:`.index`.
Reading an index (its ``index.json``, the searcher that `/v1/search`, `embedtune search` and
`eval --index` share) is :mod:`embedtune.retrieval.deployment`; the store itself :mod:`embedtune.retrieval.milvus`.
"""

from embedtune.deploy.stage import DeployCheckError, run_deploy

__all__ = ["DeployCheckError", "run_deploy"]
