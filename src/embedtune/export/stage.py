"""The export stage: export the fine-tuned model (or the base model), then prove parity.

Writes ``export/{model.onnx, model.int8.onnx, tokenizer/, embedtune.json, parity.json}``. An fp32 graph out
of tolerance raises :class:`ParityError` and writes no manifest (``parity.json`` stays for inspection),
unless ``export.allow_parity_failure`` is set. An int8 graph that fails its gate only warns: it is never
served by ``auto`` precision, so what is deployed is the fp32 graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from embedtune.artifacts import Manifest, RunDir, write_json
from embedtune.config import ModelConfig, Recipe
from embedtune.console import log
from embedtune.convert import parity
from embedtune.convert.formats import FORMATS, is_built
from embedtune.convert.onnx_export import ExportResult, export_onnx
from embedtune.retrieval.cache import EmbeddingCache, stage_cache
from embedtune.retrieval.formats import model_file
from embedtune.retrieval.metadata import METADATA_FILE
from embedtune.retrieval.onnx import OnnxEncoder

STAGE = "export"
PROBE_SAMPLES_FROM_EVAL = 16  # real queries and passages added to the built-in probe set


class ParityError(ValueError):
    """The exported model does not reproduce the PyTorch model within the recipe's tolerances."""


def run_export(recipe: Recipe, run: RunDir, *, force: bool = False) -> Manifest:
    cfg = recipe.export
    model_cfg, source = _model_to_export(recipe, run)
    eval_dir = _eval_set(recipe, run)
    inputs = [p for p in (_local_path(model_cfg.name), eval_dir) if p is not None]
    config = {"export": cfg.model_dump(mode="json"), "model": model_cfg.model_dump(mode="json"), "source": source,
              "k_values": recipe.eval.k_values}
    st = run.stage(STAGE, config, inputs=inputs)
    if (done := st.up_to_date(force)) is not None:
        return done

    result, report = export_and_check(recipe, model_cfg, st.dir, source, eval_dir, _matryoshka_dims(recipe, run),
                                      cache=stage_cache(recipe.eval.cache_dir, run.root))
    outputs = [model_file(st.dir, "fp32"), st.dir / "tokenizer", st.dir / METADATA_FILE, st.dir / "parity.json"]
    outputs += [model_file(st.dir, name) for name, record in result.formats.items() if is_built(record)]
    return st.finish(outputs=outputs, counts=_counts(result, report), metrics=_metrics(result, report))


def export_and_check(recipe: Recipe, model_cfg: ModelConfig, out_dir: Path, source: str,
                     eval_dir: Path | None = None, matryoshka_dims: list[int] | None = None,
                     cache: EmbeddingCache | None = None) -> tuple[ExportResult, dict[str, Any]]:
    """Export ``model_cfg`` into ``out_dir`` with the recipe's export settings, write parity.json, and
    raise :class:`ParityError` when parity fails (unless allowed). ``cache``: the eval stage's embeddings,
    whose vectors of the same model on the same eval set stand in for the fp32 graph's."""
    from embedtune.models import load_model

    cfg = recipe.export
    model = load_model(model_cfg, device="cpu")
    result = export_onnx(model, out_dir, cfg, matryoshka_dims=matryoshka_dims, source=source)
    reference = _cached_vectors(model, source, cache) if cache is not None else None
    report = check_parity(model, result, recipe, eval_dir, reference)
    write_json(out_dir / "parity.json", report)
    raise_unless_passed(report, cfg.allow_parity_failure, out_dir / "parity.json")
    return result, report


