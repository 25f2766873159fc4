"""Distillation losses: dense divergences, sparse (cached) divergences, and the shared soft/hard arithmetic.

- :func:`divergence` / :func:`divergence_sum_and_count`: student vs teacher logits ``[..., V]``.
- :func:`sparse_divergence` / :func:`sparse_divergence_sum_and_count`: student logits vs cached top-k or sampled
  teacher targets.
- :func:`fused_divergence` / :func:`fused_divergence_sum_and_count`: the same values from hidden states and output
  layers, chunked so ``[tokens, vocab]`` logits are never held for all tokens.
- :func:`fused_distill_loss_sums`: ``alpha * KD + (1 - alpha) * CE`` sums in that one pass (the student is projected
  once for both terms); what the recipes train with.
- :func:`mix`, :func:`ce_sum_and_count`: combine ``alpha * KD + (1 - alpha) * CE``, normalised once by the token count.
"""

from lmdistill.losses.divergences import KINDS, LOGPROB_FLOOR, LossArgumentError, divergence, divergence_sum_and_count
from lmdistill.losses.fused import (  # noqa: I001
    FusedLossSums,
    SparseTargets,
    fused_distill_loss_sums,
    fused_divergence,
    fused_divergence_sum_and_count,
)
from lmdistill.losses.objective import IGNORE_INDEX, ce_sum_and_count, check_alpha, mix
from lmdistill.losses.sparse import ESTIMATORS, sparse_divergence, sparse_divergence_sum_and_count

__all__ = [
    "ESTIMATORS",
    "IGNORE_INDEX",
    "KINDS",
    "LOGPROB_FLOOR",
    "FusedLossSums",
    "LossArgumentError",
    "SparseTargets",
    "ce_sum_and_count",
    "check_alpha",
    "divergence",
    "divergence_sum_and_count",
    "fused_distill_loss_sums",
    "fused_divergence",
    "fused_divergence_sum_and_count",
    "mix",
    "sparse_divergence",
    "sparse_divergence_sum_and_count",
]
