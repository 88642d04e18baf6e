"""What the query writer wrote: the style, round-trip ranks and filter losses of a run's synthetic queries,
beside the user's real queries (``--real``: a BEIR folder) — why examples do or do not move a fine-tune.

    PYTHONPATH=src .venv/bin/python bench/sdg_query_style.py RUN_DIR [RUN_DIR ...] --real ../shared/data/scifact

Per run: queries kept, the share in claim form (a statement, not a question), mean length in words, the
round-trip rank distribution of the kept queries (rank 1 = the base model already finds the passage first),
and the rejections by reason. The real queries' form and length are printed as the target.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import Counter
from pathlib import Path

QUESTION_START = re.compile(r"^(what|which|who|whom|whose|when|where|why|how|is|are|was|were|do|does|did|can|could|"
                            r"should|would|will|has|have|had)\b", re.IGNORECASE)


def is_question(text: str) -> bool:
    text = text.strip()
    return text.endswith("?") or bool(QUESTION_START.match(text))


def style(texts: list[str]) -> dict[str, float]:
    words = [len(t.split()) for t in texts]
    return {"n": len(texts), "claim_share": sum(not is_question(t) for t in texts) / max(1, len(texts)),
            "mean_words": statistics.mean(words) if words else 0.0}


def run_stats(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "sdg" / "queries.jsonl").read_text().splitlines() if line.strip()]
    rejected = [json.loads(line) for line in (run / "sdg" / "rejected.jsonl").read_text().splitlines()
                if line.strip()] if (run / "sdg" / "rejected.jsonl").is_file() else []
    ranks = [r["roundtrip_rank"] for r in rows if r.get("roundtrip_rank") is not None]
    buckets = Counter("1" if k == 1 else "2-5" if k <= 5 else "6-20" if k <= 20 else ">20" for k in ranks)
    examples = json.loads((run / "sdg" / "examples.json").read_text()) if (run / "sdg" / "examples.json").is_file() \
        else {}
    return {"run": str(run), **style([r["text"] for r in rows]), "examples_used": len(examples.get("used") or []),
            "roundtrip_ranks": dict(sorted(buckets.items())), "rejected": dict(Counter(r["reason"] for r in rejected)),
            "sample": [r["text"] for r in rows[:8]]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--real", type=Path, help="BEIR folder of real queries (the style to match)")
    args = ap.parse_args()
    if args.real:
        texts = [json.loads(line)["text"] for line in (args.real / "queries.jsonl").read_text().splitlines()
                 if line.strip()]
        print(f"real queries ({args.real}): {json.dumps(style(texts))}")
    for run in args.runs:
        print(json.dumps(run_stats(run), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
