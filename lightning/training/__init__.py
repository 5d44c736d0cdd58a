"""Training-side data structures (imports torch; ``import lightning`` does not import this).

:class:`TrainBatch` is what every backend's ``train_step`` takes: packed sequences with an
action mask, sampler log-probs and advantages. :func:`pack_sequences` builds one from
:class:`~lightning._sequences.TokenSequence` s; :func:`split_by_token_budget` cuts it into
micro-batches of whole sequences.
"""

from __future__ import annotations

from lightning.training.batch import TrainBatch, pack_sequences, split_by_token_budget

__all__ = ["TrainBatch", "pack_sequences", "split_by_token_budget"]
