"""The torch arithmetic of one chunk of whole-vocab rows: values and gradients w.r.t. the student's logits.

Dense teacher: :func:`dense_rows_torch` (closed-form gradients, see :func:`terms`). Sparse targets:
:func:`sparse_chunk` (the reference :func:`lmdistill.losses.sparse_divergence` and autograd on the chunk). The folded
cross-entropy: :func:`ce_rows`, or shared with the divergence's log-softmax at ``T = 1``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lmdistill.losses.fused.plan import Plan
from lmdistill.losses.sparse import sparse_divergence

# (safe label ids [n, 1], counted [n, 1] bool, counted as fp32 [n, 1]) of one chunk
CeTarget = tuple[Tensor, Tensor, Tensor]


def effective_kind(kind: str, beta: float) -> str:
    """Resolve the endpoints exactly as the reference does, so no formula below meets ``log(0)``."""
    if kind == "jsd":
        return "forward_kl" if beta == 0.0 else "reverse_kl" if beta == 1.0 else "jsd"
    if kind == "skew_forward_kl":
        return "forward_kl" if beta == 0.0 else "zero" if beta == 1.0 else kind
    if kind == "skew_reverse_kl":
        return "reverse_kl" if beta == 0.0 else "zero" if beta == 1.0 else kind
    return kind


def terms(kind: str, beta: float, ls: Tensor, lt: Tensor, want_value: bool) -> tuple[Tensor | None, Tensor | None]:
    """Per-row divergence and ``u = dD/dp_S`` per element (None for forward KL), on fp32 log-probs ``[n, V]``.

    The gradient w.r.t. the student's (tempered) logits is then ``p_S * (u - sum_vocab(p_S * u))``.
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


def shift(kind: str, beta: float, ls_top: Tensor, lt_top: Tensor) -> Tensor | None:
    """Per-row ``u`` at the student's most probable token, ``[n, 1]``, to subtract from ``u`` everywhere.

    Without it, a confident student (``p_S`` one-hot at k, ``|u_k|`` ~ 1e4 at extreme logits) gets its gradient at k
    as ``u_k - sum(p_S * u)``: two nearly equal large numbers whose fp32 difference is all round-off. After the
    shift ``u_k = 0`` exactly and the sum holds only the small terms; the gradient ``p_S * (u - sum(p_S * u))`` does
    not change under a per-row shift because ``sum(p_S) = 1``.
    """
    if kind == "forward_kl":
        return None
    _, u_top = terms(kind, beta, ls_top, lt_top, want_value=False)
    return u_top


def project(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``h @ weight.T + bias`` in the inputs' dtype (bf16 on GPU runs the bf16 matmul)."""
    if bias is None:
        return h @ weight.t()
    return torch.addmm(bias.to(h.dtype), h, weight.t())


def transform(y: Tensor, scale: float, softcap: float | None, inv_t: float) -> tuple[Tensor, Tensor | None]:
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


def chain(g: Tensor, th: Tensor | None, scale: float, factor: float) -> Tensor:
    """``dD/dz`` -> ``dD/d(h @ W.T + b)``, in place: temperature and T^2 (``factor``), softcap, logit scale."""
    if th is not None:
        # d/dy [c * tanh(y / c)] = 1 - tanh^2
        g.mul_(1.0 - th * th)
    factor = factor * scale
    return g.mul_(factor) if factor != 1.0 else g


def ce_target(plan: Plan, r0: int, r1: int) -> CeTarget | None:
    """This chunk's CE targets (see :data:`CeTarget`), or None without labels."""
    if plan.ce_labels is None:
        return None
    y = plan.ce_labels[r0:r1].unsqueeze(-1)
    counted = y != plan.ignore_index
    return y.clamp_min(0), counted, counted.float()


def ce_value(log_probs: Tensor, target: CeTarget) -> Tensor:
    """Summed ``-log p(label)`` over counted rows of full-vocab log-probabilities ``[n, V]``."""
    ids, _, weight = target
    return -(log_probs.gather(1, ids) * weight).sum()


def ce_rows(plan: Plan, y: Tensor, target: CeTarget, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """CE of raw student rows ``y = h @ W.T + b`` ``[n, V]`` (left untouched): summed value and ``dCE/dy`` (fp32).

    Used where the divergence's own buffers cannot serve (``T != 1``, the Triton kernel, a zero divergence).
    """
    z = y.to(torch.float32, copy=True)
    z, th = transform(z, plan.student_scale, plan.student_softcap, 1.0)
    lp = torch.log_softmax(z, dim=-1)
    del z
    value = ce_value(lp, target)
    if not need_grad:
        return value, None
    ids, _, weight = target
    g = lp.exp_().mul_(weight).scatter_add_(1, ids, -weight)
    return value, chain(g, th, plan.student_scale, 1.0)


def combine(g_kd: Tensor, kd_weight: float, ce_grad: Tensor | None, ce_weight: float) -> Tensor:
    """``kd_weight * g_kd + ce_weight * ce_grad``, reusing one of the buffers."""
    if ce_grad is None:
        return g_kd.mul_(kd_weight) if kd_weight != 1.0 else g_kd
    return ce_grad.mul_(ce_weight).add_(g_kd, alpha=kd_weight)


def sparse_chunk(
    plan: Plan, z_raw: Tensor, r0: int, r1: int, need_grad: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Sparse targets: the reference :func:`sparse_divergence` on this chunk's logits, differentiated by autograd.

    The teacher side is only ``[n, K]``, so the whole-vocab student row is all there is to hold; reusing the
    reference on it keeps every estimator and tail convention identical by construction. Returns the divergence sum,
    the CE sum (None without labels) and ``d(kd_weight * D + ce_weight * CE)/dz``.
    """
    st = plan.sparse
    assert st is not None
    target = ce_target(plan, r0, r1)
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
            ce = ce_value(torch.log_softmax(leaf.float(), dim=-1), target)
            if plan.ce_weight > 0:
                objective = objective + plan.ce_weight * ce
        grad = torch.autograd.grad(objective, leaf)[0] if need_grad else None
    return total.detach().float(), None if ce is None else ce.detach(), grad


def dense_rows_torch(
    plan: Plan, bufs: list[Tensor], need_grad: bool, target: CeTarget | None = None
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
    ce_sum = ce_grad = None
    if target is not None and not shared:
        ce_sum, ce_grad = ce_rows(plan, ys, target, need_grad and plan.ce_weight > 0)
    zs, th = transform(ys, plan.student_scale, plan.student_softcap, inv_t)
    del ys
    ls = torch.log_softmax(zs, dim=-1)
    del zs
    if shared:
        assert target is not None
        ce_sum = ce_value(ls, target)
    zt, _ = transform(yt, teacher.scale, teacher.softcap, inv_t)
    del yt
    lt = torch.log_softmax(zt, dim=-1)
    del zt
    value, u = terms(plan.kind, plan.beta, ls, lt, want_value=True)
    assert value is not None
    if not need_grad:
        return value.sum(), ce_sum, None
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
        u_top = shift(plan.kind, plan.beta, ls.gather(1, top), lt.gather(1, top))
        assert u_top is not None  # every kind but forward KL has one
        u.sub_(u_top)
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
    g = chain(g, th, plan.student_scale, plan.temperature)  # shared only at T = 1, where CE's factor is also 1
    return value.sum(), ce_sum, g if ce_grad is None else g.add_(ce_grad, alpha=plan.ce_weight)
