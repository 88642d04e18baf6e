"""Finetune stage: contrastive bi-encoder training (full or LoRA-merged), Matryoshka, resumable, distributed.

Module map: ``data`` (train.jsonl -> dataset + validation split), ``plan`` (batch scaling, steps, Matryoshka
dims, hardware), ``losses``, ``lora``, ``trainer`` (arguments, evaluator, checkpoints, throughput),
``distributed`` (torchrun), ``report`` (loss curve, log) and ``stage`` (:func:`run_finetune`, the front door).
"""

from embedtune.train.stage import run_finetune

__all__ = ["run_finetune"]
