"""The retrieval toolkit below the stages: what sdg, prep, eval, export, index, serve and the platform share.

- :mod:`~embedtune.retrieval.beir` — strict BEIR loading;
- :mod:`~embedtune.retrieval.encoders` — texts to L2-normalised vectors: a local model (torch),
  an ONNX export (:mod:`~embedtune.retrieval.onnx`) or an OpenAI-compatible endpoint, one interface;
- :mod:`~embedtune.retrieval.cache` — the on-disk embedding cache;
- :mod:`~embedtune.retrieval.search` — exact (blocked torch) or faiss inner-product top-k;
- :mod:`~embedtune.retrieval.bm25` — the BM25 index; :mod:`~embedtune.retrieval.fusion` — dense + BM25;
- :mod:`~embedtune.retrieval.metrics` — pytrec_eval metrics of a run;
- :mod:`~embedtune.retrieval.ids`, :mod:`~embedtune.retrieval.metadata` — passage ids, ``embedtune.json``.

Import from the module that defines a name (``from embedtune.retrieval.beir import load_beir``): importing
the package itself loads nothing, so a light piece (ids, metadata) never pulls in torch.
"""
