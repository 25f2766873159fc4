"""The objective every recipe shares: cross-entropy as (sum, count), the soft/hard mix, and `distill_loss`, the one
function that turns a model's outputs and any teacher's targets into `alpha * KD + (1 - alpha) * CE`.

Recipes accumulate *sums* over micro-batches (and ranks) and divide once by the global number of valid tokens, so
the loss of a padded or accumulated batch equals the loss of the same tokens in one batch. Everything below keeps
that shape::

    loss = mix(kd_sum, ce_sum, n_tokens, alpha)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lmdistill.losses.chunked_ce import chunked_ce_sum_and_count, chunked_token_logprobs
from lmdistill.losses.cross_tokenizer import AlignedTargets, SparseSpanTargets
from lmdistill.losses.divergences import LossArgumentError, check_alpha, divergence
from lmdistill.losses.fused import fused_loss
from lmdistill.losses.head import Hidden
from lmdistill.losses.sparse import SparseTargets, sparse_divergence

IGNORE_INDEX = -100


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
        kd_sum: summed divergence over the batch's valid tokens (``divergence(..., reduction="sum")``); may be None only
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


@dataclass
class StepLoss:
    """What a recipe's loss function returns for one trained model and one micro-batch.

    loss_sum: the objective summed over this micro-batch's target tokens (scalar with graph).
    parts: other sums over the same tokens, for logging (e.g. {"kd": ..., "ce": ...}).
    """

    loss_sum: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)


# a teacher's hidden states + head, its [B, T, V] logits, sparse targets, or a teacher of another tokenizer's
Targets = Hidden | Tensor | SparseTargets | AlignedTargets | SparseSpanTargets


def distill_loss(out: Hidden | Tensor, targets: Targets | None, labels: Tensor, alpha: float, loss: Any) -> StepLoss:
    """alpha * D(model || targets) + (1 - alpha) * CE(model, labels), summed over the target tokens.

    Args:
        out: the model's `model_outputs`: hidden states + head (the fused loss projects them chunk by chunk, with
            the CE in the same pass, so the lm_head runs once for both terms) or [B, T, V] logits (reference path).
        targets: any teacher's targets for the same positions; None: CE alone (parts: ce).
        labels: [B, T], IGNORE_INDEX where nothing is learned.
        alpha: weight of the divergence; at 0 it is computed for the log only, with no gradient work.
        loss: the divergence settings (`lmdistill.config.DivergenceConfig`: kind, beta, temperature, backend).
    """
    if targets is None or alpha == 0:
        ce = (chunked_ce_sum_and_count(out.hidden, out.head, labels) if isinstance(out, Hidden)
              else ce_sum_and_count(out, labels))[0]
        if targets is None:
            return StepLoss(ce, {"ce": ce})
        with torch.no_grad():
            kd = distill_loss(out, targets, labels, 1.0, loss).parts["kd"]
        return StepLoss(ce, {"ce": ce, "kd": kd})
    if isinstance(targets, AlignedTargets | SparseSpanTargets):
        if not isinstance(out, Hidden):
            raise LossArgumentError("a teacher of another tokenizer needs the student's hidden states + head")
        kd = targets.kd_sum(out, loss.kind, loss.beta, loss.temperature)
        ce = chunked_ce_sum_and_count(out.hidden, out.head, labels)[0]
        counts = {f"aligned_{k}": torch.tensor(float(v)) for k, v in targets.counts.items()}
        return StepLoss(mix(kd, ce, 1, alpha), {"kd": kd, "ce": ce, **counts})
    mask = labels != IGNORE_INDEX
    if isinstance(out, Hidden):
        dense = targets if isinstance(targets, Hidden) else None
        sums = fused_loss(
            out.hidden, out.head, teacher_hidden=None if dense is None else dense.hidden,
            teacher_head=None if dense is None else dense.head,
            sparse=targets if isinstance(targets, SparseTargets) else None, labels=labels, alpha=alpha,
            kind=loss.kind, beta=loss.beta, temperature=loss.temperature, mask=mask, backend=loss.backend,
        )
        return StepLoss(sums.total, {"kd": sums.kd, "ce": sums.ce})
    if isinstance(targets, SparseTargets):
        kd = sparse_divergence(
            out, targets.ids, targets.logprobs, loss.kind, tail_logprob=targets.tail_logprob,
            target_weights=targets.weights, estimator=targets.estimator, beta=loss.beta,
            temperature=loss.temperature, mask=mask, reduction="sum")
    else:
        t_logits = targets.logits() if isinstance(targets, Hidden) else targets
        kd = divergence(out, t_logits, loss.kind, beta=loss.beta, temperature=loss.temperature, mask=mask,
                        reduction="sum")
    ce = ce_sum_and_count(out, labels)[0]
    return StepLoss(mix(kd, ce, 1, alpha), {"kd": kd, "ce": ce})


def token_logprobs(out: Hidden | Tensor, labels: Tensor) -> Tensor:
    """log p(label) [B, T] of a model's outputs at every labelled position (0 elsewhere), differentiable."""
    if isinstance(out, Hidden):
        return chunked_token_logprobs(out.hidden, out.head, labels)
    lp = torch.log_softmax(out.float(), dim=-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels != IGNORE_INDEX, lp, torch.zeros_like(lp))


