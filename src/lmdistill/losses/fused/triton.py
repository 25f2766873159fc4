"""Triton kernel for the element-wise part of a dense chunk of :func:`lmdistill.losses.fused_loss` on CUDA.

The projections and the gradient matmuls stay in cuBLAS (the chunk loop in :mod:`lmdistill.losses.fused.function`);
this kernel replaces the dozen torch element-wise ops per ``[chunk, V]`` block with one program per token row that
streams the row three times (less for forward KL) and writes the gradient over the student's logits in place:

1. online log-sum-exp of both sides, and the teacher's logit at the student's argmax (for the shift below);
2. the per-row value and the aggregate ``sum_v p_S u`` that the gradient ``p_S (u - sum p_S u)`` needs (kinds other
   than forward KL), with ``u`` shifted by its value at the student's argmax as in the torch path;
3. ``dD/dy_S`` (temperature, softcap and logit scale chained in), stored over ``ys``.

Same arithmetic, same order of reasoning as the torch path (``terms``, ``shift`` and ``dense_rows_torch`` in
:mod:`lmdistill.losses.fused.rows`); the test suite checks it against that path on CUDA (``pytest -m gpu``) and, on
any machine with the ``triton`` package, through Triton's CPU interpreter (``TRITON_INTERPRET=1``).

Imported lazily, only with ``backend="triton"``: importing :mod:`lmdistill.losses` never imports ``triton``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from lmdistill.losses.fused.plan import Plan

KIND_IDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "skew_forward_kl": 3, "skew_reverse_kl": 4, "tvd": 5}
BLOCK = 2048


@triton.jit
def _tempered(y, scale, softcap, inv_t, HAS_CAP: tl.constexpr):
    """Linear output (fp32) -> tempered logit, and tanh (for the softcap derivative; 0 without a cap)."""
    y = y * scale
    if HAS_CAP:
        # tanh(x) = 2 * sigmoid(2x) - 1
        th = 2.0 * tl.sigmoid(2.0 * y / softcap) - 1.0
        z = softcap * th * inv_t
    else:
        th = tl.zeros_like(y)
        z = y * inv_t
    return z, th


@triton.jit
def _logaddexp(a, b):
    top = tl.maximum(a, b)
    return top + tl.log(tl.exp(a - top) + tl.exp(b - top))


@triton.jit
def _value_and_u(ls, lt, beta, log_b, log1m_b, KIND: tl.constexpr):
    """Per-element divergence term and u = dD/dp_S (u unused for forward KL), as ``terms`` in rows.py."""
    ps = tl.exp(ls)
    pt = tl.exp(lt)
    if KIND == 0:
        value = pt * (lt - ls)
        u = tl.zeros_like(ls)
    elif KIND == 1:
        u = ls - lt
        value = ps * u
    elif KIND == 2:
        lm = _logaddexp(lt + log_b, ls + log1m_b)
        value = beta * pt * (lt - lm) + (1.0 - beta) * ps * (ls - lm)
        u = (1.0 - beta) * (ls - lm)
    elif KIND == 3:
        lm = _logaddexp(lt + log_b, ls + log1m_b)
        value = pt * (lt - lm)
        u = -(1.0 - beta) * tl.exp(lt - lm)
    elif KIND == 4:
        lm = _logaddexp(ls + log_b, lt + log1m_b)
        d = ls - lm
        value = ps * d
        u = d - beta * tl.exp(d)
    else:
        diff = ps - pt
        value = 0.5 * tl.abs(diff)
        u = tl.where(diff > 0, 0.5, tl.where(diff < 0, -0.5, 0.0))
    return value, u


@triton.jit
def _fused_rows_kernel(
    ys_ptr,
    yt_ptr,
    value_ptr,
    n_cols,
    stride_s,
    stride_t,
    s_scale,
    s_cap,
    t_scale,
    t_cap,
    inv_t,
    beta,
    log_b,
    log1m_b,
    grad_factor,
    KIND: tl.constexpr,
    S_CAP: tl.constexpr,
    T_CAP: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    VALUE_PASS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = ys_ptr + row * stride_s
    t_row = yt_ptr + row * stride_t
    cols = tl.arange(0, BLOCK_SIZE)

    # pass 1: online log-sum-exp of both sides; teacher logit at the student's running argmax
    m_s = tl.full((), -float("inf"), tl.float32)
    m_t = tl.full((), -float("inf"), tl.float32)
    sum_s = tl.full((), 0.0, tl.float32)
    sum_t = tl.full((), 0.0, tl.float32)
    zt_top = tl.full((), 0.0, tl.float32)
    for start in range(0, n_cols, BLOCK_SIZE):
        offs = start + cols
        ok = offs < n_cols
        zs, _ = _tempered(tl.load(s_row + offs, mask=ok, other=0.0).to(tl.float32), s_scale, s_cap, inv_t, S_CAP)
        zt, _ = _tempered(tl.load(t_row + offs, mask=ok, other=0.0).to(tl.float32), t_scale, t_cap, inv_t, T_CAP)
        zs = tl.where(ok, zs, -float("inf"))
        zt = tl.where(ok, zt, -float("inf"))
        blk_max = tl.max(zs, axis=0)
        blk_arg = tl.argmax(zs, axis=0)
        zt_at = tl.sum(tl.where(cols == blk_arg, zt, 0.0), axis=0)
        zt_top = tl.where(blk_max > m_s, zt_at, zt_top)
        new_m = tl.maximum(m_s, blk_max)
        sum_s = sum_s * tl.exp(m_s - new_m) + tl.sum(tl.exp(zs - new_m), axis=0)
        m_s = new_m
        new_m = tl.maximum(m_t, tl.max(zt, axis=0))
        sum_t = sum_t * tl.exp(m_t - new_m) + tl.sum(tl.exp(zt - new_m), axis=0)
        m_t = new_m
    log_sum_s = tl.log(sum_s)
    log_sum_t = tl.log(sum_t)
    _, shift = _value_and_u(-log_sum_s, (zt_top - m_t) - log_sum_t, beta, log_b, log1m_b, KIND)

    # pass 2: value and the aggregate sum_v p_S (u - shift) (forward KL folds its value into pass 3 instead)
    value = tl.full((), 0.0, tl.float32)
    aggregate = tl.full((), 0.0, tl.float32)
    if VALUE_PASS:
        for start in range(0, n_cols, BLOCK_SIZE):
            offs = start + cols
            ok = offs < n_cols
            zs, _ = _tempered(tl.load(s_row + offs, mask=ok, other=0.0).to(tl.float32), s_scale, s_cap, inv_t, S_CAP)
            zt, _ = _tempered(tl.load(t_row + offs, mask=ok, other=0.0).to(tl.float32), t_scale, t_cap, inv_t, T_CAP)
            ls = (zs - m_s) - log_sum_s
            lt = (zt - m_t) - log_sum_t
            v, u = _value_and_u(ls, lt, beta, log_b, log1m_b, KIND)
            value += tl.sum(tl.where(ok, v, 0.0), axis=0)
            aggregate += tl.sum(tl.where(ok, tl.exp(ls) * (u - shift), 0.0), axis=0)

    # pass 3: dD/dy_S over the student's row, in place
    if NEED_GRAD:
        for start in range(0, n_cols, BLOCK_SIZE):
            offs = start + cols
            ok = offs < n_cols
            zs, th = _tempered(tl.load(s_row + offs, mask=ok, other=0.0).to(tl.float32), s_scale, s_cap, inv_t, S_CAP)
            zt, _ = _tempered(tl.load(t_row + offs, mask=ok, other=0.0).to(tl.float32), t_scale, t_cap, inv_t, T_CAP)
            ls = (zs - m_s) - log_sum_s
            lt = (zt - m_t) - log_sum_t
            ps = tl.exp(ls)
            if KIND == 0:
                value += tl.sum(tl.where(ok, tl.exp(lt) * (lt - ls), 0.0), axis=0)
                g = ps - tl.exp(lt)
            else:
                _, u = _value_and_u(ls, lt, beta, log_b, log1m_b, KIND)
                g = ps * ((u - shift) - aggregate)
            if S_CAP:
                g = g * (1.0 - th * th)
            g = g * grad_factor
            tl.store(s_row + offs, g.to(ys_ptr.dtype.element_ty), mask=ok)
    tl.store(value_ptr + row, value)


def dense_rows_triton(plan: Plan, ys: Tensor, yt: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """As ``rows.dense_rows_torch`` without the CE: ``(sum of D over the rows, dD/dy_S [n, V] or None)``.

    ``ys`` is overwritten with the gradient (in its own dtype) when ``need_grad``.
    """
    teacher = plan.teacher
    assert teacher is not None
    if ys.stride(-1) != 1:
        ys = ys.contiguous()
    if yt.stride(-1) != 1:
        yt = yt.contiguous()
    n, vocab = ys.shape
    kind = KIND_IDS[plan.kind]
    beta = plan.beta
    # only the mixture kinds take logs of beta; they never see the endpoints (resolved to the plain KLs before)
    log_b = math.log(beta) if 0.0 < beta < 1.0 else 0.0
    log1m_b = math.log1p(-beta) if 0.0 < beta < 1.0 else 0.0
    values = torch.empty(n, dtype=torch.float32, device=ys.device)
    if n:
        _fused_rows_kernel[(n,)](
            ys, yt, values, vocab, ys.stride(0), yt.stride(0),
            plan.student_scale, plan.student_softcap or 1.0, teacher.scale, teacher.softcap or 1.0,
            1.0 / plan.temperature, beta, log_b, log1m_b,
            # d(T^2 D)/dy = T^2 * (1/T) * dD/dz * scale (softcap's factor is applied in the kernel)
            plan.temperature * plan.student_scale,
            KIND=kind, S_CAP=plan.student_softcap is not None, T_CAP=teacher.softcap is not None,
            NEED_GRAD=need_grad, VALUE_PASS=kind != 0 or not need_grad,
            BLOCK_SIZE=min(BLOCK, triton.next_power_of_2(vocab)), num_warps=8,
        )  # fmt: skip
    return values.sum(), (ys if need_grad else None)
