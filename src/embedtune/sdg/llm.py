"""The `llm` generator: any OpenAI-compatible chat-completions endpoint (NIM, vLLM, Ollama, llama.cpp
server, OpenAI) through the official ``openai`` client.

Per unit (one chunk, or a bundle of neighbouring chunks of one document for multi-hop questions):
extract artifacts -> generate typed question-answer pairs citing their segments. The shared pipeline then
filters and de-duplicates, and calls :meth:`LLMGenerator.judge` for the 1-10 scores.

Transport errors (429, 5xx, timeouts, dropped connections) are retried by the client with exponential
backoff (``max_retries``); an unparseable answer is asked again (``parse_retries``) and then counted as
rejected. Every raw response is cached by request hash before it is parsed, so a rerun never pays twice.
A rejected key or an unreachable endpoint stops the stage with a clear error; what was answered so far
stays in the cache and the next run resumes from there.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from embedtune.console import log, progress
from embedtune.schemas import Chunk, QueryScores
from embedtune.sdg import prompts
from embedtune.sdg.base import Candidate, Generator, SdgError
from embedtune.sdg.cache import request_key
from embedtune.sdg.parsing import as_list, extract_json

T = TypeVar("T")
SCORE_KEYS = ("relevance", "accuracy", "context_support", "clarity", "overall")
ARTIFACT_KEYS = ("key_concepts", "relationships", "entities", "processes", "technical_terms")


class LLMGenerator(Generator):
    kind = "llm"

    def __init__(self, recipe, cache, workdir):
        super().__init__(recipe, cache, workdir)
        self.cfg = recipe.sdg.llm
        self.sdg = recipe.sdg
        self._json_mode = self.cfg.structured_output
        key = os.environ.get(self.cfg.api_key_env)
        if not key:
            # Local servers (vLLM, Ollama, llama.cpp) accept any key; the client insists on one.
            log.info("environment variable %s is not set; sending a placeholder API key",
                     self.cfg.api_key_env)
        self._api_key = key or "not-set"

    @property
    def model_name(self) -> str:
        return self.cfg.model

    # ----------------------------------------------------------------------------------- generation

    def generate(self, chunks: Sequence[Chunk], counts: Counter[str]) -> list[Candidate]:
        self.examples_used = list(self.examples)  # all of them: a style list costs a few tokens each
        units = build_units(chunks, self.sdg)
        counts["units"] += len(units)
        results = _run_sync(lambda: self._map(units, lambda client, sem, unit: self._unit(client, sem, unit,
                                                                                            counts),
                                               "generating questions"))
        return [cand for batch in results for cand in batch]

    async def _unit(self, client, sem, unit: Unit, counts: Counter[str]) -> list[Candidate]:
        segments = prompts.render_segments(unit.chunks)
        artifacts = await self._ask_json(client, sem, prompts.ARTIFACTS.format(segments=segments),
                                         "artifacts", counts, lambda v: isinstance(v, dict))
        if artifacts is None:
            counts["artifacts_failed"] += 1
            artifacts = {}
        art_text = "\n".join(f"- {k}: {', '.join(map(str, artifacts.get(k) or []))}" for k in ARTIFACT_KEYS
                             if artifacts.get(k))
        n = sum(unit.mix.values())
        question_prompt = prompts.QUESTIONS.format(
            n=n, segments=segments, artifacts=art_text or "(none)", mix=prompts.render_mix(unit.mix),
            reasoning=", ".join(self.sdg.reasoning_types), min_complexity=self.sdg.min_complexity,
            max_complexity=self.sdg.max_complexity, min_hops=unit.min_hops, max_hops=unit.max_hops,
            style=prompts.render_style(self.examples))
        pairs = await self._ask_json(client, sem, question_prompt, "questions", counts,
                                     lambda v: as_list(v, "pairs") is not None)
        if pairs is None:
            counts["rejected_unparseable"] += 1
            return []
        labels = prompts.segment_ids(unit.chunks)
        out = [c for p in as_list(pairs, "pairs") or [] if (c := self._candidate(p, unit, labels, counts))]
        if not out:
            counts["units_without_queries"] += 1
        return out

    def _candidate(self, pair: Any, unit: Unit, labels: dict[str, str],
                   counts: Counter[str]) -> Candidate | None:
        if not isinstance(pair, dict) or not isinstance(pair.get("question"), str):
            counts["rejected_malformed_pair"] += 1
            return None
        cited = pair.get("segment_ids") or []
        cited = [cited] if isinstance(cited, str) else cited
        positives = [labels[s.strip("[] ")] for s in map(str, cited) if s.strip("[] ") in labels]
        if not positives:
            if len(unit.chunks) > 1:
                counts["rejected_no_support"] += 1
                return None
            positives = [unit.chunks[0].id]  # one segment: it is the support whatever the model wrote
        positives = list(dict.fromkeys(positives))
        return Candidate(
            text=pair["question"].strip(),
            answer=str(pair.get("answer") or "").strip(),
            positive_ids=positives,
            doc_id=unit.chunks[0].doc_id,
            source=unit.chunks[0].id,
            query_type=str(pair.get("query_type") or "").strip().lower(),
            reasoning_type=str(pair.get("reasoning_type") or "").strip().lower(),
            complexity=_clip_int(pair.get("complexity"), self.sdg.min_complexity, self.sdg.max_complexity),
            hops=min(max(len(positives), self.sdg.min_hops), self.sdg.max_hops),
        )

    # ------------------------------------------------------------------------------------- judging

    def judge(self, candidates: Sequence[Candidate], chunks: dict[str, Chunk],
              counts: Counter[str]) -> list[QueryScores | None]:
        async def one(client, sem, cand: Candidate) -> QueryScores | None:
            support = [chunks[i] for i in cand.positive_ids if i in chunks]
            text = prompts.JUDGE.format(segments=prompts.render_segments(support), question=cand.text,
                                        answer=cand.answer or "(none)")
            value = await self._ask_json(client, sem, text, "judge", counts, _valid_scores,
                                         model=self.cfg.judge_model or self.cfg.model)
            return None if value is None else _scores(value)

        return _run_sync(lambda: self._map(list(candidates), one, "judging"))

    # ------------------------------------------------------------------------------------ transport

    async def _map(self, items: list[T], func: Callable[..., Awaitable[Any]], description: str) -> list[Any]:
        """Run ``func(client, semaphore, item)`` for all items, at most ``concurrency`` requests at once.
        The first fatal error cancels the rest (their answers so far are already cached)."""
        from openai import AsyncOpenAI

        sem = asyncio.Semaphore(self.cfg.concurrency)
        results: list[Any] = [None] * len(items)
        client = AsyncOpenAI(base_url=self.cfg.base_url, api_key=self._api_key, timeout=self.cfg.timeout,
                             max_retries=self.cfg.max_retries)
        async with client:
            with progress() as bar:
                task = bar.add_task(description, total=len(items), rate="")

                async def run(i: int, item: T) -> None:
                    results[i] = await func(client, sem, item)
                    bar.advance(task)

                try:
                    async with asyncio.TaskGroup() as group:
                        for i, item in enumerate(items):
                            group.create_task(run(i, item))
                except ExceptionGroup as eg:
                    fatal = [e for e in eg.exceptions if isinstance(e, SdgError)]
                    raise (fatal[0] if fatal else eg.exceptions[0]) from None
        return results

    async def _ask_json(self, client, sem, user: str, kind: str, counts: Counter[str],
                        valid: Callable[[Any], bool], model: str | None = None) -> Any | None:
        """Ask until the answer holds valid JSON (``1 + parse_retries`` attempts); None if it never does."""
        messages = [{"role": "system", "content": prompts.SYSTEM}, {"role": "user", "content": user}]
        for attempt in range(1 + self.cfg.parse_retries):
            text = await self._complete(client, sem, messages, model or self.cfg.model, attempt, kind, counts)
            if text is None:
                return None
            value = extract_json(text)
            if value is not None and valid(value):
                return value
            counts[f"unparseable_{kind}_responses"] += 1
        return None

    async def _complete(self, client, sem, messages: list[dict[str, str]], model: str, attempt: int,
                        kind: str, counts: Counter[str]) -> str | None:
        params = {"temperature": self.cfg.temperature, "top_p": self.cfg.top_p,
                  "max_tokens": self.cfg.max_tokens}
        key = request_key("chat", model, messages, params, self._json_mode, attempt)
        if (hit := self.cache.get(key)) is not None:
            return hit
        import openai

        async with sem:
            try:
                resp = await self._create(client, model, messages, params)
            except openai.BadRequestError as exc:
                # A request this server cannot take (e.g. too long): skip it, keep going.
                counts[f"failed_{kind}_requests"] += 1
                log.warning("%s request rejected by the endpoint (skipped): %s", kind, _brief(exc))
                return None
            except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
                raise SdgError(f"{self.cfg.base_url} rejected the API key from ${self.cfg.api_key_env} "
                               f"({exc.status_code}); set that variable and rerun (cached answers are kept "
                               f"in {self.cache.path})") from None
            except openai.NotFoundError as exc:
                raise SdgError(f"{self.cfg.base_url}: model {model!r} or the chat-completions route was not "
                               f"found (404: {_brief(exc)}); check sdg.llm.base_url and sdg.llm.model"
                               ) from None
            except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError,
                    openai.APIStatusError) as exc:
                raise SdgError(f"{self.cfg.base_url} failed after {self.cfg.max_retries} retries "
                               f"({type(exc).__name__}: {_brief(exc)}). Answers so far are cached in "
                               f"{self.cache.path}; rerun to resume.") from None
        text = (resp.choices[0].message.content or "") if resp.choices else ""
        counts["requests"] += 1
        self.cache.put(key, text, kind)
        return text

    async def _create(self, client, model: str, messages, params: dict[str, Any]):
        import openai

        if self._json_mode:
            try:
                return await client.chat.completions.create(model=model, messages=messages,
                                                            response_format={"type": "json_object"}, **params)
            except openai.BadRequestError as exc:
                if "response_format" not in str(exc) and "json" not in str(exc).lower():
                    raise
                log.warning("endpoint does not support response_format=json_object; parsing plain text")
                self._json_mode = False
        return await client.chat.completions.create(model=model, messages=messages, **params)


# ------------------------------------------------------------------------------------------ units


class Unit:
    """Chunks shown together to the model, and how many questions of each type to ask for."""

    def __init__(self, chunks: list[Chunk], mix: dict[str, int], min_hops: int, max_hops: int):
        self.chunks, self.mix, self.min_hops, self.max_hops = chunks, mix, min_hops, max_hops


def build_units(chunks: Sequence[Chunk], sdg) -> list[Unit]:
    """One unit per chunk for single-hop types, plus bundles of up to ``max_hops`` neighbouring chunks of
    the same document for the multi-hop share; per chunk about ``queries_per_chunk`` questions in all."""
    weights = {k: v for k, v in sdg.query_mix.items() if v > 0}
    multi = weights.get("multi_hop", 0.0) / (sum(weights.values()) or 1.0)
    single_weights = {k: v for k, v in weights.items() if k != "multi_hop"} or {"contextual": 1.0}
    by_doc: dict[str, list[Chunk]] = {}
    for c in chunks:
        by_doc.setdefault(c.doc_id, []).append(c)
    units = []
    for doc_chunks in by_doc.values():
        doc_chunks.sort(key=lambda c: c.start)
        bundles = _bundles(doc_chunks, sdg.max_hops) if multi > 0 and sdg.max_hops >= 2 else []
        n_single = max(1, round(sdg.queries_per_chunk * (1 - multi))) if bundles else sdg.queries_per_chunk
        for c in doc_chunks:
            units.append(Unit([c], allocate(n_single, single_weights), 1, 1))
        for b in bundles:
            n_multi = max(1, round(sdg.queries_per_chunk * len(b) * multi))
            units.append(Unit(b, {"multi_hop": n_multi}, max(2, sdg.min_hops), min(len(b), sdg.max_hops)))
    return units


def _bundles(doc_chunks: list[Chunk], size: int) -> list[list[Chunk]]:
    groups = [doc_chunks[i:i + size] for i in range(0, len(doc_chunks), size)]
    return [g for g in groups if len(g) >= 2]


def allocate(n: int, weights: dict[str, float]) -> dict[str, int]:
    """Split ``n`` questions by ``weights`` (largest remainder, so the counts sum to ``n``)."""
    total = sum(weights.values())
    exact = {k: n * w / total for k, w in weights.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


# ------------------------------------------------------------------------------------------ helpers


def _valid_scores(value: Any) -> bool:
    """An overall score, or at least three of the four criteria (overall is then their mean)."""
    if not isinstance(value, dict):
        return False
    if _number(value.get("overall")) is not None:
        return True
    return sum(_number(value.get(k)) is not None for k in SCORE_KEYS[:-1]) >= 3


def _scores(value: dict[str, Any]) -> QueryScores:
    nums = {k: _number(value.get(k)) for k in SCORE_KEYS}
    nums = {k: None if v is None else min(max(v, 1.0), 10.0) for k, v in nums.items()}
    if nums["overall"] is None:
        parts = [v for k, v in nums.items() if v is not None and k != "overall"]
        nums["overall"] = round(sum(parts) / len(parts), 2)
    return QueryScores(**nums)


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _clip_int(value: Any, lo: int, hi: int) -> int | None:
    num = _number(value)
    return None if num is None else int(min(max(round(num), lo), hi))


def _brief(exc: Exception) -> str:
    return str(exc).splitlines()[0][:300]


def _run_sync(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine from synchronous code, also when the caller already runs an event loop (e.g. a
    server's job runner): then in a worker thread with its own loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(factory())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
