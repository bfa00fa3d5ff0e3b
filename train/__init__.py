"""Trainer over cached features: models, the four objectives, the loop (torchrun/DDP) and evaluation.

Reads stores/ only (never extractors/ or pipeline/). Public: `train.metrics.retrieval_metrics`;
commands `vlpcache train` / `vlpcache eval` (train.cli), `python -m train.ablation`, `python -m train.formats`.
"""
