"""The arithmetic every recipe shares: cross-entropy as (sum, count), and the soft/hard mix.

Recipes accumulate *sums* over micro-batches (and ranks) and divide once by the global number of valid tokens, so
the loss of a padded or accumulated batch equals the loss of the same tokens in one batch. Both helpers below keep
that shape; a recipe's loss is then one visible line::

    loss = mix(kd_sum, ce_sum, n_tokens, alpha)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lmdistill.losses.divergences import LossArgumentError

IGNORE_INDEX = -100


def check_alpha(alpha: float) -> None:
    """Refuse an ``alpha`` outside ``[0, 1]`` with the bad value in the message."""
    try:
        ok = 0.0 <= float(alpha) <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok or isinstance(alpha, bool):
        raise LossArgumentError(f"alpha must be in [0, 1], got {alpha}")


def ce_sum_and_count(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Summed token cross-entropy and the number of counted tokens.

    ``labels`` are aligned with ``logits``: position ``t`` of ``logits`` is scored against ``labels[..., t]``. Shift
    before calling (``logits[:, :-1]``, ``labels[:, 1:]``) when the labels are the input ids.

    Args:
        logits: ``[B, T, V]`` (any leading shape ``[..., V]``), any float dtype; computed in fp32.
        labels: ``[B, T]`` int64, ``ignore_index`` (-100) where a position does not count.
        ignore_index: the label value to skip.

    Returns:
        ``(sum, count)``: fp32 scalar sum of ``-log p(label)`` over counted positions (0.0 when none count),
        int64 scalar number of counted positions.

    Raises:
        LossArgumentError (a ValueError): ``labels`` shape is not ``logits`` shape without the vocab dim.
    """
    if labels.shape != logits.shape[:-1]:
        raise LossArgumentError(
            f"labels shape {tuple(labels.shape)} must equal logits shape without the vocab dim, "
            f"{tuple(logits.shape[:-1])} (shift logits and labels by the same amount)"
        )
    vocab = logits.shape[-1]
    total = F.cross_entropy(
        logits.reshape(-1, vocab).float(), labels.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
    return total, (labels != ignore_index).sum()


def mix(kd_sum: Tensor | None, ce_sum: Tensor | None, n_tokens: Tensor | int, alpha: float) -> Tensor:
    """``(alpha * kd_sum + (1 - alpha) * ce_sum) / n_tokens``: the one place soft and hard terms are combined.

    Args:
        kd_sum: summed divergence over the batch's valid tokens (see ``divergence_sum_and_count``); may be None only
            when ``alpha == 0`` (pure CE).
        ce_sum: summed cross-entropy (see :func:`ce_sum_and_count`); may be None only when ``alpha == 1``.
        n_tokens: the number of valid tokens the sums run over, global across accumulation steps and ranks; clamped
            to at least 1 so an all-padding batch gives 0, not NaN.
        alpha: weight of the distillation term, in ``[0, 1]``.

    Returns:
        fp32 scalar loss.

    Raises:
        LossArgumentError (a ValueError): ``alpha`` outside ``[0, 1]``, or a None term that ``alpha`` gives weight to.
    """
    check_alpha(alpha)
    alpha = float(alpha)
    terms = []
    # a term with weight 0 is skipped rather than multiplied by 0, so a NaN there (or a None) cannot leak in
    if alpha > 0.0:
        if kd_sum is None:
            raise LossArgumentError(f"kd_sum is None but alpha={alpha} gives the distillation term weight")
        terms.append(alpha * kd_sum.float())
    if alpha < 1.0:
        if ce_sum is None:
            raise LossArgumentError(
                f"ce_sum is None but alpha={alpha} gives the cross-entropy term weight {1 - alpha}"
            )
        terms.append((1.0 - alpha) * ce_sum.float())
    total = terms[0] if len(terms) == 1 else terms[0] + terms[1]
    n = torch.as_tensor(n_tokens, device=total.device).clamp_min(1).to(total.dtype)
    return total / n
