"""Distillation losses: dense divergences, sparse (cached) divergences, and the shared soft/hard arithmetic.

- :func:`divergence` / :func:`divergence_sum_and_count`: student vs teacher logits ``[..., V]``.
- :func:`sparse_divergence` / :func:`sparse_divergence_sum_and_count`: student logits vs cached top-k or sampled
  teacher targets.
- :func:`mix`, :func:`ce_sum_and_count`: combine ``alpha * KD + (1 - alpha) * CE``, normalised once by the token count.
"""

from lmdistill.losses.divergences import KINDS, LOGPROB_FLOOR, LossArgumentError, divergence, divergence_sum_and_count
from lmdistill.losses.objective import IGNORE_INDEX, ce_sum_and_count, check_alpha, mix
from lmdistill.losses.sparse import ESTIMATORS, sparse_divergence, sparse_divergence_sum_and_count

__all__ = [
    "ESTIMATORS",
    "IGNORE_INDEX",
    "KINDS",
    "LOGPROB_FLOOR",
    "LossArgumentError",
    "ce_sum_and_count",
    "check_alpha",
    "divergence",
    "divergence_sum_and_count",
    "mix",
    "sparse_divergence",
    "sparse_divergence_sum_and_count",
]
