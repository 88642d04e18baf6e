"""The deployed collection from LangChain: `langchain_milvus.Milvus` with Milvus's built-in BM25 function runs
dense, BM25 and hybrid searches on it, with the call the README gives.

LangChain's own defaults do not work on a BM25 field: for a ``SPARSE_INVERTED_INDEX`` it sends the search
parameter ``drop_ratio_build: 0.2``, which Milvus rejects for the BM25 metric ("only drop_ratio_build=0 is
supported"), and its default hybrid ranker sends the wrong number of weights to Milvus Lite. The collection
cannot change that: BM25 on Milvus needs exactly that index type. Passing ``search_params`` and naming a
ranker is the documented way round; the first test pins the failure, so the README's workaround is dropped
when a LangChain release no longer needs it.
"""

from __future__ import annotations

import warnings

import pytest
from langchain_core.embeddings import Embeddings

from embedtune.artifacts import RunDir
from embedtune.corpus import run_corpus
from embedtune.deploy import run_deploy
from embedtune.retrieval.deployment import index_dir, read_info
from embedtune.retrieval.encoders import ServedModel
from test_index import RARE, _docs, _recipe

#: What the README tells a LangChain user to pass: one entry per vector field, in ``vector_field`` order.
SEARCH_PARAMS = [{"metric_type": "IP", "params": {}}, {"metric_type": "BM25", "params": {}}]


class DeployedModel(Embeddings):
    """LangChain embeddings by the model that filled the index (a user would point OpenAIEmbeddings at
    `embedtune serve`; in-process here, the same vectors)."""

    def __init__(self, run_root, recipe):
        info = read_info(run_root)
        served = ServedModel(info.model_kind, info.model_path, info.model_precision, info.model_label)
        self.encoder = served.load(recipe.model, 8)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.encoder.encode(texts, "passage").tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.encoder.encode([text], "query")[0].tolist()


@pytest.fixture
def deployed(tmp_path, tiny_bert_dir):
    recipe = _recipe(tmp_path, tiny_bert_dir)
    run = RunDir(tmp_path / "run")
    run_corpus(recipe, run)
    run_deploy(recipe, run)
    return recipe, run


def _store(recipe, run, **kw):
    from langchain_milvus import BM25BuiltInFunction, Milvus

    info = read_info(run.root)
    return Milvus(embedding_function=DeployedModel(run.root, recipe), builtin_function=BM25BuiltInFunction(),
                  connection_args={"uri": info.resolved_uri(index_dir(run.root))}, collection_name=info.alias,
                  primary_field="id", text_field="text", vector_field=["dense", "sparse"], auto_id=False, **kw)


def test_langchain_defaults_fail_on_the_bm25_field(deployed):
    """Pins LangChain's bug that the README works around: when this fails, drop the workaround."""
    from pymilvus.exceptions import MilvusException

    with pytest.raises(MilvusException, match="drop_ratio_build"):
        _store(*deployed).similarity_search("which protocol", k=3, ranker_type="rrf")


@pytest.mark.parametrize(("ranker", "place"), [
    ({"ranker_type": "rrf"}, "listed"),  # rank fusion: one list's top hit ties the other's, so listed only
    ({"ranker_type": "weighted", "ranker_params": {"weights": [0.3, 0.7]}}, "first"),
])
def test_langchain_hybrid_search_with_the_readme_call_finds_a_bm25_only_match(deployed, ranker, place):
    from langchain_milvus import Milvus

    recipe, run = deployed
    query, rare_doc = f"which protocol is called {RARE}", _docs()[5]["_id"]
    info = read_info(run.root)
    dense_only = Milvus(embedding_function=DeployedModel(run.root, recipe), collection_name=info.alias,
                        connection_args={"uri": info.resolved_uri(index_dir(run.root))}, primary_field="id",
                        text_field="text", vector_field="dense", auto_id=False)
    # The random tiny model cannot know the token: only the BM25 half of the hybrid can bring the chunk up.
    assert rare_doc not in [d.metadata["doc_id"] for d in dense_only.similarity_search(query, k=3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ranker_type: still LangChain's documented call
        hits = _store(recipe, run, search_params=SEARCH_PARAMS).similarity_search(query, k=3, **ranker)
    found = [d.metadata["doc_id"] for d in hits]
    assert rare_doc == found[0] if place == "first" else rare_doc in found, found
    assert RARE in hits[found.index(rare_doc)].page_content
    assert {"id", "doc_id", "title", "source"} <= set(hits[0].metadata)
