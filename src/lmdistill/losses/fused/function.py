""":func:`fused_loss`: argument checks, the :class:`Plan`, the chunk loop and the autograd function around it."""

from __future__ import annotations

import importlib.util
import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lmdistill.losses.divergences import LossArgumentError, check_alpha, check_hparams, check_kind, check_mask
from lmdistill.losses.fused.plan import Plan
from lmdistill.losses.fused.rows import (
    CeTarget,
    ce_rows,
    ce_target,
    chain,
    combine,
    dense_rows_torch,
    effective_kind,
    project,
    sparse_chunk,
    transform,
)
from lmdistill.losses.head import Head
from lmdistill.losses.sparse import SparseTargets

BACKENDS = ("auto", "torch", "triton")

# Elements per [chunk, V] logits buffer when chunk_size is not given: large enough that the projection matmuls run
# near their peak rate (and, for Triton, that one-program-per-row fills the GPU), small enough that the few fp32
# buffers of the torch path (none with Triton: it works in place on the bf16 logits) stay far below the naive [N, V]
# logits. The CUDA figures are untuned guesses (benchmarks/fused_loss.py measures them).
_TILE_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 25, "triton": 1 << 27}


class FusedLossSums(NamedTuple):
    """What :func:`fused_loss` returns: a differentiable total and its parts for logging, as sums over tokens."""

    total: Tensor  # fp32 scalar alpha * kd + (1 - alpha) * ce (kd without labels), the one to call backward on
    kd: Tensor  # fp32 scalar divergence sum (times T^2) over the valid positions; not differentiable
    ce: Tensor  # fp32 scalar cross-entropy sum over positions with a label (0 without labels); not differentiable
    tokens: Tensor  # int64 scalar number of valid positions


# ----------------------------------------------------------------------------------------------------------------
# the chunk loop