def check_parity(model: Any, result: ExportResult, recipe: Recipe, eval_dir: Path | None,
                 reference: parity.Reference | None = None) -> dict[str, Any]:
    """fp32 vs PyTorch on the probe set (always); each derived format that parity covers (int8) vs fp32, by
    cosine on the probe set and by retrieval metrics on the eval set (when there is one)."""
    cfg = recipe.export
    probe = parity.build_probe(*_eval_samples(eval_dir))
    fp32 = OnnxEncoder(result.folder, "fp32")
    dims = sorted({result.metadata["dimension"], *(result.metadata["matryoshka_dims"] or [])}, reverse=True)
    if len(dims) == 1 and dims[0] > 1:
        dims.append(dims[0] // 2)  # always prove the in-graph truncation, even without Matryoshka sizes
    report: dict[str, Any] = {"fp32_vs_torch": parity.onnx_vs_torch(model, fp32, probe, cfg.parity_min_cosine, dims)}
    for name, record in result.formats.items():
        if FORMATS[name].parity_vs_fp32 and is_built(record):
            report[f"{name}_vs_fp32"] = _vs_fp32(fp32, OnnxEncoder(result.folder, name), probe, recipe, eval_dir,
                                                 reference if report["fp32_vs_torch"]["passed"] else None)
    report["passed"] = report["fp32_vs_torch"]["passed"] and all(
        (r.get("retrieval") or {"passed": True})["passed"] for r in _derived(report).values())
    return report


def _vs_fp32(fp32: OnnxEncoder, derived: OnnxEncoder, probe: parity.Probe, recipe: Recipe,
             eval_dir: Path | None, reference: parity.Reference | None = None) -> dict[str, Any]:
    cfg = recipe.export
    out: dict[str, Any] = {"cosine": parity.cosines_vs_fp32(fp32, derived, probe)}
    if eval_dir is not None:
        out["retrieval"] = parity.retrieval_vs_fp32(fp32, derived, eval_dir, recipe.eval.k_values,
                                                    cfg.tolerance_low_k, cfg.tolerance_high_k, recipe.eval.batch_size,
                                                    reference)
    else:
        out["retrieval"] = None
        out["note"] = "no eval set (prep/eval): only cosine checks were run"
        log.warning("no eval set found: %s checked by cosine only (recorded in parity.json)", derived.precision)
    return out


def _derived(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``<format>_vs_fp32`` sections of a parity report."""
    return {k: v for k, v in report.items() if k.endswith("_vs_fp32")}


def raise_unless_passed(report: dict[str, Any], allowed: bool, path: Path) -> None:
    if report["passed"]:
        log.info("parity passed (fp32 min cosine %.6f)", report["fp32_vs_torch"]["min_cosine"])
        return
    f = report["fp32_vs_torch"]
    derived = [p for section in _derived(report).values() for p in (section.get("retrieval") or {}).get("failures", [])]
    if f["passed"]:
        # Only a derived graph (int8) lost quality: it is kept on disk for inspection and never served by
        # `auto` (serve, the index and the platform fall back to fp32), so the run goes on.
        log.warning("export parity: int8 failed, so the fp32 graph is what gets deployed (details in %s):\n  %s",
                    path, "\n  ".join(derived))
        return
    problems = [f"fp32 ONNX vs PyTorch: min cosine {f['min_cosine']} < {f['threshold']}", *derived]
    message = f"export parity failed (details in {path}):\n  " + "\n  ".join(problems)
    if not allowed:
        raise ParityError(message + "\n  set export.allow_parity_failure=true to keep the export anyway")
    log.warning(message + "\n  kept because export.allow_parity_failure is set")


def _cached_vectors(model: Any, source: str, cache: EmbeddingCache) -> parity.Reference:
    """The eval stage's vectors of this model for given queries and passages, if it cached exactly those (same
    weights by content hash, prompts, max length and texts in order); else None. Never encodes: on a miss the
    fp32 graph does, faster than PyTorch."""
    from embedtune.retrieval.encoders import LocalEncoder, model_fingerprint

    if not Path(source).is_dir():
        return lambda queries, passages: None
    encoder = LocalEncoder(model, model_fingerprint(source))

    def lookup(queries: list[str], passages: list[str]):
        q = cache.lookup(encoder, queries, "query")
        d = cache.lookup(encoder, passages, "passage") if q is not None else None
        if d is None:
            return None
        log.info("parity: the fp32 side's %d query and %d passage vectors are the eval stage's (cached)",
                 len(queries), len(passages))
        return q, d

    return lookup


def _model_to_export(recipe: Recipe, run: RunDir) -> tuple[Any, str]:
    """The fine-tuned model when finetune completed, else the recipe's base model (same prompt overrides)."""
    if run.manifest("finetune") is not None:
        folder = run.require("finetune", "model")
        return recipe.model.model_copy(update={"name": str(folder)}), str(folder)
    return recipe.model, recipe.model.name


def _local_path(name: str) -> Path | None:
    from embedtune.models import resolve

    spec = resolve(name)
    return Path(spec.path) if spec.is_local else None


def _eval_set(recipe: Recipe, run: RunDir) -> Path | None:
    prep_eval = run.path("prep", "eval")
    if run.manifest("prep") is not None and (prep_eval / "corpus.jsonl").is_file():
        return prep_eval
    if recipe.eval.dataset:
        return Path(recipe.eval.dataset)
    return None


def _eval_samples(eval_dir: Path | None) -> tuple[list[str], list[str]]:
    if eval_dir is None:
        return [], []
    from embedtune.retrieval.beir import load_beir

    data = load_beir(eval_dir)
    queries = list(data.queries.values())[:PROBE_SAMPLES_FROM_EVAL]
    passages = data.passages(list(data.corpus)[:PROBE_SAMPLES_FROM_EVAL])
    return queries, passages


def _matryoshka_dims(recipe: Recipe, run: RunDir) -> list[int] | None:
    """Sizes the fine-tune trained for: the recipe's list, or what the finetune manifest recorded for "auto"."""
    ft = run.manifest("finetune")
    if ft is None:
        return None
    dims = recipe.finetune.matryoshka_dims
    if isinstance(dims, list):
        return dims
    for section in (ft.metrics, ft.counts, ft.config):
        found = section.get("matryoshka_dims")
        if isinstance(found, list) and all(isinstance(d, int) for d in found):
            return found
    return None


def _counts(result: ExportResult, report: dict[str, Any]) -> dict[str, Any]:
    return {"dimension": result.metadata["dimension"], "inputs": len(result.metadata["inputs"]),
            "parity": _parity_word(report)}


def _parity_word(report: dict[str, Any]) -> str:
    if report["passed"]:
        return "passed"
    return "FAILED (allowed)" if not report["fp32_vs_torch"]["passed"] else "int8 failed: fp32 is deployed"


def _metrics(result: ExportResult, report: dict[str, Any]) -> dict[str, Any]:
    metrics: dict[str, Any] = {"fp32_min_cosine": report["fp32_vs_torch"]["min_cosine"], "int8": result.int8,
                               "gpu_precisions": result.gpu}
    for key, section in _derived(report).items():
        name = key.removesuffix("_vs_fp32")
        metrics[f"{name}_min_cosine"] = min(v["min"] for v in section["cosine"].values())
        if section.get("retrieval"):
            metrics[f"{name}_delta"] = section["retrieval"]["delta"]
    return metrics
