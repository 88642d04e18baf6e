"""Prep stage: split queries by document, mine hard negatives, write training and BEIR eval files.

:func:`run_prep` (in :mod:`.stage`, which documents the outputs) is the front door; :mod:`.split` holds
out whole documents, :mod:`.mining` applies the margin rule and assembles the examples, :mod:`.teacher`
judges negatives (base model fused with BM25), :mod:`.formats` writes inline, AutoModel and BEIR files.
"""

from embedtune.prep.formats import TrainingRecord, read_training
from embedtune.prep.mining import Mined, fill_missing, mine_from_scores, mine_negatives
from embedtune.prep.report import audit
from embedtune.prep.split import split_by_document
from embedtune.prep.stage import load_training, print_audit, run_prep

__all__ = ["Mined", "TrainingRecord", "audit", "fill_missing", "load_training", "mine_from_scores",
           "mine_negatives", "print_audit", "read_training", "run_prep", "split_by_document"]
