"""Dense divergences between a student's and a teacher's next-token distributions.

Every kind shares one signature and one set of conventions:

- Inputs are logits ``[..., V]`` (usually ``[B, T, V]``) in any float dtype; the arithmetic runs in fp32.
- ``temperature`` divides both sides' logits, and the result is multiplied by ``temperature ** 2`` (Hinton et al.
  2015) so that gradient magnitudes do not shrink as the temperature rises.
- ``mask`` ``[...]`` is boolean, True where a position counts. Masked positions are dropped *before* any softmax, so
  garbage (even NaN) in a masked row can never reach the value or the gradient.
- Inside the sum we return ``(sum over valid positions, number of valid positions)`` and normalise once, in the
  caller (see :mod:`lmdistill.losses.objective`): averaging per micro-batch is where distillation bugs hide.

Numerics: a log-probability of ``-inf`` (a vocab entry masked to ``-inf`` on either side) is replaced by the finite
floor :data:`LOGPROB_FLOOR` before anything else, so its probability is exactly 0 (``exp(-1e4)`` underflows) while
every ``p * (log p - log q)`` product and every gradient stays finite. Finite log-probabilities, however extreme, are
used exactly (never clamped), so a student that is confidently wrong still gets its full gradient. One consequence to
know: where only the teacher masks an entry, reverse-KL-like kinds charge the student ``p_S * (log p_S + 1e4)`` for
mass there (a large finite penalty instead of the true ``+inf``).

Gradients flow into both inputs if both require grad; detach the teacher yourself when it must not learn.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lmdistill.errors import LmdistillError

KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
REDUCTIONS = ("mean", "sum", "none")


class LossArgumentError(LmdistillError, ValueError):
    """A loss got an invalid kind, hyper-parameter or tensor shape (also a ValueError, so plain code can catch it)."""


# log-probability that stands in for -inf: exp() of it is exactly 0 in fp32, differences of it stay finite.
LOGPROB_FLOOR = -1.0e4


# ----------------------------------------------------------------------------------------------------------------
# validation (shared with the sparse losses)


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise LossArgumentError(f"unknown divergence kind {kind!r}; choose one of: {', '.join(KINDS)}")


def _is_real(x: object) -> bool:
    try:
        float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return not isinstance(x, bool | str)


def check_hparams(beta: float, temperature: float, reduction: str) -> None:
    if not (_is_real(temperature) and math.isfinite(temperature) and temperature > 0):
        raise LossArgumentError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not (_is_real(beta) and 0.0 <= beta <= 1.0):
        raise LossArgumentError(f"beta must be in [0, 1], got {beta!r}")
    if reduction not in REDUCTIONS:
        raise LossArgumentError(f"unknown reduction {reduction!r}; choose one of: {', '.join(REDUCTIONS)}")


def check_mask(mask: Tensor | None, positions_shape: torch.Size, what: str = "logits") -> Tensor | None:
    """Return ``mask`` as bool, refusing a shape that does not match the positions ``[...]``."""
    if mask is None:
        return None
    if mask.shape != positions_shape:
        raise LossArgumentError(
            f"mask shape {tuple(mask.shape)} must equal the {what} shape without its last dim, "
            f"{tuple(positions_shape)}"
        )
    return mask if mask.dtype == torch.bool else mask != 0


def _check_logits(student_logits: Tensor, teacher_logits: Tensor) -> None:
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not t.is_floating_point():
            raise LossArgumentError(f"{name} must be a float tensor [..., V], got dtype {t.dtype}")
        if t.dim() < 1:
            raise LossArgumentError(f"{name} must have a vocab dim [..., V], got a 0-d tensor")
    s_shape, t_shape = tuple(student_logits.shape), tuple(teacher_logits.shape)
    if s_shape != t_shape:
        hint = ""
        if s_shape[:-1] == t_shape[:-1]:
            hint = (
                f"; only the vocab dim differs ({s_shape[-1]} vs {t_shape[-1]}): slice both to the shared vocab, "
                f"e.g. logits[..., :{min(s_shape[-1], t_shape[-1])}] (lmdistill.models compares the tokenizers and "
                "does this)"
            )
        raise LossArgumentError(
            f"student_logits shape {s_shape} and teacher_logits shape {t_shape} must match{hint}"
        )


# ----------------------------------------------------------------------------------------------------------------
# the arithmetic, on log-probabilities [N, C] (C = vocab, or the K+1 buckets of a sparse target)


def floor_logprobs(logprobs: Tensor) -> Tensor:
    """Replace -inf (and NaN from an all--inf row) by :data:`LOGPROB_FLOOR`; finite values pass unchanged."""
    return torch.where(torch.isfinite(logprobs), logprobs, torch.full_like(logprobs, LOGPROB_FLOOR))


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """``log(w * exp(log_a) + (1 - w) * exp(log_b))``, exact at the endpoints w = 0 and w = 1."""
    if w == 0.0:
        return log_b
    if w == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) per row, from floored log-probs [N, C] -> [N]."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def divergence_from_logprobs(ls: Tensor, lt: Tensor, kind: str, beta: float) -> Tensor:
    """Per-row divergence from *floored* fp32 log-probs ``ls`` (student) and ``lt`` (teacher), ``[N, C] -> [N]``.

    The building block shared by the dense and sparse losses; no temperature, no T^2, no masking.
    """
    if kind == "forward_kl":
        return _kl(lt, ls)
    if kind == "reverse_kl":
        return _kl(ls, lt)
    if kind == "jsd":
        # TRL's generalized_jsd_loss / Liger's JSD: beta weights the teacher in the mixture and in the sum, and the
        # endpoints are special-cased to the plain KLs (the formula itself tends to 0 there).
        if beta == 0.0:
            return _kl(lt, ls)
        if beta == 1.0:
            return _kl(ls, lt)
        lm = _log_mix(lt, ls, beta)
        return beta * _kl(lt, lm) + (1.0 - beta) * _kl(ls, lm)
    if kind == "skew_forward_kl":
        if beta == 1.0:
            # KL(p_T || p_T) = 0; keep both inputs in the graph so backward() still reaches them (with zero grads)
            return (ls.sum(-1) + lt.sum(-1)) * 0.0
        return _kl(lt, _log_mix(lt, ls, beta))
    if kind == "skew_reverse_kl":
        return _kl(ls, _log_mix(ls, lt, beta))
    if kind == "tvd":
        return 0.5 * (lt.exp() - ls.exp()).abs().sum(-1)
    check_kind(kind)
    raise AssertionError("unreachable")


def scatter_positions(values: Tensor, mask: Tensor | None, positions_shape: torch.Size) -> Tensor:
    """Per-position values for the valid rows ``[N_valid]`` -> ``[...]`` with 0 at masked positions."""
    if mask is None:
        return values.reshape(positions_shape)
    out = values.new_zeros(mask.numel())
    out = out.index_put((mask.reshape(-1).nonzero().squeeze(-1),), values)
    return out.reshape(positions_shape)


def reduce(per_row: Tensor, count: Tensor, reduction: str, mask: Tensor | None, positions_shape: torch.Size) -> Tensor:
    if reduction == "sum":
        return per_row.sum()
    if reduction == "mean":
        # all-masked: 0 / 1 = 0.0, and the graph still reaches the inputs (zero grads, not None)
        return per_row.sum() / count.clamp_min(1).to(per_row.dtype)
    return scatter_positions(per_row, mask, positions_shape)


# ----------------------------------------------------------------------------------------------------------------
# public API


def _per_row(
    student_logits: Tensor, teacher_logits: Tensor, kind: str, beta: float, temperature: float, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    check_kind(kind)
    check_hparams(beta, temperature, "mean")
    _check_logits(student_logits, teacher_logits)
    positions_shape = student_logits.shape[:-1]
    mask = check_mask(mask, positions_shape)
    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab)
    t = teacher_logits.reshape(-1, vocab)
    if mask is not None:
        # drop masked rows first: their softmax never runs, so nothing in them can turn into a NaN gradient
        flat = mask.reshape(-1)
        s, t = s[flat], t[flat]
        count = flat.sum()
    else:
        count = torch.tensor(s.shape[0], device=s.device)
    ls = floor_logprobs(torch.log_softmax(s.float() / temperature, dim=-1))
    lt = floor_logprobs(torch.log_softmax(t.float() / temperature, dim=-1))
    per_row = divergence_from_logprobs(ls, lt, kind, beta) * (temperature**2)
    return per_row, count, mask


def divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str = "forward_kl",
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Divergence between the student's and the teacher's next-token distributions, per position.

    With ``p_T = softmax(teacher_logits / T)``, ``p_S = softmax(student_logits / T)``:

    - ``forward_kl``: KL(p_T || p_S) (mass-covering; the classic KD loss).
    - ``reverse_kl``: KL(p_S || p_T) (mode-seeking; MiniLLM).
    - ``jsd``: generalized JSD as in TRL's ``generalized_jsd_loss`` and Liger's ``LigerJSD`` (GKD, Agarwal et al.
      2024): with ``m = beta * p_T + (1 - beta) * p_S``, ``beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)``;
      ``beta`` weights the *teacher*. ``beta = 0`` is exactly forward KL and ``beta = 1`` exactly reverse KL (the
      endpoints are special-cased as in TRL/Liger; the mixture formula itself vanishes there). ``beta = 0.5`` is
      the symmetric JSD.
    - ``skew_forward_kl``: KL(p_T || beta * p_T + (1 - beta) * p_S) (DistiLLM, Ko et al. 2024; ``beta`` is the
      skew alpha, 0 gives forward KL, DistiLLM uses 0.1).
    - ``skew_reverse_kl``: KL(p_S || beta * p_S + (1 - beta) * p_T) (DistiLLM; 0 gives reverse KL).
    - ``tvd``: 0.5 * sum |p_T - p_S|, in [0, 1] before the T^2 factor.

    Every kind is multiplied by ``T ** 2`` (Hinton et al. 2015), so ``temperature=2`` returns 4x the divergence of
    the tempered distributions. Computed in fp32 whatever the input dtype; ``-inf`` logits (masked vocab, on one side
    or both) give finite values and gradients (see the module docstring for the convention).

    Args:
        student_logits: ``[..., V]`` (e.g. ``[B, T, V]``), any float dtype.
        teacher_logits: ``[..., V]``, same shape. Not detached here.
        kind: one of :data:`KINDS`.
        beta: JSD interpolation / DistiLLM skew, in ``[0, 1]``; ignored by the other kinds.
        temperature: softmax temperature ``T > 0`` applied to both sides.
        mask: ``[...]`` bool, True = the position counts. None = all count.
        reduction: ``"mean"`` over valid positions (all masked -> 0.0), ``"sum"`` over valid positions, or
            ``"none"`` for the per-position ``[...]`` tensor with 0 at masked positions.

    Returns:
        fp32 scalar, or ``[...]`` for ``reduction="none"``.

    Raises:
        LossArgumentError (a ValueError): unknown ``kind`` or ``reduction``; ``temperature <= 0``; ``beta``
            outside ``[0, 1]``; logits of different shapes (with a hint to slice both to the shared vocab when only
            ``V`` differs); a mask whose shape is not the logits' shape without ``V``.
    """
    check_hparams(beta, temperature, reduction)
    per_row, count, mask = _per_row(student_logits, teacher_logits, kind, beta, temperature, mask)
    return reduce(per_row, count, reduction, mask, student_logits.shape[:-1])


def check_alpha(alpha: float) -> None:
    """Refuse an ``alpha`` outside ``[0, 1]`` with the bad value in the message."""
    try:
        ok = 0.0 <= float(alpha) <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok or isinstance(alpha, bool):
        raise LossArgumentError(f"alpha must be in [0, 1], got {alpha}")
