r"""Divergences against sparse teacher targets from a soft-label cache: top-k (with or without a tail) and sampled.

A cache stores, per position, ``K`` token ids and the teacher's log-probabilities of them instead of the full
``[V]`` distribution. Two encodings, two estimators:

**Top-k** (``estimator="topk"``): the ``K`` most probable ids, their log-probs, and optionally ``tail_logprob``, the
log of the teacher mass outside them.

- *With a tail*, both distributions are coarsened to the same ``K + 1`` buckets ``{id_1, ..., id_K, rest}``: the
  student's ``rest`` bucket is the log-sum-exp of its log-probs over the complement of the ids (computed directly, so
  it stays exact when the rest is tiny), and the teacher's buckets are renormalised (stored values are rounded). Every
  kind is then computed *exactly* on that ``(K+1)``-bucket distribution; for ``K = V`` (tail mass 0) this is the
  dense :func:`~lmdistill.losses.divergence`, for every kind. By the data-processing inequality the coarsened
  divergence never exceeds the dense one.
- *Without a tail*, the teacher's top-K is renormalised to sum to 1. ``forward_kl`` is then
  ``sum_k q_k (log q_k - log p_S(k))`` with the student's *full-vocabulary* log-probs (not renormalised), i.e. the
  cross-entropy to the truncated teacher minus its entropy: mass the student puts outside the top-K still costs it.
  Every other kind has no such form, so it compares the teacher's and the student's distributions both
  renormalised over the K ids; student mass outside them is invisible to those kinds.

**Sampled** (``estimator="sampled"``, Random-Sampling KD, Anshumann et al. 2025): ``target_ids`` are the distinct
ids among ``n`` draws per position, ``target_weights`` their importance weights (``count / n`` when the draws come
from the teacher itself), ``target_logprobs`` the teacher's log-probs of them. Only ``forward_kl`` has an unbiased
estimator:

.. math::

    \hat L = \sum_i w_i \, (\log p_T(i) - \log p_S(i)).

*Derivation.* Write the estimator as a sum over the whole vocabulary, ``\hat L = \sum_v w_v (\log p_T(v) -
\log p_S(v))`` with ``w_v = c_v / n`` and ``c_v`` the number of draws equal to ``v`` (``w_v = 0`` for ids never
drawn). With ``n`` i.i.d. draws from ``p_T``, ``c_v ~ Binomial(n, p_T(v))`` so ``E[w_v] = p_T(v)``. The log-probs
are fixed given the logits, so by linearity ``E[\hat L] = \sum_v p_T(v) (\log p_T(v) - \log p_S(v)) =
KL(p_T || p_S)``. The gradient w.r.t. the student's logits is ``-\sum_v w_v \nabla \log p_S(v)``, linear in ``w``
too, so ``E[\nabla \hat L] = \nabla KL(p_T || p_S)``: unbiased in value *and* gradient. With draws from a proposal
``q`` instead, weights ``w_v = c_v / n \cdot p_T(v) / q(v)`` keep ``E[w_v] = p_T(v)`` and the same argument holds;
this function takes whatever weights the cache stores. A ``topk_sampled`` cache uses that freedom: its top-k ids carry
their exact ``p_T(v)`` (zero variance) and the ids drawn from the tail outside them carry ``m c_v / n`` (``m`` the tail
mass, ``c_v`` out of ``n`` draws of the renormalised tail), so ``E[w_v] = p_T(v)`` for every id again. Reverse KL, JSD, the skews and TVD are non-linear in
``p_T``, so plugging in sampled weights would be biased: those kinds are refused.

Conventions shared with :func:`~lmdistill.losses.divergence`: fp32 arithmetic, the student's logits divided by
``temperature`` and the result multiplied by ``temperature ** 2``, boolean ``mask`` over positions (dropped before
the softmax), the same ``reduction`` values, ``(sum, count)`` for the trainer. The teacher's log-probs are taken as
given: they must already be at ``temperature`` (the cache records the temperature it was written at, and the reader
refuses a student temperature the cached values cannot honour). ``-1`` in ``target_ids`` marks an absent entry and is
ignored; ids must otherwise be distinct within a position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmdistill.losses.divergences import (
    LOGPROB_FLOOR,
    LossArgumentError,
    check_hparams,
    check_kind,
    check_mask,
    divergence_from_logprobs,
    floor_logprobs,
    reduce,
)

ESTIMATORS = ("topk", "sampled")


@dataclass(frozen=True)
class SparseTargets:
    """Teacher targets from a soft-label cache or an API, in the shape :func:`sparse_divergence` takes.

    Attributes:
        ids: ``[..., K]`` int64 token ids (the same leading shape as the student's positions); ``-1`` marks an absent
            entry.
        logprobs: ``[..., K]`` teacher log-probabilities of ``ids``.
        tail_logprob: ``[...]`` log of the teacher mass outside ``ids`` (top-k with a tail bucket), or None.
        weights: ``[..., K]`` importance weights of sampled ids (``estimator="sampled"``), or None.
        estimator: ``"topk"`` or ``"sampled"``.
    """

    ids: Tensor
    logprobs: Tensor
    tail_logprob: Tensor | None = None
    weights: Tensor | None = None
    estimator: str = "topk"

# stands in for an absent entry inside a log-sum-exp: exp() of it is 0 beside any real log-prob, and unlike -inf it
# never makes a 0 * inf in the backward pass of a row with no valid entry
_ABSENT = -1.0e30


def _renormalize(logprobs: Tensor, valid: Tensor) -> Tensor:
    """Log-probs ``[N, C]`` renormalised over the valid entries; absent entries get the floor (probability 0)."""
    x = torch.where(valid, floor_logprobs(logprobs), torch.full_like(logprobs, _ABSENT))
    out = x - torch.logsumexp(x, dim=-1, keepdim=True)
    return torch.where(valid, out, torch.full_like(out, LOGPROB_FLOOR))


def _per_row(
    student_logits: Tensor,
    target_ids: Tensor,
    target_logprobs: Tensor,
    kind: str,
    tail_logprob: Tensor | None,
    target_weights: Tensor | None,
    estimator: str,
    beta: float,
    temperature: float,
    mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    check_kind(kind)
    if estimator not in ESTIMATORS:
        raise LossArgumentError(f"unknown estimator {estimator!r}; choose one of: {', '.join(ESTIMATORS)}")
    if not student_logits.is_floating_point() or student_logits.dim() < 1:
        raise LossArgumentError(
            f"student_logits must be a float tensor [..., V], got {student_logits.dtype} "
            f"of shape {tuple(student_logits.shape)}"
        )
    positions = tuple(student_logits.shape[:-1])
    if target_ids.dtype.is_floating_point or target_ids.dtype == torch.bool or target_ids.dim() != len(positions) + 1:
        raise LossArgumentError(
            f"target_ids must be integer ids [..., K] with the student's leading shape {positions}, "
            f"got {target_ids.dtype} of shape {tuple(target_ids.shape)}"
        )
    if tuple(target_ids.shape[:-1]) != positions:
        raise LossArgumentError(
            f"target_ids shape {tuple(target_ids.shape)} must be the student_logits shape without V, {positions}, "
            f"plus K (are the cached targets aligned with this batch?)"
        )
    if target_logprobs.shape != target_ids.shape or not target_logprobs.is_floating_point():
        raise LossArgumentError(
            f"target_logprobs must be a float tensor shaped like target_ids {tuple(target_ids.shape)}, "
            f"got {target_logprobs.dtype} of shape {tuple(target_logprobs.shape)}"
        )
    vocab = student_logits.shape[-1]
    if target_ids.numel() and bool(((target_ids < -1) | (target_ids >= vocab)).any()):
        bad = target_ids[(target_ids < -1) | (target_ids >= vocab)].unique()
        raise LossArgumentError(
            f"target_ids must lie in [0, {vocab}) (the student's vocab) or be -1 for an absent entry; found "
            f"{bad[:5].tolist()}: was the cache written with a different tokenizer, or are the logits not sliced "
            f"to the shared vocab?"
        )
    if estimator == "sampled":
        if kind != "forward_kl":
            raise LossArgumentError(
                f"estimator='sampled' supports only kind='forward_kl' (the one divergence linear in the teacher's "
                f"probabilities, so sampled weights give an unbiased estimate), got kind={kind!r}; use a top-k cache "
                f"for the other kinds"
            )
        if target_weights is None:
            raise LossArgumentError("estimator='sampled' needs target_weights [..., K] (draw counts / n)")
        if tail_logprob is not None:
            raise LossArgumentError("tail_logprob belongs to estimator='topk'; a sampled target has no tail")
    else:
        if target_weights is not None:
            raise LossArgumentError(
                "target_weights belong to estimator='sampled'; pass estimator='sampled' for a sampled cache"
            )
        if tail_logprob is not None and tuple(tail_logprob.shape) != positions:
            raise LossArgumentError(
                f"tail_logprob shape {tuple(tail_logprob.shape)} must be the student_logits shape without V, "
                f"{positions}"
            )
    if target_weights is not None and target_weights.shape != target_ids.shape:
        raise LossArgumentError(
            f"target_weights shape {tuple(target_weights.shape)} must equal target_ids shape {tuple(target_ids.shape)}"
        )
    check_hparams(beta, temperature, "mean")
    positions_shape = student_logits.shape[:-1]
    mask = check_mask(mask, positions_shape, what="student_logits")
    vocab, k = student_logits.shape[-1], target_ids.shape[-1]

    z = student_logits.reshape(-1, vocab)
    ids = target_ids.reshape(-1, k).long()
    lp = target_logprobs.reshape(-1, k)
    tail = None if tail_logprob is None else tail_logprob.reshape(-1)
    weights = None if target_weights is None else target_weights.reshape(-1, k)
    if mask is not None:
        # drop masked rows before any softmax: padding may hold anything
        flat = mask.reshape(-1)
        z, ids, lp = z[flat], ids[flat], lp[flat]
        tail = None if tail is None else tail[flat]
        weights = None if weights is None else weights[flat]
        count = flat.sum()
    else:
        count = torch.tensor(z.shape[0], device=z.device)

    z = z.float() / temperature
    lp = lp.float()
    valid = ids >= 0
    # absent entries (-1) gather a real id (the row's largest) and are then overwritten: no out-of-range index
    any_valid = valid.any(-1, keepdim=True)
    safe_ids = torch.where(valid, ids, ids.amax(-1, keepdim=True).clamp_min(0))

    if estimator == "topk" and tail is not None:
        # (K+1)-bucket coarsening of both distributions
        ls_full = floor_logprobs(torch.log_softmax(z, dim=-1))
        ls_k = torch.where(valid, ls_full.gather(-1, safe_ids), torch.full_like(lp, LOGPROB_FLOOR))
        # membership of the K ids; a row with any valid id writes True at every (redirected) index, one without
        # writes False everywhere, so duplicate indices never disagree
        in_k = torch.zeros_like(ls_full, dtype=torch.bool).scatter_(-1, safe_ids, any_valid.expand_as(ids))
        # the rest bucket straight from the complement (not log1p(-sum p_k), which loses a tiny rest to rounding);
        # an empty complement (K = V) gives -inf, floored, and masked_fill's backward zeroes its NaN partials
        ls_tail = floor_logprobs(torch.logsumexp(ls_full.masked_fill(in_k, float("-inf")), dim=-1, keepdim=True))
        ls = torch.cat([ls_k, ls_tail], dim=-1)
        lt = _renormalize(
            torch.cat([lp, tail.float().unsqueeze(-1)], dim=-1),
            torch.cat([valid, torch.ones_like(valid[:, :1])], dim=-1),
        )
        per_row = divergence_from_logprobs(ls, lt, kind, beta)
    else:
        # only the K gathered log-probs are needed: log p_S(id) = z_id - logsumexp(z), no [N, V] log-softmax copy
        log_z = torch.logsumexp(z, dim=-1, keepdim=True)
        ls_k = torch.where(valid, floor_logprobs(z.gather(-1, safe_ids) - log_z), torch.full_like(lp, LOGPROB_FLOOR))
        if estimator == "sampled":
            assert weights is not None
            w = torch.where(valid, weights.float(), torch.zeros_like(lp))
            lt_k = torch.where(valid, floor_logprobs(lp), torch.zeros_like(lp))
            per_row = (w * (lt_k - ls_k)).sum(-1)
        elif kind == "forward_kl":
            lt = _renormalize(lp, valid)
            per_row = (lt.exp() * (lt - ls_k)).sum(-1)
        else:
            per_row = divergence_from_logprobs(_renormalize(ls_k, valid), _renormalize(lp, valid), kind, beta)
    return per_row * (temperature**2), count, mask


def sparse_divergence(
    student_logits: Tensor,
    target_ids: Tensor,
    target_logprobs: Tensor,
    kind: str = "forward_kl",
    *,
    tail_logprob: Tensor | None = None,
    target_weights: Tensor | None = None,
    estimator: str = "topk",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Divergence between the student's distribution and a sparse teacher target (see the module docstring).

    Args:
        student_logits: ``[..., V]`` (e.g. ``[B, T, V]``), any float dtype; computed in fp32.
        target_ids: ``[..., K]`` integer token ids, ``-1`` = absent entry (ignored). Distinct within a position.
        target_logprobs: ``[..., K]`` teacher log-probs of ``target_ids``, at ``temperature`` already.
        kind: one of :data:`~lmdistill.losses.KINDS`; ``"forward_kl"`` only for ``estimator="sampled"``.
        tail_logprob: ``[...]`` log of the teacher mass outside ``target_ids`` (top-k only). With it every kind is
            exact on the ``K + 1`` buckets; without it the top-K is renormalised.
        target_weights: ``[..., K]`` importance weights of sampled ids (``count / n``); sampled only.
        estimator: ``"topk"`` or ``"sampled"``.
        beta: JSD interpolation / DistiLLM skew, in ``[0, 1]`` (as in :func:`~lmdistill.losses.divergence`).
        temperature: the student's logits are divided by it and the result is multiplied by its square.
        mask: ``[...]`` bool, True = the position counts.
        reduction: ``"mean"`` over valid positions (all masked -> 0.0), ``"sum"``, or ``"none"`` (``[...]``, 0 at
            masked positions).

    Returns:
        fp32 scalar, or ``[...]`` for ``reduction="none"``.

    Raises:
        LossArgumentError (a ValueError): unknown ``kind``, ``estimator`` or ``reduction``; a kind the sampled
            estimator cannot serve; missing or superfluous ``target_weights`` / ``tail_logprob``; shapes that do not
            line up; ids outside the student's vocab; ``temperature <= 0``; ``beta`` outside ``[0, 1]``.
    """
    check_hparams(beta, temperature, reduction)
    per_row, count, mask = _per_row(
        student_logits, target_ids, target_logprobs, kind, tail_logprob, target_weights, estimator, beta,
        temperature, mask,
    )  # fmt: skip
    return reduce(per_row, count, reduction, mask, student_logits.shape[:-1])
