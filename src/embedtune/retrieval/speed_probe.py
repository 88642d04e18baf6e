"""Is an export's int8 graph faster than its fp32 graph on this machine? Measured once per machine and export.

Where int8 wins depends on the CPU, and the flags alone do not say by how much. With int8 dot products
(AVX-512 VNNI, AVX-VNNI, AMX) onnxruntime runs all-MiniLM-L6-v2 2-3x faster in int8 than in fp32. On an
AVX2-only AMD EPYC (Zen 1, family 23, 128-bit AVX2 units) it ran at 1.0x: 31.2 vs 30.4 demo passages/s
(128 tokens), while the int8 vectors kept only min cosine 0.978 to fp32. Serving int8 there buys nothing
and costs quality (and int8 is not batch-invariant: one dynamic activation scale per batch).

So where the flags promise no int8 dot products, ``auto`` times both graphs here, on a batch of short queries
and a batch of passages (int8 row by row, as the server runs it), and serves int8 only when it is at least
:data:`MIN_SPEEDUP` faster. The figure is
cached under ``$EMBEDTUNE_CACHE/probes/``, keyed by the CPU, the thread count and both files (path, size,
modification time), so a server restart does not measure again; a new export or another machine does.
``EMBEDTUNE_INT8_PROBE=0`` turns the probe off (int8 is then served wherever it passed parity).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from embedtune.artifacts import ArtifactError, read_json, write_json
from embedtune.console import log
from embedtune.cpu import has_int8_dot_product, isa_summary

#: int8 must be this much faster than fp32 to be served by ``auto`` on a CPU without int8 dot products.
MIN_SPEEDUP = 1.2
#: (rows, tokens) of the timed batches: the server's two kinds of traffic, small enough for a 1B model.
SHAPES = ((16, 16), (4, 96))
ROUNDS = 3
PROBE_ENV = "EMBEDTUNE_INT8_PROBE"


@dataclass(frozen=True)
class SpeedProbe:
    """fp32 and int8 milliseconds for the probe batches (best of :data:`ROUNDS`) on this CPU."""

    fp32_ms: float
    int8_ms: float
    cpu: str
    threads: int

    @property
    def speedup(self) -> float:
        return self.fp32_ms / max(self.int8_ms, 1e-9)

    @property
    def int8_pays(self) -> bool:
        return self.speedup >= MIN_SPEEDUP

    def line(self) -> str:
        return (f"int8 {self.speedup:.2f}x fp32 here ({self.int8_ms:.0f} vs {self.fp32_ms:.0f} ms on the probe "
                f"batches, {self.threads} threads; {self.cpu})")


def probe_wanted() -> bool:
    """Only where the flags leave int8's gain in doubt, and unless the operator turned the probe off."""
    return os.environ.get(PROBE_ENV, "1") != "0" and not has_int8_dot_product()


def int8_speed(folder: Path, threads: int | None = None) -> SpeedProbe:
    """The cached probe of an export folder's int8 and fp32 graphs on this machine, measured now if there is
    none."""
    from embedtune.models.cache import cache_root
    from embedtune.retrieval.formats import model_file
    from embedtune.retrieval.metadata import read_metadata
    from embedtune.retrieval.onnx import default_threads

    threads = threads or default_threads()
    fp32_file, int8_file = model_file(folder, "fp32"), model_file(folder, "int8")
    dimension = int(read_metadata(folder).get("dimension") or 0)
    path = cache_root() / "probes" / f"int8-{_key(fp32_file, int8_file, threads)}.json"
    if path.is_file():
        try:
            return SpeedProbe(**read_json(path))
        except (ArtifactError, TypeError):
            log.warning("%s is unreadable; measuring again", path)
    log.info("timing %s against %s on this CPU (once per machine and export)", int8_file.name, fp32_file.name)
    probe = SpeedProbe(_best_ms(fp32_file, threads, dimension),
                       _best_ms(int8_file, threads, dimension, rows_alone=True), isa_summary(), threads)
    write_json(path, asdict(probe))
    return probe


def _key(fp32_file: Path, int8_file: Path, threads: int) -> str:
    parts = [isa_summary(), str(threads)]
    for f in (fp32_file, int8_file):
        stat = f.stat()
        parts += [str(f.resolve()), str(stat.st_size), str(stat.st_mtime_ns)]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def _best_ms(model_file: Path, threads: int, dimension: int, rows_alone: bool = False) -> float:
    """Best of :data:`ROUNDS` total milliseconds over :data:`SHAPES`, after one warm-up run of each.
    ``rows_alone``: each row is its own run, as the server runs int8 (its vectors then do not depend on the
    batch: serve/backends.py)."""
    import onnxruntime as ort

    from embedtune.retrieval.onnx import session_options

    session = ort.InferenceSession(str(model_file), sess_options=session_options(threads),
                                   providers=["CPUExecutionProvider"])
    runs = [feed for rows, tokens in SHAPES
            for feed in ([_feeds(session, 1, tokens, dimension)] * rows if rows_alone
                         else [_feeds(session, rows, tokens, dimension)])]
    for feed in runs:
        session.run(None, feed)
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for feed in runs:
            session.run(None, feed)
        best = min(best, time.perf_counter() - start)
    return best * 1000


def _feeds(session, rows: int, tokens: int, dimension: int) -> dict[str, np.ndarray]:
    """Token ids from a range every vocabulary has (the speed does not depend on which tokens)."""
    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {}
    for spec in session.get_inputs():
        if spec.name == "input_ids":
            out[spec.name] = rng.integers(100, 1000, size=(rows, tokens), dtype=np.int64)
        elif spec.name == "attention_mask":
            out[spec.name] = np.ones((rows, tokens), dtype=np.int64)
        elif spec.name == "token_type_ids":
            out[spec.name] = np.zeros((rows, tokens), dtype=np.int64)
        elif spec.name == "dimensions" and dimension:
            out[spec.name] = np.array([dimension], dtype=np.int64)
    return out
