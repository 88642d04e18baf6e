"""The generator plug-in interface (the registry that names generators is :mod:`embedtune.sdg.registry`).

A generator turns chunks into candidate queries. Everything after that (filters, de-duplication,
round-trip consistency, writing ``sdg/queries.jsonl`` and the manifest) is shared by all generators, so a
plug-in only has to implement :meth:`Generator.generate` (and, if it can grade queries, :meth:`judge`)::

    from embedtune.sdg import Candidate, Generator, register_generator

    class Echo(Generator):
        kind = "echo"

        def generate(self, chunks, counts):
            return [Candidate(text=f"what is {c.title}", positive_ids=[c.id], doc_id=c.doc_id, source=c.id)
                    for c in chunks]

    register_generator("echo", Echo)      # then: sdg.generator=echo

A plug-in with settings declares a pydantic ``Settings`` model; the recipe's ``sdg.plugins.<name>`` section
is validated against it (unknown keys and bad values are errors naming the key) into ``self.settings``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, ValidationError

from embedtune.schemas import Chunk, QueryFields, QueryScores

if TYPE_CHECKING:
    from embedtune.config import Recipe
    from embedtune.sdg.cache import ResponseCache
    from embedtune.sdg.examples import Example


class SdgError(ValueError):
    """A problem the user must fix (unreachable endpoint, rejected key, missing model)."""


class Candidate(QueryFields):
    """A generated query before filtering (the filters fill in ``scores`` and ``roundtrip_rank``)."""

    source: str = ""  # the chunk (or bundle) it was generated from; quotas and logs use it

    model_config = ConfigDict(extra="forbid")  # a plug-in's misspelt field is an error, not a lost value


class Generator(ABC):
    """Base class of query generators.

    ``recipe`` is the whole recipe (a generator reads its own section, e.g. ``recipe.sdg.llm``); ``cache``
    stores raw model responses under ``sdg/cache/`` so that a rerun or an interrupted run never pays twice.
    """

    kind: str = ""
    #: True when the generator over-samples: the pipeline then keeps at most ``sdg.queries_per_chunk``
    #: filtered queries per source chunk.
    oversamples: bool = False
    #: True when its queries need the round-trip filter by default (the base model must find the source
    #: passage again): small local models invent and copy; an LLM with a judge does not need it.
    #: ``sdg.filters.roundtrip`` overrides it either way.
    needs_roundtrip: bool = False
    #: The plug-in's own settings, read from ``sdg.plugins.<kind>`` (None: it takes none).
    Settings: type[BaseModel] | None = None

    def __init__(self, recipe: Recipe, cache: ResponseCache, workdir: Path):
        self.recipe = recipe
        self.cache = cache
        self.workdir = workdir
        self.settings = self._settings(recipe)
        #: The user's example queries (``sdg.examples``), set by the stage before :meth:`generate`: a
        #: generator writes its queries in their style. Empty: none given.
        self.examples: Sequence[Example] = ()
        #: The examples the generator really showed its model (a prompt budget may fit fewer); the stage
        #: records them in ``sdg/examples.json``.
        self.examples_used: list[Example] = []
        #: How the generator computes and on which CPU (e.g. "int8 on (AMD EPYC: avx2 no-avx512f ...)"): the
        #: stage records it in the manifest, so a run says what made its queries.
        self.precision: str | None = None

    def _settings(self, recipe: Recipe) -> BaseModel | None:
        raw = recipe.sdg.plugins.get(self.kind)
        if self.Settings is None:
            if raw:
                raise SdgError(f"sdg.plugins.{self.kind}: this generator takes no settings")
            return None
        try:
            return self.Settings.model_validate(raw or {})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"]))
            raise SdgError(f"sdg.plugins.{self.kind}.{where}: {first['msg']}") from None

    @property
    def model_name(self) -> str:
        return ""

    @abstractmethod
    def generate(self, chunks: Sequence[Chunk], counts: Counter[str]) -> list[Candidate]:
        """Candidates for these chunks; add to ``counts`` (e.g. ``counts["unparseable"] += 1``)."""

    def judge(self, candidates: Sequence[Candidate], chunks: dict[str, Chunk],
              counts: Counter[str]) -> list[QueryScores | None] | None:
        """Scores (1-10) for each candidate, None where it could not be judged; None = no judge."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free models or connections."""
