"""A divergence computed straight from hidden states, never holding ``[N, V]`` logits for all tokens.

Over a 150k vocabulary the loss, not the model, decides memory: the fp32 logits of teacher and student for 16k tokens
take tens of GiB. :func:`fused_divergence` folds the lm_head projections into the loss and walks the tokens in
chunks (and, optionally, the vocabulary in tiles), so at any time only ``[chunk, V]`` (or ``[chunk, tile]``) logits
exist. It computes the same value and the same gradients (w.r.t. the student's hidden states, lm_head weight and
bias) as :func:`lmdistill.losses.divergence` on the projected logits, which stays the reference it is tested against.

How it works, per chunk of valid tokens (masked tokens are dropped before anything is projected):

1. Project both models' hidden states to logits (``h @ W.T + b``, then ``logit_scale``, ``softcap``, ``/T``).
2. Get each side's log-normaliser: directly when one tile spans the vocabulary, else by an online log-sum-exp over
   the tiles.
3. Get the per-token value and the per-token aggregate the gradient needs (e.g. reverse KL's gradient
   ``p_S * (log p_S - log p_T - KL)`` needs the KL itself), then the gradient w.r.t. the logits, in closed form.
4. Push that gradient through the projection at once: ``grad_h[chunk] = g @ W`` and ``grad_W += g.T @ h``.

Gradients are therefore computed *during the forward* (as Liger's fused losses do) and the backward only scales them
by the incoming gradient. With whole-vocab rows (the default) each projection and each gradient matmul runs exactly
once, as in the naive path; with vocab tiles the logits are recomputed per pass (2 passes for forward KL, 3 for the
kinds whose gradient needs a per-token aggregate) in exchange for ``[chunk, tile]`` buffers.
Two consequences: calling the loss with grad enabled but never calling ``backward`` wastes the gradient work, and
activation checkpointing that re-runs this forward would do it twice. With no input requiring grad (evaluation) the
gradient work is skipped.

The teacher never receives a gradient (distillation targets are detached by construction here).

The usual objective mixes in the ground truth, ``alpha * D + (1 - alpha) * CE``. :func:`fused_distill_loss_sums`
computes the CE of the untempered student logits inside the same chunk loop, so the student's projection runs once
for both terms; at ``T = 1`` the CE also shares the divergence's log-softmax and its gradient ``p_S - onehot`` is
added into the same buffer. A separate chunked CE would re-project the student (forward, recompute, two gradient
matmuls), which on a 49k-vocab, 6-layer student is most of a step's lm_head work.

Memory: fp32 gradient accumulators ``[V, Hs]`` and ``[N, Hs]`` (summing bf16 partial products over many chunks would
drop small contributions), plus a few ``[chunk, V]`` fp32 buffers for the chunk in flight; ``chunk_size`` trades those
against matmul efficiency. Sparse targets (a soft-label cache) take the same chunk loop: each chunk's student logits
go through the reference :func:`lmdistill.losses.sparse_divergence` and autograd on that chunk alone, so every
estimator and tail convention is the reference's by construction.

On CUDA with Triton installed, the element-wise part of step 3 runs in a Triton kernel
(:mod:`lmdistill.losses.fused_triton`) and the matmuls stay in cuBLAS; ``backend="torch"`` forces the pure-torch path.
The kernel has so far been checked only under Triton's CPU interpreter, not on a GPU (``pytest -m gpu`` and
``benchmarks/fused_loss.py`` on a CUDA machine are the outstanding checks).

Sharded training (FSDP, ZeRO-3): the lm_head weights must be whole when this runs (e.g. inside
``summon_full_params``), as the naive path's ``F.linear`` would need them; gathering them is left to the trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lmdistill.losses.divergences import LossArgumentError, check_hparams, check_kind, check_mask

REDUCTIONS = ("mean", "sum")
BACKENDS = ("auto", "torch", "triton")

# Elements per [chunk, tile] logits buffer when chunk_size is not given: large enough that the projection matmuls
# run near their peak rate (and, for Triton, that one-program-per-row fills the GPU), small enough that the few
# fp32 buffers of the torch path (none with Triton: it works in place on the bf16 logits) stay far below the naive
# [N, V] logits. The CUDA figures are educated guesses until benchmarks/fused_loss.py has run on a GPU.
_TILE_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 25, "triton": 1 << 27}


@dataclass(frozen=True)
class SparseTargets:
    """Teacher targets read from a soft-label cache, in the shape :func:`lmdistill.losses.sparse_divergence` takes.

    Attributes:
        ids: ``[..., K]`` int64 token ids (the same leading shape as the student's hidden states without ``H``);
            ``-1`` marks an absent entry.
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


@dataclass(frozen=True)
class _Head:
    """One model's projection from hidden states to logits: ``softcap(scale * (h @ weight.T + bias)) / T``."""

    weight: Tensor  # [V, H]
    bias: Tensor | None  # [V]
    scale: float
    softcap: float | None


@dataclass(frozen=True)
class _Plan:
    """Everything the autograd function needs besides the student's differentiable tensors."""

    rows: Tensor | None  # [N_valid] indices of the valid tokens in the flattened [N, Hs] hidden, None = all valid
    student_scale: float
    student_softcap: float | None
    teacher: _Head | None
    teacher_hidden: Tensor | None  # [N_valid, Ht], valid rows only, detached
    sparse: SparseTargets | None  # valid rows only, [N_valid, K]
    kind: str  # the effective kind (endpoints of jsd/skew resolved), or "zero"
    beta: float
    temperature: float
    chunk_size: int
    vocab_chunk_size: int
    backend: str  # "torch" or "triton"
    # the ground-truth cross-entropy folded into the same pass (one projection of the student instead of two):
    # the gradient handed out is that of kd_weight * T^2 * KD + ce_weight * CE
    ce_labels: Tensor | None = None  # [N_valid] int64 targets of the valid rows, ignore_index where CE skips a row
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    ignore_index: int = -100


# ----------------------------------------------------------------------------------------------------------------
# the element-wise arithmetic, on fp32 log-probabilities [n, w] (w = the vocab, or one tile of it)


def _effective_kind(kind: str, beta: float) -> str:
    """Resolve the endpoints exactly as the reference does, so no formula below meets ``log(0)``."""
    if kind == "jsd":
        return "forward_kl" if beta == 0.0 else "reverse_kl" if beta == 1.0 else "jsd"
    if kind == "skew_forward_kl":
        return "forward_kl" if beta == 0.0 else "zero" if beta == 1.0 else kind
    if kind == "skew_reverse_kl":
        return "reverse_kl" if beta == 0.0 else "zero" if beta == 1.0 else kind
    return kind


def _needs_aggregate(kind: str) -> bool:
    # The gradient of every kind but forward KL has the form p_S * (u - sum_v p_S u): it needs a full-vocab sum.
    return kind != "forward_kl"


def _terms(kind: str, beta: float, ls: Tensor, lt: Tensor, want_value: bool) -> tuple[Tensor | None, Tensor | None]:
    """Per-row divergence summed over these columns, and ``u = dD/dp_S`` per element (None for forward KL).

    The gradient w.r.t. the student's (tempered) logits is then ``p_S * (u - sum_vocab(p_S * u))``. ``ls``/``lt``
    are normalised over the *whole* vocabulary even when they hold one tile.
    """
    if kind == "forward_kl":
        value = (lt - ls).mul_(lt.exp()).sum(-1) if want_value else None
        return value, None
    if kind == "reverse_kl":
        u = ls - lt
        value = ls.exp().mul_(u).sum(-1) if want_value else None
        return value, u
    if kind == "jsd":
        lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
        u = ls - lm
        value = None
        if want_value:
            value = beta * (lt.exp() * (lt - lm)).sum(-1) + (1.0 - beta) * (ls.exp() * u).sum(-1)
        return value, u.mul_(1.0 - beta)
    if kind == "skew_forward_kl":
        lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
        d = lt - lm
        value = (lt.exp() * d).sum(-1) if want_value else None
        # p_T / m = exp(lt - lm) <= 1 / beta: bounded, never overflows
        return value, d.exp_().mul_(-(1.0 - beta))
    if kind == "skew_reverse_kl":
        lm = torch.logaddexp(ls + math.log(beta), lt + math.log1p(-beta))
        d = ls - lm
        value = (ls.exp() * d).sum(-1) if want_value else None
        # dD/dp_S = log(p_S / m) + 1 - beta * p_S / m; the constant 1 cancels in the softmax Jacobian
        return value, d - beta * d.exp()
    if kind == "tvd":
        diff = ls.exp() - lt.exp()
        value = 0.5 * diff.abs().sum(-1) if want_value else None
        return value, diff.sign_().mul_(0.5)
    raise AssertionError(f"unhandled kind {kind!r}")


def _grad_from_terms(kind: str, ls: Tensor, lt: Tensor, u: Tensor | None, aggregate: Tensor | None) -> Tensor:
    """``dD/dz_S`` for these columns, ``[n, w]`` fp32 (``z_S`` = tempered student logits).

    ``u`` and ``aggregate`` must be shifted by the same per-row constant (see :func:`_shift`); the gradient
    ``p_S * (u - sum(p_S * u))`` does not change under such a shift because ``sum(p_S) = 1``.
    """
    ps = ls.exp()
    if kind == "forward_kl":
        return ps.sub_(lt.exp())
    assert u is not None and aggregate is not None
    return ps.mul_(u.sub_(aggregate.unsqueeze(-1)))


def _shift(kind: str, beta: float, ls_top: Tensor, lt_top: Tensor) -> Tensor | None:
    """Per-row ``u`` at the student's most probable token, ``[n, 1]``, to subtract from ``u`` everywhere.

    Without it, a confident student (``p_S`` one-hot at k, ``|u_k|`` ~ 1e4 at extreme logits) gets its gradient at k
    as ``u_k - sum(p_S * u)``: two nearly equal large numbers whose fp32 difference is all round-off. After the
    shift ``u_k = 0`` exactly and the sum holds only the small terms.
    """
    if kind == "forward_kl":
        return None
    _, u_top = _terms(kind, beta, ls_top, lt_top, want_value=False)
    return u_top


# ----------------------------------------------------------------------------------------------------------------
# projections


def _project(h: Tensor, weight: Tensor, bias: Tensor | None, lo: int, hi: int) -> Tensor:
    """``h @ weight[lo:hi].T + bias[lo:hi]`` in the inputs' dtype (bf16 on GPU runs the bf16 matmul)."""
    w = weight[lo:hi]
    if bias is None:
        return h @ w.t()
    return torch.addmm(bias[lo:hi].to(h.dtype), h, w.t())


def _transform(y: Tensor, scale: float, softcap: float | None, inv_t: float) -> tuple[Tensor, Tensor | None]:
    """Linear output -> tempered fp32 logits; also returns ``tanh`` when soft-capping (its derivative needs it).

    ``y`` is a fresh projection owned by the caller, so it is transformed in place when already fp32.
    """
    z = y.float()
    if scale != 1.0:
        z.mul_(scale)
    if softcap is None:
        return (z.mul_(inv_t) if inv_t != 1.0 else z), None
    th = z.div_(softcap).tanh_()
    return th * (softcap * inv_t), th


def _chain(g: Tensor, th: Tensor | None, scale: float, factor: float) -> Tensor:
    """``dD/dz`` -> ``dD/d(h @ W.T + b)``, in place: temperature and T^2 (``factor``), softcap, logit scale."""
    if th is not None:
        # d/dy [c * tanh(y / c)] = 1 - tanh^2
        g.mul_(1.0 - th * th)
    factor = factor * scale
    return g.mul_(factor) if factor != 1.0 else g


def _ce_labels(plan: _Plan, r0: int, r1: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """This chunk's CE targets as ``(safe ids [n, 1], counted [n, 1] bool, counted as fp32 [n, 1])``, or None."""
    if plan.ce_labels is None:
        return None
    y = plan.ce_labels[r0:r1].unsqueeze(-1)
    counted = y != plan.ignore_index
    return y.clamp_min(0), counted, counted.float()


def _ce_value(log_probs: Tensor, target: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """Summed ``-log p(label)`` over counted rows of full-vocab log-probabilities ``[n, V]``."""
    ids, _, weight = target
    return -(log_probs.gather(1, ids) * weight).sum()


def _ce_rows(plan: _Plan, y: Tensor, target: tuple[Tensor, Tensor, Tensor], need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """CE of raw student rows ``y = h @ W.T + b`` ``[n, V]`` (left untouched): summed value and ``dCE/dy`` (fp32).

    Used where the divergence's own buffers cannot serve (``T != 1``, the Triton kernel, a zero divergence).
    """
    z = y.to(torch.float32, copy=True)
    z, th = _transform(z, plan.student_scale, plan.student_softcap, 1.0)
    lp = torch.log_softmax(z, dim=-1)
    del z
    value = _ce_value(lp, target)
    if not need_grad:
        return value, None
    ids, _, weight = target
    g = lp.exp_().mul_(weight).scatter_add_(1, ids, -weight)
    return value, _chain(g, th, plan.student_scale, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# the chunk loop


def _sparse_chunk(
    plan: _Plan, z_raw: Tensor, r0: int, r1: int, need_grad: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Sparse targets: the reference :func:`sparse_divergence` on this chunk's logits, differentiated by autograd.

    The teacher side is only ``[n, K]``, so the whole-vocab student row is all there is to hold; reusing the
    reference on it keeps every estimator and tail convention identical by construction. Returns the divergence sum,
    the CE sum (None without labels) and ``d(kd_weight * D + ce_weight * CE)/dz``.
    """
    from lmdistill.losses.sparse import sparse_divergence

    st = plan.sparse
    assert st is not None
    target = _ce_labels(plan, r0, r1)
    leaf = z_raw.detach().requires_grad_(need_grad)
    ce = None
    with torch.enable_grad():
        total = sparse_divergence(
            leaf,
            st.ids[r0:r1],
            st.logprobs[r0:r1],
            plan.kind,
            tail_logprob=None if st.tail_logprob is None else st.tail_logprob[r0:r1],
            target_weights=None if st.weights is None else st.weights[r0:r1],
            estimator=st.estimator,
            beta=plan.beta,
            temperature=plan.temperature,
            reduction="sum",
        )
        objective = total if plan.kd_weight == 1.0 else plan.kd_weight * total
        if target is not None:
            ce = _ce_value(torch.log_softmax(leaf.float(), dim=-1), target)
            if plan.ce_weight > 0:
                objective = objective + plan.ce_weight * ce
        grad = torch.autograd.grad(objective, leaf)[0] if need_grad else None
    return total.detach().float(), None if ce is None else ce.detach(), grad


def _combine(g_kd: Tensor, kd_weight: float, ce_grad: Tensor | None, ce_weight: float) -> Tensor:
    """``kd_weight * g_kd + ce_weight * ce_grad``, reusing one of the buffers."""
    if ce_grad is None:
        return g_kd.mul_(kd_weight) if kd_weight != 1.0 else g_kd
    return ce_grad.mul_(ce_weight).add_(g_kd, alpha=kd_weight)


def _dense_rows(
    plan: _Plan, hs: Tensor, ht: Tensor, weight: Tensor, bias: Tensor | None, need_grad: bool,
    target: tuple[Tensor, Tensor, Tensor] | None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Project whole-vocab rows and hand them to the torch or Triton arithmetic (which then own the buffers)."""
    teacher = plan.teacher
    assert teacher is not None
    vocab = weight.shape[0]
    ys = _project(hs, weight, bias, 0, vocab)
    yt = _project(ht, teacher.weight, teacher.bias, 0, vocab)
    if plan.backend == "triton":
        from lmdistill.losses.fused_triton import dense_rows_triton

        ce_value = ce_grad = None
        if target is not None:  # the kernel overwrites ys, so the CE reads it first
            ce_value, ce_grad = _ce_rows(plan, ys, target, need_grad and plan.ce_weight > 0)
        value, g = dense_rows_triton(plan, ys, yt, need_grad)
        return value, ce_value, None if g is None else _combine(g, plan.kd_weight, ce_grad, plan.ce_weight)
    bufs = [ys, yt]
    del ys, yt
    return _dense_rows_torch(plan, bufs, need_grad, target)


def _dense_rows_torch(
    plan: _Plan, bufs: list[Tensor], need_grad: bool, target: tuple[Tensor, Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Whole-vocab rows ``[n, V]``: divergence sum, CE sum (None without ``target``) and the gradient w.r.t. the
    student's linear output ``d(kd_weight * T^2 * D + ce_weight * CE)/dy_S`` (fp32), no recomputation.

    ``bufs`` holds the linear outputs ``[ys, yt]`` (``h @ W.T + b``) and is emptied: this function then holds the
    only references, so each ``[n, V]`` buffer is freed (or overwritten) as soon as it is consumed, which is what
    keeps the chunk's footprint at a few buffers. At ``T = 1`` the CE shares the divergence's student log-softmax;
    its gradient ``p_S - onehot`` is folded into the same buffer, so the CE costs a gather and a scatter.
    """
    teacher = plan.teacher
    assert teacher is not None
    inv_t = 1.0 / plan.temperature
    ys, yt = bufs
    bufs.clear()
    shared = target is not None and plan.temperature == 1.0
    ce_value = ce_grad = None
    if target is not None and not shared:
        ce_value, ce_grad = _ce_rows(plan, ys, target, need_grad and plan.ce_weight > 0)
    zs, th = _transform(ys, plan.student_scale, plan.student_softcap, inv_t)
    del ys
    ls = torch.log_softmax(zs, dim=-1)
    del zs
    if shared:
        assert target is not None
        ce_value = _ce_value(ls, target)
    zt, _ = _transform(yt, teacher.scale, teacher.softcap, inv_t)
    del yt
    lt = torch.log_softmax(zt, dim=-1)
    del zt
    value, u = _terms(plan.kind, plan.beta, ls, lt, want_value=True)
    assert value is not None
    if not need_grad:
        return value.sum(), ce_value, None
    kd_w = plan.kd_weight
    fold = shared and plan.ce_weight > 0
    # per-row CE weight [n, 1] (0 on rows whose label is ignored), or 0 when the CE gradient is not folded in here
    ce_w: Tensor | float = target[2] * plan.ce_weight if fold and target is not None else 0.0
    if u is None:  # forward KL: kd_w * (p_S - p_T) + ce_w * p_S
        ps = ls.exp_()
        if fold:
            ps.mul_(ce_w + kd_w)
        elif kd_w != 1.0:
            ps.mul_(kd_w)
        g = ps.sub_(lt.exp_(), alpha=kd_w)
    else:  # p_S * (kd_w * (u - sum p_S u) + ce_w)
        top = ls.argmax(dim=-1, keepdim=True)
        shift = _shift(plan.kind, plan.beta, ls.gather(1, top), lt.gather(1, top))
        assert shift is not None  # every kind but forward KL has one
        u.sub_(shift)
        del lt
        ps = ls.exp_()
        aggregate = (ps * u).sum(-1, keepdim=True)
        u.sub_(aggregate)
        if kd_w != 1.0:
            u.mul_(kd_w)
        if fold:
            u.add_(ce_w)
        g = ps.mul_(u)
    if fold:
        assert target is not None and isinstance(ce_w, Tensor)
        g.scatter_add_(1, target[0], -ce_w)
    g = _chain(g, th, plan.student_scale, plan.temperature)  # shared only at T = 1, where CE's factor is also 1
    return value.sum(), ce_value, g if ce_grad is None else g.add_(ce_grad, alpha=plan.ce_weight)


def _run(
    plan: _Plan, hidden: Tensor, weight: Tensor, bias: Tensor | None, needs: tuple[bool, bool, bool]
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The chunk loop.

    Returns:
        ``(divergence sum over valid tokens (times T^2), CE sum (0 without labels), grad_hidden [N, Hs],
        grad_weight [V, Hs], grad_bias [V])``; the gradients are those of ``kd_weight * D + ce_weight * CE``.
    """
    n_all, width = hidden.shape
    vocab = weight.shape[0]
    h_valid = hidden if plan.rows is None else hidden.index_select(0, plan.rows)
    n = h_valid.shape[0]
    need_h, need_w, need_b = needs
    need_grad = need_h or need_w or need_b
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)

    # fp32 accumulators: summing bf16 partial products over many chunks would lose the small contributions
    grad_h = torch.zeros((n, width), dtype=torch.float32, device=hidden.device) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_b = torch.zeros((vocab,), dtype=torch.float32, device=weight.device) if need_b else None

    def accumulate(g: Tensor, h: Tensor, r0: int, r1: int, lo: int, hi: int) -> None:
        gc = g.to(h.dtype)
        if grad_h is not None:
            if gc.dtype == torch.float32:
                grad_h[r0:r1].addmm_(gc, weight[lo:hi])
            else:
                grad_h[r0:r1].add_(gc @ weight[lo:hi])
        if grad_w is not None:
            if gc.dtype == torch.float32:
                grad_w[lo:hi].addmm_(gc.t(), h)
            else:
                grad_w[lo:hi].add_(gc.t() @ h)
        if grad_b is not None:
            grad_b[lo:hi].add_(g.sum(0, dtype=torch.float32))

    # the reference multiplies every dense kind by T^2; sparse_divergence (the sparse reference) does so itself
    value_factor = 1.0 if plan.sparse is not None else plan.temperature**2
    ce_total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    run_kd = plan.kind != "zero"
    if run_kd or plan.ce_labels is not None:
        tiled = plan.sparse is None and plan.vocab_chunk_size < vocab
        for r0 in range(0, n, plan.chunk_size):
            r1 = min(r0 + plan.chunk_size, n)
            hs = h_valid[r0:r1]
            target = _ce_labels(plan, r0, r1)
            ce_value = None
            if not run_kd:  # a divergence that is identically 0 (a skew at beta = 1): only the CE is left
                assert target is not None
                value = total.new_zeros(())
                ce_value, g = _ce_rows(plan, _project(hs, weight, bias, 0, vocab), target, need_grad)
                if g is not None:
                    accumulate(g.mul_(plan.ce_weight), hs, r0, r1, 0, vocab)
                    del g
            elif plan.sparse is not None:
                ys = _project(hs, weight, bias, 0, vocab)
                z_raw, th = _transform(ys, plan.student_scale, plan.student_softcap, 1.0)
                del ys
                value, ce_value, g = _sparse_chunk(plan, z_raw, r0, r1, need_grad)
                del z_raw
                if g is not None:
                    accumulate(_chain(g.float(), th, plan.student_scale, 1.0), hs, r0, r1, 0, vocab)
                    del g
                del th
            elif tiled:
                value, ce_value = _tiled_chunk(plan, hs, weight, bias, r0, r1, need_grad, accumulate, target)
            else:
                assert plan.teacher_hidden is not None
                value, ce_value, g = _dense_rows(plan, hs, plan.teacher_hidden[r0:r1], weight, bias, need_grad,
                                                 target)
                if g is not None:
                    accumulate(g, hs, r0, r1, 0, vocab)
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


def _tiled_chunk(
    plan: _Plan, hs: Tensor, weight: Tensor, bias: Tensor | None, r0: int, r1: int, need_grad: bool, accumulate: Any,
    target: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """One token chunk over vocab tiles: online log-sum-exp, then value/aggregate, then gradients (recomputing).

    Returns the divergence sum and the CE sum (None without ``target``); gradients go to ``accumulate``.
    """
    teacher = plan.teacher
    assert teacher is not None and plan.teacher_hidden is not None
    ht = plan.teacher_hidden[r0:r1]
    vocab, tile = weight.shape[0], plan.vocab_chunk_size
    t, inv_t = plan.temperature, 1.0 / plan.temperature
    kind, n = plan.kind, r1 - r0

    def logits(lo: int, hi: int) -> tuple[Tensor, Tensor | None, Tensor]:
        zs, th = _transform(_project(hs, weight, bias, lo, hi), plan.student_scale, plan.student_softcap, inv_t)
        zt, _ = _transform(_project(ht, teacher.weight, teacher.bias, lo, hi), teacher.scale, teacher.softcap, inv_t)
        return zs, th, zt

    def label_columns(lo: int, hi: int) -> tuple[Tensor, Tensor]:
        """Each row's label as a column of this tile (clamped) and whether it lies in the tile (and counts)."""
        assert target is not None
        local = target[0] - lo
        return local.clamp(0, hi - lo - 1), (local >= 0) & (local < hi - lo) & target[1]

    # pass 1: running (max, sum of exp(z - max)) per row for both sides (the online log-sum-exp), and the teacher's
    # logit at the student's running argmax (for _shift); with labels, the same for the untempered student logits
    # (the CE's normaliser; the tempered one serves at T = 1) and each row's label logit
    m_s = torch.full((n, 1), -math.inf, device=hs.device)
    m_t = torch.full_like(m_s, -math.inf)
    sum_s, sum_t, zt_at_top = torch.zeros_like(m_s), torch.zeros_like(m_s), torch.zeros_like(m_s)
    own_ce_norm = target is not None and t != 1.0
    m_c, sum_c, z_label = torch.full_like(m_s, -math.inf), torch.zeros_like(m_s), torch.zeros_like(m_s)
    for lo in range(0, vocab, tile):
        hi = min(lo + tile, vocab)
        zs, _, zt = logits(lo, hi)
        tile_max, tile_arg = zs.max(dim=-1, keepdim=True)
        zt_at_top = torch.where(tile_max > m_s, zt.gather(1, tile_arg), zt_at_top)
        new_m = torch.maximum(m_s, tile_max)
        sum_s = sum_s * (m_s - new_m).exp() + (zs - new_m).exp_().sum(-1, keepdim=True)
        m_s = new_m
        new_m = torch.maximum(m_t, zt.amax(dim=-1, keepdim=True))
        sum_t = sum_t * (m_t - new_m).exp() + (zt - new_m).exp_().sum(-1, keepdim=True)
        m_t = new_m
        if target is not None:
            zr = zs * t if own_ce_norm else zs
            col, inside = label_columns(lo, hi)
            z_label = torch.where(inside, zr.gather(1, col), z_label)
            if own_ce_norm:
                new_m = torch.maximum(m_c, zr.amax(dim=-1, keepdim=True))
                sum_c = sum_c * (m_c - new_m).exp() + (zr - new_m).exp_().sum(-1, keepdim=True)
                m_c = new_m
    log_sum_s, log_sum_t = sum_s.log(), sum_t.log()
    ce_norm = ce_value = None
    if target is not None:
        ce_norm = m_c + sum_c.log() if own_ce_norm else m_s + log_sum_s
        ce_value = ((ce_norm - z_label) * target[2]).sum()

    def logprobs(zs: Tensor, zt: Tensor) -> tuple[Tensor, Tensor]:
        # (z - max) - log(sum): as log_softmax does, more exact than z - logsumexp once |z| is large
        return zs.sub_(m_s).sub_(log_sum_s), zt.sub_(m_t).sub_(log_sum_t)

    shift = _shift(kind, plan.beta, -log_sum_s, (zt_at_top - m_t) - log_sum_t)

    # pass 2: the value, and the full-vocab aggregate sum(p_S * u) the gradient needs
    value = torch.zeros(n, device=hs.device)
    aggregate = torch.zeros(n, device=hs.device) if _needs_aggregate(kind) else None
    fold_value_into_grad_pass = need_grad and aggregate is None
    if not fold_value_into_grad_pass:
        for lo in range(0, vocab, tile):
            zs, _, zt = logits(lo, min(lo + tile, vocab))
            ls, lt = logprobs(zs, zt)
            v, u = _terms(kind, plan.beta, ls, lt, want_value=True)
            assert v is not None
            value += v
            if aggregate is not None and need_grad:
                assert u is not None and shift is not None  # kinds with an aggregate have both
                aggregate += (ls.exp() * u.sub_(shift)).sum(-1)
    if not need_grad:
        return value.sum(), ce_value

    # pass 3: gradients, pushed through the projection tile by tile
    for lo in range(0, vocab, tile):
        hi = min(lo + tile, vocab)
        zs, th, zt = logits(lo, hi)
        ce_grad = None
        if target is not None and ce_norm is not None and plan.ce_weight > 0:  # ce_weight * (softmax - onehot)
            col, inside = label_columns(lo, hi)
            ce_grad = (zs * t if t != 1.0 else zs.clone()).sub_(ce_norm).exp_().mul_(target[2] * plan.ce_weight)
            ce_grad.scatter_add_(1, col, inside.float().mul_(-plan.ce_weight))
        ls, lt = logprobs(zs, zt)
        v, u = _terms(kind, plan.beta, ls, lt, want_value=fold_value_into_grad_pass)
        if v is not None:
            value += v
        if u is not None:
            assert shift is not None
            u.sub_(shift)
        g = _grad_from_terms(kind, ls, lt, u, aggregate)
        # d(T^2 D)/dz_S = T * dD/dz; the CE's logits are z_S * T, so its dz-gradient is already per raw logit
        g.mul_(plan.kd_weight * t)
        if ce_grad is not None:
            g.add_(ce_grad)
        accumulate(_chain(g, th, plan.student_scale, 1.0), hs, r0, r1, lo, hi)
    return value.sum(), ce_value


class _FusedDivergence(torch.autograd.Function):
    """``kd_weight * D_sum + ce_weight * CE_sum`` over valid tokens, and both sums (not differentiable);
    gradients computed in forward, scaled in backward."""

    @staticmethod
    def forward(
        ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, plan: _Plan
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
                "fused_divergence: backward ran twice through the same loss; its gradients are computed in the "
                "forward and handed out once. Call the loss again instead of using retain_graph"
            )
        grads, ctx.grads = ctx.grads, None
        return *(None if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads), None


# ----------------------------------------------------------------------------------------------------------------
# public API


def _auto_chunk(vocab_or_tile: int, device: torch.device, backend: str) -> int:
    budget = _TILE_ELEMENTS["triton" if backend == "triton" else "cuda" if device.type == "cuda" else "cpu"]
    return max(1, budget // max(1, vocab_or_tile))


def _check_positive_int(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise LossArgumentError(f"{name} must be a positive int or None, got {value!r}")


def _check_2d_pair(name_h: str, h: Tensor, name_w: str, w: Tensor) -> None:
    if not h.is_floating_point() or not w.is_floating_point():
        raise LossArgumentError(f"{name_h} and {name_w} must be float tensors, got {h.dtype} and {w.dtype}")
    if w.dim() != 2:
        raise LossArgumentError(f"{name_w} must be [V, H], got shape {tuple(w.shape)}")
    if h.shape[-1] != w.shape[1]:
        raise LossArgumentError(
            f"{name_h} width {h.shape[-1]} does not match {name_w} [V, H] = {tuple(w.shape)}: pass the lm_head "
            f"weight of the same model as the hidden states"
        )


def _check_bias(name: str, bias: Tensor | None, vocab: int) -> None:
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise LossArgumentError(f"{name} must be [V] = ({vocab},), got shape {tuple(bias.shape)}")


def _triton_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


def _resolve_backend(backend: str, device: torch.device, dense: bool, tiled: bool) -> str:
    if backend not in BACKENDS:
        raise LossArgumentError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    usable = device.type == "cuda" and dense and not tiled and _triton_available()
    if backend == "triton" and not usable:
        raise LossArgumentError(
            "backend='triton' needs CUDA tensors, the `triton` package, a dense teacher and vocab_chunk_size=None; "
            "use backend='torch' (or 'auto') otherwise"
        )
    return "triton" if usable else "torch"


def _fused_sums(
    student_hidden: Tensor,
    student_weight: Tensor,
    *,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    sparse_targets: SparseTargets | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    backend: str = "auto",
    labels: Tensor | None = None,
    alpha: float = 1.0,
    ignore_index: int = -100,
) -> FusedLossSums:
    """The shared body of the public functions: checks, the plan, the autograd call."""
    check_kind(kind)
    check_hparams(beta, temperature, "mean")
    _check_positive_int("chunk_size", chunk_size)
    _check_positive_int("vocab_chunk_size", vocab_chunk_size)
    for name, value in (("student_logit_scale", student_logit_scale), ("teacher_logit_scale", teacher_logit_scale)):
        if not math.isfinite(value) or value == 0:
            raise LossArgumentError(f"{name} must be a finite non-zero number, got {value!r}")
    for name, cap in (("student_softcap", student_softcap), ("teacher_softcap", teacher_softcap)):
        if cap is not None and not (math.isfinite(cap) and cap > 0):
            raise LossArgumentError(f"{name} must be None or a finite number > 0, got {cap!r}")
    _check_2d_pair("student_hidden", student_hidden, "student_weight", student_weight)
    vocab, width = student_weight.shape
    _check_bias("student_bias", student_bias, vocab)

    positions = student_hidden.shape[:-1]
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

    teacher = teacher_h = sparse = None
    if (teacher_hidden is None) != (teacher_weight is None):
        raise LossArgumentError(
            "pass teacher_hidden and teacher_weight together (the teacher's hidden states and lm_head)"
        )
    if (teacher_hidden is None) == (sparse_targets is None):
        raise LossArgumentError(
            "pass exactly one target: teacher_hidden + teacher_weight (online), or sparse_targets (cache)"
        )
    if teacher_hidden is not None and teacher_weight is not None:
        _check_2d_pair("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight)
        if teacher_hidden.shape[:-1] != positions:
            raise LossArgumentError(
                f"teacher_hidden positions {tuple(teacher_hidden.shape[:-1])} must equal student_hidden positions "
                f"{tuple(positions)}"
            )
        if teacher_weight.shape[0] != vocab:
            raise LossArgumentError(
                f"student and teacher lm_heads have {vocab} and {teacher_weight.shape[0]} rows: slice both to the "
                f"shared real vocab (fused_divergence_from_models(..., n_vocab=...) does this)"
            )
        _check_bias("teacher_bias", teacher_bias, vocab)
        teacher = _Head(
            teacher_weight.detach(),
            None if teacher_bias is None else teacher_bias.detach(),
            float(teacher_logit_scale),
            None if teacher_softcap is None else float(teacher_softcap),
        )
        teacher_h = valid(teacher_hidden, (teacher_hidden.shape[-1],))
    else:
        assert sparse_targets is not None
        st = sparse_targets
        k = st.ids.shape[-1]
        if st.ids.shape[:-1] != positions or st.logprobs.shape != st.ids.shape:
            raise LossArgumentError(
                f"sparse_targets ids {tuple(st.ids.shape)} and logprobs {tuple(st.logprobs.shape)} must both be "
                f"[..., K] with the student_hidden positions {tuple(positions)}"
            )
        sparse = SparseTargets(
            ids=valid(st.ids, (k,)),
            logprobs=valid(st.logprobs, (k,)),
            tail_logprob=None if st.tail_logprob is None else valid(st.tail_logprob, ()),
            weights=None if st.weights is None else valid(st.weights, (k,)),
            estimator=st.estimator,
        )

    ce_labels = None
    if labels is not None:
        if tuple(labels.shape) != tuple(positions):
            raise LossArgumentError(
                f"labels shape {tuple(labels.shape)} must equal student_hidden positions {tuple(positions)} "
                "(the same shift as the hidden states)"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise LossArgumentError(f"labels must be an integer tensor of token ids, got {labels.dtype}")
        ce_labels = valid(labels, ())
        bad = (ce_labels != ignore_index) & ((ce_labels < 0) | (ce_labels >= vocab))
        if bool(bad.any()):
            raise LossArgumentError(
                f"labels hold ids outside the vocab [0, {vocab}) (e.g. {int(ce_labels[bad][0])}); use "
                f"{ignore_index} for positions without a target"
            )

    tile = vocab if vocab_chunk_size is None else min(vocab_chunk_size, vocab)
    tiled = sparse is None and tile < vocab
    resolved = _resolve_backend(backend, hidden.device, dense=sparse is None, tiled=tiled)
    plan = _Plan(
        rows=rows,
        student_scale=float(student_logit_scale),
        student_softcap=None if student_softcap is None else float(student_softcap),
        teacher=teacher,
        teacher_hidden=teacher_h,
        sparse=sparse,
        kind=_effective_kind(kind, beta) if sparse is None else kind,
        beta=float(beta),
        temperature=float(temperature),
        chunk_size=chunk_size or _auto_chunk(tile, hidden.device, resolved),
        vocab_chunk_size=tile,
        backend=resolved,
        ce_labels=ce_labels,
        kd_weight=float(alpha) if ce_labels is not None else 1.0,  # the CE's value is computed even at alpha = 1
        ce_weight=1.0 - float(alpha) if ce_labels is not None else 0.0,
        ignore_index=int(ignore_index),
    )
    total, kd, ce = _FusedDivergence.apply(hidden, student_weight, student_bias, plan)
    return FusedLossSums(total, kd, ce, count)


class FusedLossSums(NamedTuple):
    """What :func:`fused_distill_loss_sums` returns: a differentiable total and its parts for logging."""

    total: Tensor  # fp32 scalar alpha * kd + (1 - alpha) * ce, the one to call backward on
    kd: Tensor  # fp32 scalar divergence sum (times T^2) over the valid positions; not differentiable
    ce: Tensor  # fp32 scalar cross-entropy sum over positions with a label; not differentiable
    tokens: Tensor  # int64 scalar number of valid positions


def fused_divergence_sum_and_count(
    student_hidden: Tensor,
    student_weight: Tensor,
    *,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    sparse_targets: SparseTargets | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Sum of the divergence over valid positions and their number; see :func:`fused_divergence` for the arguments.

    The form the trainer wants: sum over micro-batches (and ranks), divide once by the global token count.

    Returns:
        ``(sum, count)``: fp32 scalar (times ``temperature ** 2``), int64 scalar.
    """
    sums = _fused_sums(
        student_hidden,
        student_weight,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        sparse_targets=sparse_targets,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        student_logit_scale=student_logit_scale,
        teacher_logit_scale=teacher_logit_scale,
        student_softcap=student_softcap,
        teacher_softcap=teacher_softcap,
        kind=kind,
        beta=beta,
        temperature=temperature,
        mask=mask,
        chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size,
        backend=backend,
    )
    return sums.total, sums.tokens


def fused_distill_loss_sums(
    student_hidden: Tensor,
    student_weight: Tensor,
    *,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    sparse_targets: SparseTargets | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    backend: str = "auto",
    labels: Tensor,
    alpha: float,
    ignore_index: int = -100,
) -> FusedLossSums:
    """``alpha * D_sum + (1 - alpha) * CE_sum`` in one pass: the student is projected once for both terms.

    The distillation objective of :func:`lmdistill.losses.mix` (before the division by the token count), with the
    ground-truth cross-entropy of the student's *untempered* logits folded into the divergence's chunk loop. Calling
    :func:`fused_divergence_sum_and_count` and a separate cross-entropy projects the student's hidden states through
    the lm_head twice (four ``[N, H] x [H, V]`` matmuls more per step); here the CE reuses the divergence's
    projection and, at ``T = 1``, its log-softmax, so it costs a gather and a scatter per chunk. Values and gradients
    equal ``alpha * divergence_sum + (1 - alpha) * cross_entropy_sum`` on materialised logits.

    Args:
        labels: ``[N]`` or ``[B, T]`` int64 targets aligned with ``student_hidden`` (already shifted);
            ``ignore_index`` where a position has no target. Positions outside ``mask`` count for neither term;
            ``mask=None`` means ``labels != ignore_index``.
        alpha: weight of the divergence, in ``[0, 1]``. Both values are always computed (for logging, and for
            co-distillation's weighting, which reads the CE); a term with weight 0 gives no gradient.
        ignore_index: the label value that means "no target".
        The other arguments are those of :func:`fused_divergence`.

    Returns:
        :class:`FusedLossSums` ``(total, kd, ce, count)``.

    Raises:
        LossArgumentError (a ValueError): as :func:`fused_divergence`; also ``alpha`` outside ``[0, 1]``, labels whose
            shape differs from the positions, or label ids outside the vocabulary.
    """
    from lmdistill.losses.objective import check_alpha

    check_alpha(alpha)
    if tuple(labels.shape) != tuple(student_hidden.shape[:-1]):
        raise LossArgumentError(
            f"labels shape {tuple(labels.shape)} must equal student_hidden positions "
            f"{tuple(student_hidden.shape[:-1])} (the same shift as the hidden states)"
        )
    if mask is None:
        mask = labels != ignore_index
    return _fused_sums(
        student_hidden,
        student_weight,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        sparse_targets=sparse_targets,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        student_logit_scale=student_logit_scale,
        teacher_logit_scale=teacher_logit_scale,
        student_softcap=student_softcap,
        teacher_softcap=teacher_softcap,
        kind=kind,
        beta=beta,
        temperature=temperature,
        mask=mask,
        chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size,
        backend=backend,
        labels=labels,
        alpha=alpha,
        ignore_index=ignore_index,
    )


def fused_divergence(
    student_hidden: Tensor,
    student_weight: Tensor,
    *,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    sparse_targets: SparseTargets | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """:func:`lmdistill.losses.divergence` of the projected logits, without materialising them for all tokens.

    The logits of each model are ``softcap(logit_scale * (hidden @ weight.T + bias)) / temperature`` with
    ``softcap(y) = c * tanh(y / c)`` (Gemma 2's ``final_logit_softcapping``), and the value is the reference
    divergence of those logits, times ``temperature ** 2``. Give exactly one target: the teacher's hidden states and
    lm_head (online distillation; widths may differ, the vocabulary rows must be the shared real vocab), or
    ``sparse_targets`` read from a soft-label cache (then the value is
    :func:`lmdistill.losses.sparse_divergence` of the student logits).

    Gradients flow to ``student_hidden``, ``student_weight`` and ``student_bias`` (those that require grad), never to
    the teacher. They are computed in this call (see the module docstring), so memory peaks here, not in backward.

    Args:
        student_hidden: ``[N, Hs]`` or ``[B, T, Hs]``, the student's last hidden states (after the final norm).
        student_weight: ``[V, Hs]`` the student's lm_head weight, sliced to the shared vocab.
        teacher_hidden: ``[N, Ht]`` or ``[B, T, Ht]``, the teacher's last hidden states (detached here).
        teacher_weight: ``[V, Ht]`` the teacher's lm_head weight, same ``V`` rows as the student's.
        sparse_targets: cached top-k / sampled teacher targets instead of a teacher.
        student_bias: ``[V]`` lm_head bias, or None.
        teacher_bias: ``[V]`` lm_head bias, or None.
        student_logit_scale: multiplies the student's linear output (Cohere's ``logit_scale``; Granite's
            ``1 / logits_scaling``).
        teacher_logit_scale: the same for the teacher.
        student_softcap: final logit soft-capping of the student, or None.
        teacher_softcap: final logit soft-capping of the teacher, or None.
        kind: one of :data:`lmdistill.losses.KINDS`.
        beta: JSD interpolation / DistiLLM skew in ``[0, 1]`` (same convention as the reference).
        temperature: ``T > 0``; the value is multiplied by ``T ** 2``.
        mask: ``[N]`` or ``[B, T]`` bool, True where a position counts. Masked positions are never projected.
        reduction: ``"mean"`` over valid positions (all masked -> 0.0) or ``"sum"`` (the trainer divides by a global
            token count; see :func:`fused_divergence_sum_and_count`). ``"none"`` is not offered: the gradient is
            folded into the weights during the forward, which needs a scalar output.
        chunk_size: tokens per chunk; None picks about 8M (CPU) / 32M (CUDA) logits per buffer.
        vocab_chunk_size: vocab columns per tile; None (the default and the fastest) projects whole-vocab rows once.
            A smaller tile bounds memory by ``chunk_size * vocab_chunk_size`` at the cost of recomputing the
            projections (dense teacher only; ignored with ``sparse_targets``).
        backend: ``"auto"`` (Triton on CUDA when installed, else torch), ``"torch"``, or ``"triton"``.

    Returns:
        fp32 scalar.

    Raises:
        LossArgumentError (a ValueError): an unknown ``kind``, ``reduction`` or ``backend``; ``temperature <= 0``; ``beta`` outside
            ``[0, 1]``; mismatched shapes (hidden width vs weight, teacher vs student positions or vocab rows, mask);
            both or neither of the teacher and ``sparse_targets``.
    """
    if reduction not in REDUCTIONS:
        raise LossArgumentError(
            f"fused_divergence supports reduction 'mean' or 'sum', got {reduction!r}; for per-position values use "
            "lmdistill.losses.divergence on materialised logits"
        )
    total, count = fused_divergence_sum_and_count(
        student_hidden,
        student_weight,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        sparse_targets=sparse_targets,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        student_logit_scale=student_logit_scale,
        teacher_logit_scale=teacher_logit_scale,
        student_softcap=student_softcap,
        teacher_softcap=teacher_softcap,
        kind=kind,
        beta=beta,
        temperature=temperature,
        mask=mask,
        chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size,
        backend=backend,
    )
    if reduction == "sum":
        return total
    return total / count.clamp_min(1).to(total.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face models


@dataclass(frozen=True)
class HeadSpec:
    """A causal LM's projection to logits, as :func:`fused_divergence` takes it.

    Attributes:
        weight: ``[n_vocab, H]`` lm_head weight rows of the real vocab (a view: gradients reach the parameter,
            tied input embeddings included).
        bias: ``[n_vocab]`` or None.
        logit_scale: multiplier of the linear output (1.0 for most models).
        softcap: ``final_logit_softcapping`` or None.
    """

    weight: Tensor
    bias: Tensor | None
    logit_scale: float
    softcap: float | None


def lm_head_spec(model: torch.nn.Module, n_vocab: int) -> HeadSpec:
    """Read a causal LM's lm_head (tied or not), sliced to the first ``n_vocab`` rows, and its logit post-processing.

    Embedding matrices are often padded past the tokenizer (e.g. Qwen2.5: 151,936 rows for 151,665 tokens); only the
    first ``n_vocab`` rows are real tokens, and the two models must agree on them.

    Args:
        model: a Hugging Face ``*ForCausalLM`` (optionally wrapped by PEFT).
        n_vocab: the shared real vocabulary size.

    Raises:
        LossArgumentError (a ValueError): the model has no output embeddings, its lm_head carries an adapter (the fused path would ignore
            the adapter's delta), or it has fewer than ``n_vocab`` rows.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise LossArgumentError(
            f"{type(model).__name__} has no lm_head (get_output_embeddings() returned {head!r}); the fused loss needs "
            f"a *ForCausalLM model"
        )
    if hasattr(head, "base_layer"):
        raise LossArgumentError(
            "the lm_head carries an adapter (e.g. LoRA on lm_head); the fused loss reads the base weight only. "
            "Leave lm_head out of the adapter's target_modules, or use the reference (non-fused) loss"
        )
    weight = head.weight
    if weight.shape[0] < n_vocab:
        raise LossArgumentError(
            f"{type(model).__name__} lm_head has {weight.shape[0]} rows, fewer than n_vocab={n_vocab}: the "
            f"tokenizers do not share a vocab of that size"
        )
    bias = getattr(head, "bias", None)
    config = getattr(model, "config", None)
    if config is not None and callable(getattr(config, "get_text_config", None)):
        config = config.get_text_config()
    scale = 1.0
    if config is not None:
        if getattr(config, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
            scale = float(config.logit_scale)
        if getattr(config, "logits_scaling", None) is not None:  # Granite: logits / logits_scaling
            scale = 1.0 / float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None) if config is not None else None
    return HeadSpec(
        weight=weight[:n_vocab],
        bias=None if bias is None else bias[:n_vocab],
        logit_scale=scale,
        softcap=None if softcap is None else float(softcap),
    )


def last_hidden_states(
    model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any
) -> Tensor:
    """Run a causal LM's decoder only (no lm_head): the ``[B, T, H]`` hidden states the fused loss projects.

    Calling the full model would materialise ``[B, T, V]`` logits, the very tensor the fused loss avoids.
    """
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None:
        raise LossArgumentError(f"{type(model).__name__} has no get_decoder(); pass its last hidden states yourself")
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def fused_divergence_from_models(
    student_model: torch.nn.Module,
    student_hidden: Tensor,
    teacher_model: torch.nn.Module | None = None,
    teacher_hidden: Tensor | None = None,
    *,
    n_vocab: int,
    sparse_targets: SparseTargets | None = None,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "sum",
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """:func:`fused_divergence` with the lm_heads, biases, logit scales and softcaps read from the models.

    Typical online step (the student's gradient reaches its lm_head, tied embeddings included)::

        h_s = last_hidden_states(student, ids, attn)[:, :-1]
        with torch.no_grad():
            h_t = last_hidden_states(teacher, ids, attn)[:, :-1]
        kd_sum = fused_divergence_from_models(student, h_s, teacher, h_t, n_vocab=n, mask=valid, reduction="sum")

    Args:
        student_model: the student ``*ForCausalLM``.
        student_hidden: ``[B, T, Hs]`` its last hidden states.
        teacher_model: the teacher ``*ForCausalLM``, or None with ``sparse_targets``.
        teacher_hidden: ``[B, T, Ht]`` its last hidden states, or None with ``sparse_targets``.
        n_vocab: the shared real vocab; only the first ``n_vocab`` lm_head rows of each model count.
        sparse_targets: cached targets instead of a teacher.
        kind, beta, temperature, mask, reduction, chunk_size, vocab_chunk_size, backend: as :func:`fused_divergence`
            (``reduction`` defaults to ``"sum"`` here: the trainer normalises by a global token count).

    Raises:
        LossArgumentError (a ValueError): as :func:`lm_head_spec` and :func:`fused_divergence`.
    """
    s = lm_head_spec(student_model, n_vocab)
    t = lm_head_spec(teacher_model, n_vocab) if teacher_model is not None else None
    if sparse_targets is not None and (teacher_model is not None or teacher_hidden is not None):
        raise LossArgumentError("pass either a teacher (model + hidden states) or sparse_targets, not both")
    return fused_divergence(
        student_hidden,
        s.weight,
        teacher_hidden=teacher_hidden,
        teacher_weight=None if t is None else t.weight,
        sparse_targets=sparse_targets,
        student_bias=s.bias,
        teacher_bias=None if t is None else t.bias,
        student_logit_scale=s.logit_scale,
        teacher_logit_scale=1.0 if t is None else t.logit_scale,
        student_softcap=s.softcap,
        teacher_softcap=None if t is None else t.softcap,
        kind=kind,
        beta=beta,
        temperature=temperature,
        mask=mask,
        reduction=reduction,
        chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size,
        backend=backend,
    )
