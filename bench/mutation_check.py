"""Mutation check: break the code on purpose, the way a real regression would, and see the tests notice.

Each mutation below is one realistic bug in a module that matters (trainer resume, export gate, hybrid fill and
fusion, the job scheduler, platform auth and sandbox, prep mining and split). For each, a scratch copy of the
repository gets the mutation and the tests named for that behaviour run against it: a failing run *kills* the
mutant, a passing run lets it *survive* (the tests do not guard that behaviour). Every test selection first runs
on the unmutated copy and must pass, so a kill is the mutation's doing, not a test that fails anyway.

Not part of CI (a few minutes to tens of minutes: each mutant is a fresh pytest process). Run from the
repository root, niced on a shared machine:

    nice -n 19 env OMP_NUM_THREADS=1 python bench/mutation_check.py            # all
    python bench/mutation_check.py --list                                       # names only
    python bench/mutation_check.py --only scheduler-skip-locked --only fill     # a few (substring match)

The tests run with ``CI=true``: a test that would skip (no PostgreSQL, say) fails the baseline instead of letting a
mutant survive unseen. Exit status 1 when a mutant survives, a mutation no longer applies (its text is gone: update
this file with the code), or a baseline fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("src", "tests", "pyproject.toml", "recipes")


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # under src/embedtune/
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments selecting the tests named for this behaviour
    what: str


# Test selections, shared by the mutants of one module so that each needs one baseline run.
EXPORT = ("tests/test_export_stage.py", "tests/test_int8_gate.py", "-k", "damaged or retrieval_gate or int8")
HYBRID = ("tests/test_hybrid_fill.py", "tests/test_index.py", "-k", "fill or zscore")
FUSION = ("tests/test_prep.py", "tests/test_index.py", "-k", "fuse or hybrid_teacher or zscore")
SCHEDULER = ("tests/test_platform_pg.py", "-k", "claim or old_read or old_attempt or stale or max_attempts")
PREP = ("tests/test_prep.py", "-k", "split or leak or test_document or margin or masked or switch or mine")

M = Mutation
# Cheapest test selections first: a --budget cut then leaves the costly trainings and exports for last.
MUTATIONS = [
    M("hybrid-no-dense-fill", "retrieval/milvus.py",
      "        self._fill_dense(vectors, dense_scores, lexical_scores, s.candidates)\n", "",
      HYBRID,
      "BM25-only hits are not given their exact dense score"),
    M("hybrid-bm25-stats-hits-only", "retrieval/milvus.py",
      "n = max(n_docs, len(scores))", "n = len(scores)",
      HYBRID,
      "BM25's corpus mean and spread from the hits alone (the zeros of the other chunks forgotten)"),
    M("fusion-weights-swapped", "retrieval/fusion.py",
      "mixed = (1 - bm25_weight) * dense + bm25_weight * (mean + std * z)",
      "mixed = bm25_weight * dense + (1 - bm25_weight) * (mean + std * z)",
      FUSION,
      "the BM25 weight applied to the dense side"),
    M("fusion-constant-bm25-row", "retrieval/fusion.py",
      "return torch.where(informative, mixed, dense)", "return mixed",
      FUSION,
      "a query sharing no term with any candidate is mixed with a meaningless BM25 row"),
    M("prep-split-mixed-to-train", "prep/split.py",
      "if True in sides:", "if all(sides):",
      PREP,
      "a query with positives on both sides of the split trains on a held-out document"),
    M("prep-margin-inclusive", "prep/mining.py",
      "masked.masked_fill_(masked >= thresholds(", "masked.masked_fill_(masked > thresholds(",
      PREP,
      "a candidate scoring exactly the margin threshold is mined as a negative"),
    M("prep-excluded-not-masked", "prep/mining.py",
      "    if excluded is not None:\n        _mask(masked, excluded)\n", "",
      PREP,
      "candidates excluded for a query (held-out, same document) can be mined as its negatives"),
    M("auth-revoked-key-accepted", "platform/auth.py",
      "if not ok or row is None or row.revoked_at is not None:", "if not ok or row is None:",
      ("tests/test_platform_auth.py",), "a revoked API key still authenticates"),
    M("auth-any-workspace", "platform/auth.py",
      "return self.admin or workspace in self.workspaces", "return True",
      ("tests/test_platform_auth.py",), "a workspace key may use every workspace"),
    M("sandbox-path-roots-ignored", "platform/sandbox.py",
      "if path is None or not any(is_under(path, root) for root in settings.path_roots) or not path.exists():",
      "if path is None or not path.exists():",
      ("tests/test_platform_sandbox.py",), "a server path outside the registration roots can be registered"),
    M("sandbox-llm-url-not-checked", "platform/sandbox.py",
      'if (url_given or generator == "llm") and normalise_url(str(llm.get("base_url", ""))) not in allowed_urls:',
      "if False:",
      ("tests/test_platform_sandbox.py",), "a job may send SDG prompts to any LLM endpoint"),
    M("scheduler-skip-locked", "platform/scheduler.py",
      "pending.with_for_update(skip_locked=True)", "pending",
      SCHEDULER, "PostgreSQL replicas select without FOR UPDATE SKIP LOCKED"),
    M("scheduler-lease-ignores-attempt", "platform/scheduler.py",
      "db.Job.status == status, db.Job.attempts == job.attempts,", "db.Job.status == status,",
      SCHEDULER, "an orphan decision taken on an old attempt overwrites the new one"),
    M("export-gate-ignores-int8", "export/stage.py",
      'report["passed"] = report["fp32_vs_torch"]["passed"] and all(',
      'report["passed"] = report["fp32_vs_torch"]["passed"] or all(',
      EXPORT, "`passed` ignores the int8 retrieval check"),
    M("export-gate-two-sided", "export/parity.py",
      "if -delta > tol + 1e-9:", "if abs(delta) > tol + 1e-9:",
      EXPORT, "the int8 gate fails a gain as well as a loss"),
    M("export-gate-no-one-query-floor", "export/parity.py",
      "tol = max(tolerance_low_k if k < 5 else tolerance_high_k, one_query)",
      "tol = tolerance_low_k if k < 5 else tolerance_high_k",
      EXPORT, "one rank flip on a small eval set fails the export"),
    M("resume-without-checkpoint", "train/stage.py",
      "trainer.train(resume_from_checkpoint=resume_from)", "trainer.train(resume_from_checkpoint=None)",
      ("tests/test_train_resume.py", "-k", "continues or resumes"),
      "the trainer is called without its checkpoint (starts over)"),
]


def scratch_copy(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, dest / name)


def run_tests(scratch: Path, args: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    """('passed' | 'failed' | 'timeout', seconds, last lines of the output)."""
    env = {**os.environ, "PYTHONPATH": str(scratch / "src"), "CI": "true", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    # Slow tests are left out: the fast ones named for each behaviour are the ones meant to catch its bugs.
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider", "--timeout=600",
           *args]
    t0 = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - t0, ""
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-3:])
    return ("passed" if done.returncode == 0 else "failed"), time.monotonic() - t0, tail


def apply(scratch: Path, m: Mutation) -> str | None:
    """Write the mutant; returns the original text, or None when the mutation no longer applies."""
    path = scratch / "src" / "embedtune" / m.file
    text = path.read_text()
    if text.count(m.old) != 1:
        return None
    path.write_text(text.replace(m.old, m.new))
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", default=[], help="run mutations whose name contains this")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per pytest run")
    ap.add_argument("--budget", type=float, default=None, help="start no mutant after this many seconds")
    args = ap.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or any(s in m.name for s in args.only)]
    if args.list or not chosen:
        for m in MUTATIONS:
            print(f"{m.name:34} {m.file:24} {m.what}")
        return 0 if args.list else 2

    results: list[tuple[str, str, float]] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="embedtune-mutants-") as tmp:
        scratch = Path(tmp)
        scratch_copy(scratch)
        baseline: dict[tuple[str, ...], str] = {}
        for m in chosen:
            if args.budget is not None and time.monotonic() - started > args.budget:
                results.append((m.name, "not run (budget)", 0.0))
                continue
            if m.tests not in baseline:  # run when first needed: a budget cut leaves whole groups done
                status, seconds, tail = run_tests(scratch, m.tests, args.timeout)
                baseline[m.tests] = status
                detail = f"\n{tail}" if status != "passed" else ""
                print(f"baseline {status:8} {seconds:6.0f} s  {' '.join(m.tests)}{detail}", flush=True)
            if baseline[m.tests] != "passed":
                results.append((m.name, "baseline failed", 0.0))
                continue
            original = apply(scratch, m)
            if original is None:
                results.append((m.name, "not applicable", 0.0))
                continue
            try:
                status, seconds, _ = run_tests(scratch, m.tests, args.timeout)
            finally:
                (scratch / "src" / "embedtune" / m.file).write_text(original)
            verdict = {"failed": "killed", "timeout": "killed (timeout)", "passed": "SURVIVED"}[status]
            results.append((m.name, verdict, seconds))
            print(f"{verdict:16} {seconds:6.0f} s  {m.name}: {m.what}", flush=True)

    survived = [r for r in results if r[1] == "SURVIVED"]
    broken = [r for r in results if r[1] in ("not applicable", "baseline failed", "not run (budget)")]
    killed = len(results) - len(survived) - len(broken)
    print(f"\n{len(results)} mutants: {killed} killed, {len(survived)} survived, {len(broken)} not run")
    for name, verdict, _ in survived + broken:
        print(f"  {verdict}: {name}")
    return 1 if survived or broken else 0


if __name__ == "__main__":
    sys.exit(main())
