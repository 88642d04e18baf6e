"""The stage registry and the driver that runs stages in order.

Stages are referenced by import path and imported lazily, so ``embedtune --help`` stays fast and a stage's
heavy dependencies load only when it runs. Each runner has the signature
``run_<stage>(recipe: Recipe, run: RunDir, *, force: bool = False) -> Manifest``.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from embedtune.artifacts import Manifest, RunDir
from embedtune.config import Recipe

StageRunner = Callable[..., Manifest]


@dataclass(frozen=True)
class StageInfo:
    name: str
    target: str  # "module:function"
    summary: str

    def load(self) -> StageRunner:
        module, _, func = self.target.partition(":")
        return getattr(importlib.import_module(module), func)

    @property
    def available(self) -> bool:
        return importlib.util.find_spec(self.target.partition(":")[0]) is not None


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


def available_stages() -> list[StageInfo]:
    return [s for s in STAGES if s.available]


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
    force: bool = False,
    on_stage: Callable[[str], None] | None = None,
) -> list[StageResult]:
    """Run every stage up to and including ``to`` (default: the last available one)."""
    run = RunDir(run_dir)
    stages = available_stages()
    if to is not None:
        target = stage_info(to)
        if not target.available:
            raise ValueError(f"stage {to!r} is not available in this installation")
        stages = stages[: [s.name for s in stages].index(to) + 1]
    results = []
    for info in stages:
        if on_stage:
            on_stage(info.name)
        t0 = time.perf_counter()
        manifest = info.load()(recipe, run, force=force)
        results.append(StageResult(info.name, manifest, time.perf_counter() - t0))
    return results
