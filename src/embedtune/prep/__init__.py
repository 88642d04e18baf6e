"""Prep stage: split queries by document, mine hard negatives, write training and BEIR eval files.

Reads ``corpus/chunks.jsonl`` and ``sdg/queries.jsonl``; writes under ``prep/``:
``train.jsonl`` (inline), ``train.automodel.json`` + ``corpus/`` (NeMo AutoModel corpus-ID format),
``eval/{corpus.jsonl,queries.jsonl,qrels/test.tsv}`` (BEIR), ``split.json`` (which documents and queries
were held out), ``report.md`` and ``scores.png``.

Negatives per training query: up to ``hard_negatives_to_mine`` mined ones, best first (the trainer takes
the first ``passages_per_query - 1``). A query left with fewer than ``negatives_used`` is topped up with
random allowed chunks (``fill_missing: random``, their real scores recorded) or dropped (``drop``).
Candidates for negatives are the training documents' chunks (all chunks with
``test_chunks_as_negatives``), never a positive, never a chunk whose text equals a positive's, and with
``exclude_same_document`` (default) never a chunk of a positive's own document.
"""

from embedtune.prep.formats import TrainingRecord, read_training
from embedtune.prep.mining import Mined, fill_missing, mine_from_scores, mine_negatives
from embedtune.prep.report import audit
from embedtune.prep.split import split_by_document
from embedtune.prep.stage import load_training, print_audit, run_prep

__all__ = ["Mined", "TrainingRecord", "audit", "fill_missing", "load_training", "mine_from_scores",
           "mine_negatives", "print_audit", "read_training", "run_prep", "split_by_document"]