def _dense_rows(
    plan: Plan, hs: Tensor, ht: Tensor, weight: Tensor, bias: Tensor | None, need_grad: bool, target: CeTarget | None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Project whole-vocab rows and hand them to the torch or Triton arithmetic (which then own the buffers)."""
    teacher = plan.teacher
    assert teacher is not None
    ys = project(hs, weight, bias)
    yt = project(ht, teacher.weight, teacher.bias)
    if plan.backend == "triton":
        from lmdistill.losses.fused.triton import dense_rows_triton

        ce_value = ce_grad = None
        if target is not None:  # the kernel overwrites ys, so the CE reads it first
            ce_value, ce_grad = ce_rows(plan, ys, target, need_grad and plan.ce_weight > 0)
        value, g = dense_rows_triton(plan, ys, yt, need_grad)
        return value, ce_value, None if g is None else combine(g, plan.kd_weight, ce_grad, plan.ce_weight)
    bufs = [ys, yt]
    del ys, yt
    return dense_rows_torch(plan, bufs, need_grad, target)


def _run(
    plan: Plan, hidden: Tensor, weight: Tensor, bias: Tensor | None, needs: tuple[bool, bool, bool]
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The chunk loop.

    Returns:
        ``(divergence sum over valid tokens (times T^2), CE sum (0 without labels), grad_hidden [N, Hs],
        grad_weight [V, Hs], grad_bias [V])``; the gradients are those of ``kd_weight * D + ce_weight * CE``.
    """
    n_all, width = hidden.shape
    h_valid = hidden if plan.rows is None else hidden.index_select(0, plan.rows)
    n = h_valid.shape[0]
    need_h, need_w, need_b = needs
    need_grad = need_h or need_w or need_b
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    ce_total = torch.zeros((), dtype=torch.float32, device=hidden.device)

    # fp32 accumulators: summing bf16 partial products over many chunks would lose the small contributions
    grad_h = torch.zeros((n, width), dtype=torch.float32, device=hidden.device) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_b = torch.zeros((weight.shape[0],), dtype=torch.float32, device=weight.device) if need_b else None

    def accumulate(g: Tensor, h: Tensor, r0: int, r1: int) -> None:
        gc = g.to(h.dtype)
        if grad_h is not None:
            if gc.dtype == torch.float32:
                grad_h[r0:r1].addmm_(gc, weight)
            else:
                grad_h[r0:r1].add_(gc @ weight)
        if grad_w is not None:
            if gc.dtype == torch.float32:
                grad_w.addmm_(gc.t(), h)
            else:
                grad_w.add_(gc.t() @ h)
        if grad_b is not None:
            grad_b.add_(g.sum(0, dtype=torch.float32))

    # the reference multiplies every dense kind by T^2; sparse_divergence (the sparse reference) does so itself
    value_factor = 1.0 if plan.sparse is not None else plan.temperature**2
    run_kd = plan.kind != "zero"
    n_run = n if run_kd or plan.ce_labels is not None else 0  # a zero divergence without labels: nothing to compute
    for r0 in range(0, n_run, plan.chunk_size):
        r1 = min(r0 + plan.chunk_size, n)
        hs = h_valid[r0:r1]
        target = ce_target(plan, r0, r1)
        ce_value = g = None
        if not run_kd:  # a divergence that is identically 0 (a skew at beta = 1): only the CE is left
            assert target is not None
            value = total.new_zeros(())
            ce_value, g = ce_rows(plan, project(hs, weight, bias), target, need_grad)
            if g is not None:
                g.mul_(plan.ce_weight)
        elif plan.sparse is not None:
            z_raw, th = transform(project(hs, weight, bias), plan.student_scale, plan.student_softcap, 1.0)
            value, ce_value, g = sparse_chunk(plan, z_raw, r0, r1, need_grad)
            del z_raw
            if g is not None:
                g = chain(g.float(), th, plan.student_scale, 1.0)
            del th
        else:
            assert plan.teacher_hidden is not None
            value, ce_value, g = _dense_rows(plan, hs, plan.teacher_hidden[r0:r1], weight, bias, need_grad, target)
        if g is not None:
            accumulate(g, hs, r0, r1)
            del g
        total += value * value_factor
        if ce_value is not None:
            ce_total += ce_value

    if grad_h is not None and plan.rows is not None:
        full = torch.zeros((n_all, width), dtype=torch.float32, device=hidden.device)
        grad_h = full.index_copy_(0, plan.rows, grad_h)
    return (
        total,
        ce_total,
        None if grad_h is None else grad_h.to(hidden.dtype),
        None if grad_w is None else grad_w.to(weight.dtype),
        None if grad_b is None or bias is None else grad_b.to(bias.dtype),
    )


class _FusedLoss(torch.autograd.Function):
    """``kd_weight * D_sum + ce_weight * CE_sum`` over valid tokens, and both sums (not differentiable);
    gradients computed in forward, scaled in backward."""

    @staticmethod
    def forward(
        ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, plan: Plan
    ) -> tuple[Tensor, Tensor, Tensor]:
        needs: tuple[bool, bool, bool] = tuple(ctx.needs_input_grad[:3])
        kd, ce, grad_h, grad_w, grad_b = _run(plan, hidden, weight, bias, needs)
        # kept on ctx rather than save_for_backward: backward scales them in place (no second [V, H] copy)
        ctx.grads = (grad_h, grad_w, grad_b)
        total = kd.clone() if plan.ce_labels is None else plan.kd_weight * kd + plan.ce_weight * ce
        ctx.mark_non_differentiable(kd, ce)
        return total, kd, ce

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError(
                "fused_loss: backward ran twice through the same loss; its gradients are computed in the "
                "forward and handed out once. Call the loss again instead of using retain_graph"
            )
        grads, ctx.grads = ctx.grads, None
        return *(None if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads), None


# ----------------------------------------------------------------------------------------------------------------
# checks


def _check_positive_int(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise LossArgumentError(f"{name} must be a positive int or None, got {value!r}")


def _check_head(side: str, hidden: Tensor, head: Head) -> Head:
    """Refuse a malformed head or one that does not fit ``hidden``; returns it with plain float scale and softcap."""
    if not isinstance(head, Head):
        raise LossArgumentError(
            f"{side}_head must be a lmdistill.losses.Head (weight [V, H], bias, scale, softcap), got "
            f"{type(head).__name__}; lmdistill.models.lm_head(model, n_vocab) reads one from a model"
        )
    w, name = head.weight, f"{side}_head.weight"
    if not hidden.is_floating_point() or not w.is_floating_point():
        raise LossArgumentError(f"{side}_hidden and {name} must be float tensors, got {hidden.dtype} and {w.dtype}")
    if w.dim() != 2:
        raise LossArgumentError(f"{name} must be [V, H], got shape {tuple(w.shape)}")
    if hidden.shape[-1] != w.shape[1]:
        raise LossArgumentError(
            f"{side}_hidden width {hidden.shape[-1]} does not match {name} [V, H] = {tuple(w.shape)}: pass the "
            f"lm_head of the same model as the hidden states"
        )
    if head.bias is not None and tuple(head.bias.shape) != (w.shape[0],):
        raise LossArgumentError(f"{side}_head.bias must be [V] = ({w.shape[0]},), got shape {tuple(head.bias.shape)}")
    if not math.isfinite(head.scale) or head.scale == 0:
        raise LossArgumentError(f"{side}_head.scale must be a finite non-zero number, got {head.scale!r}")
    if head.softcap is not None and not (math.isfinite(head.softcap) and head.softcap > 0):
        raise LossArgumentError(f"{side}_head.softcap must be None or a finite number > 0, got {head.softcap!r}")
    return Head(head.weight, head.bias, float(head.scale), None if head.softcap is None else float(head.softcap))


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


def resolve_backend(backend: str, device: torch.device, dense: bool) -> str:
    """``"torch"`` or ``"triton"``: ``"auto"`` is the torch path; ``"triton"`` only where the kernel can run."""
    if backend not in BACKENDS:
        raise LossArgumentError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if backend != "triton":
        return "torch"
    if not (device.type == "cuda" and dense and _triton_available()):
        raise LossArgumentError(
            "backend='triton' needs CUDA tensors, the `triton` package and a dense teacher (not sparse targets); "
            f"got {device.type} tensors, triton {'found' if _triton_available() else 'not usable'}, "
            f"{'a dense teacher' if dense else 'sparse targets'}. Use backend='torch' (or 'auto') otherwise"
        )
    return "triton"


# ----------------------------------------------------------------------------------------------------------------
# the entry point


def fused_loss(
    student_hidden: Tensor,
    student_head: Head,
    *,
    teacher_hidden: Tensor | None = None,
    teacher_head: Head | None = None,
    sparse: SparseTargets | None = None,
    labels: Tensor | None = None,
    alpha: float = 1.0,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
    ignore_index: int = -100,
) -> FusedLossSums:
    """Distillation loss sums from hidden states and output layers, never holding ``[N, V]`` logits for all tokens.

    Each model's logits are ``head.logits(hidden) / temperature`` (see :class:`lmdistill.losses.Head`); the
    divergence is the reference :func:`lmdistill.losses.divergence` of those logits times ``temperature ** 2``, or
    :func:`lmdistill.losses.sparse_divergence` of the student's against ``sparse`` targets. With ``labels`` the
    ground-truth cross-entropy of the student's *untempered* logits is computed in the same chunk loop (the student
    is projected once for both terms; at ``T = 1`` it also shares the log-softmax), and ``total`` is
    ``alpha * kd + (1 - alpha) * ce``; without labels ``total`` is ``kd`` and ``ce`` is 0. Values and gradients equal
    those of the same sums on materialised logits.

    Gradients flow to ``student_hidden`` and the student head's weight and bias (those that require grad), never to
    the teacher. They are computed in this call (see :mod:`lmdistill.losses.fused`), so memory peaks here, not in
    backward, and ``backward`` may run only once per call.

    Args:
        student_hidden: ``[B, T, Hs]`` or ``[N, Hs]``, the student's last hidden states (after the final norm).
        student_head: the student's output layer, rows = the shared real vocab (``lmdistill.models.lm_head``).
        teacher_hidden: ``[B, T, Ht]`` or ``[N, Ht]``, the online teacher's last hidden states (detached here).
        teacher_head: the teacher's output layer, the same ``V`` rows as the student's (detached here).
        sparse: cached / API top-k or sampled teacher targets ``[..., K]`` instead of a teacher.
        labels: ``[B, T]`` or ``[N]`` int64 ground-truth ids aligned with ``student_hidden`` (already shifted),
            ``ignore_index`` where a position has no target; None = the divergence only.
        alpha: weight of the divergence in ``[0, 1]`` (``1 - alpha`` is the CE's); must be 1 without labels. Both
            sums are always computed (for logging); a term with weight 0 gives no gradient.
        kind: one of :data:`lmdistill.losses.KINDS`.
        beta: JSD interpolation / DistiLLM skew in ``[0, 1]`` (same convention as the reference).
        temperature: ``T > 0``; the divergence is multiplied by ``T ** 2``; the CE is untempered.
        mask: ``[B, T]`` or ``[N]`` bool, True where a position counts (for both terms); masked positions are never
            projected. Default: ``labels != ignore_index`` with labels, else every position.
        chunk_size: tokens per chunk; None picks about 8M (CPU) / 32M (CUDA) logits per buffer.
        backend: ``"auto"`` (the torch path on every device; the Triton kernel is opt-in), ``"torch"``, or
            ``"triton"`` (CUDA tensors, the ``triton`` package and a dense teacher; refused otherwise).
        ignore_index: the label value that means "no target".

    Returns:
        :class:`FusedLossSums` ``(total, kd, ce, tokens)``: sums over the valid positions, not means (the trainer
        divides once by a global token count).

    Raises:
        LossArgumentError (a ValueError): an unknown ``kind`` or ``backend``; ``temperature <= 0``; ``beta`` or
            ``alpha`` outside ``[0, 1]``; ``alpha != 1`` without labels; a malformed head or one whose width differs
            from its hidden states; teacher and student positions or vocab rows that differ; a bad mask; both or
            neither of the teacher and ``sparse``; labels that are not integer ids of the positions' shape or lie
            outside the vocab.
    """
    check_kind(kind)
    check_hparams(beta, temperature, "mean")
    check_alpha(alpha)
    _check_positive_int("chunk_size", chunk_size)
    student = _check_head("student", student_hidden, student_head)
    vocab, width = student.weight.shape
    positions = student_hidden.shape[:-1]
    if labels is None and float(alpha) != 1.0:
        raise LossArgumentError(
            f"alpha={alpha} gives a cross-entropy term weight {1 - float(alpha)}, but labels is None: pass the "
            "labels, or alpha=1.0 for the divergence alone"
        )
    if labels is not None:
        if tuple(labels.shape) != tuple(positions):
            raise LossArgumentError(
                f"labels shape {tuple(labels.shape)} must equal student_hidden positions {tuple(positions)} "
                "(the same shift as the hidden states)"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise LossArgumentError(f"labels must be an integer tensor of token ids, got {labels.dtype}")
        if mask is None:
            mask = labels != ignore_index

    mask = check_mask(mask, positions, what="student_hidden")
    hidden = student_hidden.reshape(-1, width)
    rows = None
    if mask is not None:
        flat = mask.reshape(-1)
        count = flat.sum()
        if not bool(flat.all()):
            rows = flat.nonzero().squeeze(-1)
    else:
        count = torch.tensor(hidden.shape[0], device=hidden.device)

    def valid(t: Tensor, tail: tuple[int, ...]) -> Tensor:
        t = t.detach().reshape(-1, *tail)
        return t if rows is None else t.index_select(0, rows)

    teacher = teacher_h = valid_sparse = None
    if (teacher_hidden is None) != (teacher_head is None):
        raise LossArgumentError(
            "pass teacher_hidden and teacher_head together (the teacher's hidden states and lm_head)"
        )
    if (teacher_hidden is None) == (sparse is None):
        raise LossArgumentError(
            "pass exactly one target: teacher_hidden + teacher_head (online), or sparse (cache / API targets)"
        )
    if teacher_hidden is not None and teacher_head is not None:
        teacher = _check_head("teacher", teacher_hidden, teacher_head).detached()
        if teacher_hidden.shape[:-1] != positions:
            raise LossArgumentError(
                f"teacher_hidden positions {tuple(teacher_hidden.shape[:-1])} must equal student_hidden positions "
                f"{tuple(positions)}"
            )
        if teacher.weight.shape[0] != vocab:
            raise LossArgumentError(
                f"student and teacher heads have {vocab} and {teacher.weight.shape[0]} rows: slice both to the "
                f"shared real vocab (lmdistill.models.lm_head(model, n_vocab) does this)"
            )
        teacher_h = valid(teacher_hidden, (teacher_hidden.shape[-1],))
    else:
        assert sparse is not None
        k = sparse.ids.shape[-1]
        if sparse.ids.shape[:-1] != positions or sparse.logprobs.shape != sparse.ids.shape:
            raise LossArgumentError(
                f"sparse ids {tuple(sparse.ids.shape)} and logprobs {tuple(sparse.logprobs.shape)} must both be "
                f"[..., K] with the student_hidden positions {tuple(positions)}"
            )
        valid_sparse = SparseTargets(
            ids=valid(sparse.ids, (k,)),
            logprobs=valid(sparse.logprobs, (k,)),
            tail_logprob=None if sparse.tail_logprob is None else valid(sparse.tail_logprob, ()),
            weights=None if sparse.weights is None else valid(sparse.weights, (k,)),
            estimator=sparse.estimator,
        )

    ce_labels = None
    if labels is not None:
        ce_labels = valid(labels, ())
        bad = (ce_labels != ignore_index) & ((ce_labels < 0) | (ce_labels >= vocab))
        if bool(bad.any()):
            raise LossArgumentError(
                f"labels hold ids outside the vocab [0, {vocab}) (e.g. {int(ce_labels[bad][0])}); use "
                f"{ignore_index} for positions without a target"
            )

    resolved = resolve_backend(backend, hidden.device, dense=valid_sparse is None)
    budget = _TILE_ELEMENTS["triton" if resolved == "triton" else "cuda" if hidden.device.type == "cuda" else "cpu"]
    plan = Plan(
        rows=rows,
        student_scale=student.scale,
        student_softcap=student.softcap,
        teacher=teacher,
        teacher_hidden=teacher_h,
        sparse=valid_sparse,
        kind=effective_kind(kind, beta) if valid_sparse is None else kind,
        beta=float(beta),
        temperature=float(temperature),
        chunk_size=chunk_size or max(1, budget // max(1, vocab)),
        backend=resolved,
        ce_labels=ce_labels,
        kd_weight=float(alpha) if ce_labels is not None else 1.0,  # the CE's value is computed even at alpha = 1
        ce_weight=1.0 - float(alpha) if ce_labels is not None else 0.0,
        ignore_index=int(ignore_index),
    )
    total, kd, ce = _FusedLoss.apply(hidden, student.weight, student.bias, plan)
    return FusedLossSums(total, kd, ce, count)
