"""The stage registry and the driver that runs stages in order.

Stages are referenced by import path and imported lazily, so ``embedtune --help`` stays fast and a stage's
heavy dependencies load only when it runs. Each runner has the signature
``run_<stage>(recipe: Recipe, run: RunDir, *, force: bool = False) -> Manifest``.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from embedtune.artifacts import Manifest, RunDir
from embedtune.config import Recipe
from embedtune.cpu_share import sharing_cores

StageRunner = Callable[..., Manifest]


@dataclass(frozen=True)
class StageInfo:
    name: str
    target: str  # "module:function"
    summary: str

    def load(self) -> StageRunner:
        module, _, func = self.target.partition(":")
        return getattr(importlib.import_module(module), func)


STAGES: tuple[StageInfo, ...] = (
    StageInfo("corpus", "embedtune.corpus.stage:run_corpus", "load, clean and chunk documents"),
    StageInfo("sdg", "embedtune.sdg.stage:run_sdg", "generate synthetic queries for the chunks"),
    StageInfo("prep", "embedtune.prep.stage:run_prep", "split by document, mine hard negatives"),
    StageInfo("finetune", "embedtune.train.stage:run_finetune", "contrastive fine-tuning"),
    StageInfo("eval", "embedtune.evaluate.stage:run_eval", "BEIR metrics, base vs fine-tuned"),
    StageInfo("export", "embedtune.export.stage:run_export", "ONNX export, int8, parity"),
    StageInfo("deploy", "embedtune.deploy.stage:run_deploy",
              "release gate, reindex the vector store (Milvus, dense + BM25), check it against eval"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def stage_info(name: str) -> StageInfo:
    for s in STAGES:
        if s.name == name:
            return s
    raise ValueError(f"unknown stage {name!r}; stages are: {', '.join(STAGE_NAMES)}")


@dataclass
class StageResult:
    name: str
    manifest: Manifest
    seconds: float


def run_pipeline(
    recipe: Recipe,
    run_dir: str | Path,
    *,
    to: str | None = None,
    stages: Sequence[str] | None = None,
    force: bool = False,
    on_stage: Callable[[str], None] | None = None,
    on_stage_done: Callable[[StageResult], None] | None = None,
) -> list[StageResult]:
    """Run the stages in order: ``stages`` by name, else every stage up to and including ``to`` (default:
    all). ``on_stage(name)`` is called before each, ``on_stage_done(result)`` after it (the CLI draws a rule,
    the platform worker records the job's progress); training steps reach listeners of
    :mod:`embedtune.events`."""
    run = RunDir(run_dir)
    results = []
    with sharing_cores() as cores:  # other jobs on this machine get their share of the cores too
        for info in _selected(to, stages):
            if on_stage:
                on_stage(info.name)
            cores.apply()
            results.append(_run_stage(info, recipe, run, force))
            if on_stage_done:
                on_stage_done(results[-1])
    return results


def _run_stage(info: StageInfo, recipe: Recipe, run: RunDir, force: bool) -> StageResult:
    t0 = time.perf_counter()
    manifest = info.load()(recipe, run, force=force)
    return StageResult(info.name, manifest, time.perf_counter() - t0)


def _selected(to: str | None, stages: Sequence[str] | None) -> list[StageInfo]:
    if stages is not None:
        return [stage_info(n) for n in stages]
    last = STAGE_NAMES.index(stage_info(to).name) if to is not None else len(STAGE_NAMES) - 1
    return list(STAGES[: last + 1])
