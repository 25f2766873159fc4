"""Distillation losses: dense divergences, sparse (cached) divergences, the fused loss, and the shared arithmetic.

- :func:`divergence`: student vs teacher logits ``[..., V]`` (the reference); ``reduction="sum"`` for the trainer.
- :func:`sparse_divergence`: student logits vs :class:`SparseTargets`,
  cached or API top-k or sampled teacher targets.
- :func:`fused_loss`: the same divergences from hidden states and output layers (:class:`Head`), chunked so
  ``[tokens, vocab]`` logits are never held for all tokens, with the ground-truth CE folded into the same pass
  (``alpha * KD + (1 - alpha) * CE`` sums, :class:`FusedLossSums`); what the recipes train with.
- :func:`lmdistill.losses.chunked_ce.chunked_ce_sum_and_count` / ``chunked_ce_sums``: cross-entropy from hidden
  states and a :class:`Head`, chunked (hard-label recipes).
- :func:`mix`, :func:`ce_sum_and_count`, :func:`check_alpha`: combine ``alpha * KD + (1 - alpha) * CE``, normalised
  once by the token count.
"""

from lmdistill.losses.divergences import (
    KINDS,
    LOGPROB_FLOOR,
    LossArgumentError,
    check_alpha,
    divergence,
)
from lmdistill.losses.fused import FusedLossSums, fused_loss
from lmdistill.losses.head import Head, Hidden
from lmdistill.losses.objective import (
    IGNORE_INDEX,
    StepLoss,
    ce_sum_and_count,
    distill_loss,
    mix,
    reverse_kl_policy_gradient,
    token_logprobs,
)
from lmdistill.losses.sparse import ESTIMATORS, SparseTargets, sparse_divergence

__all__ = [
    "ESTIMATORS",
    "IGNORE_INDEX",
    "KINDS",
    "LOGPROB_FLOOR",
    "FusedLossSums",
    "Head",
    "Hidden",
    "LossArgumentError",
    "SparseTargets",
    "StepLoss",
    "ce_sum_and_count",
    "check_alpha",
    "divergence",
    "distill_loss",
    "fused_loss",
    "mix",
    "reverse_kl_policy_gradient",
    "sparse_divergence",
    "token_logprobs",
]