def discounted(rewards: Tensor, mask: Tensor, discount: float) -> Tensor:
    """Per position, the reward plus `discount`^j times the reward j labelled positions later in the same row."""
    if discount == 0.0:
        return rewards * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = torch.where(mask[:, t], rewards[:, t] + discount * running, running)
        out[:, t] = torch.where(mask[:, t], running, torch.zeros_like(running))
    return out


def reverse_kl_policy_gradient(logprobs: Tensor, teacher_logprobs: Tensor, labels: Tensor,
                               discount: float = 0.0, sample_logprobs: Tensor | None = None,
                               clip: float = 0.2) -> StepLoss:
    """On-policy distillation from the teacher's log-prob of each sampled token alone.

    The per-token reward r_t = log p_T(y_t) - log p_sample(y_t) is minus the reverse KL's single-sample estimate; as
    an advantage (optionally discounted over the following tokens of the completion) it weighs PPO's clipped
    importance-weighted score function against the policy that sampled the tokens:

        loss = - sum_t min(ratio_t * A_t, clip(ratio_t, 1 - clip, 1 + clip) * A_t),
        ratio_t = p_S(y_t) / p_sample(y_t)

    With one update per rollout (`sample_logprobs` None) the sampling policy is the current one: the reward uses
    log p_S detached, ratio = 1 in value, nothing is clipped and the gradient is -A_t * grad log p_S(y_t) (REINFORCE
    with the teacher as the reward model). When a batch of rollouts is reused for several updates, the sampling
    log-probs are those stored at rollout time; a token whose ratio has left [1 - clip, 1 + clip] in the direction
    its advantage pushes it gets no gradient.

    Args:
        logprobs: [B, T] the student's log p(y_t), with graph (`token_logprobs`).
        teacher_logprobs: [B, T] the teacher's log p(y_t) of the same tokens.
        labels: [B, T] the sampled tokens, IGNORE_INDEX where nothing was sampled.
        discount: a token's advantage adds discount^j times the reward j labelled positions later.
        sample_logprobs: [B, T] the sampling policy's log p(y_t) (no graph); None: the current policy's.
        clip: PPO's epsilon, >= 0.

    Returns:
        StepLoss with the loss sum and parts `reverse_kl` (sum of log p_sample - log p_T) and `teacher_nll`.
    """
    if clip < 0:
        raise LossArgumentError(f"clip must be >= 0, got {clip}")
    mask = labels != IGNORE_INDEX
    behaviour = logprobs.detach() if sample_logprobs is None else sample_logprobs.detach().to(logprobs.dtype)
    rewards = (teacher_logprobs - behaviour) * mask
    advantage = discounted(rewards, mask, discount)
    ratio = torch.exp(logprobs - behaviour)
    unclipped = ratio * advantage
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip) * advantage
    # where both agree (inside the clip) the unclipped term is taken, so its gradient is the plain score function
    surrogate = torch.where(unclipped <= clipped, unclipped, clipped)
    total = -(surrogate * mask).sum()
    return StepLoss(total, {"reverse_kl": -rewards.sum(), "teacher_nll": -(teacher_logprobs * mask).sum()})
