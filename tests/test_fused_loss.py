"""`fused_loss`, the chunked loss from hidden states and heads, equals the reference on materialised logits.

The reference is :func:`lmdistill.losses.divergence` (and ``sparse_divergence``, and ``cross_entropy`` for the
folded CE) on the projected logits; both compute in fp32, so the tolerances below are fp32 round-off (bf16 inputs get
bf16 tolerances). Values *and* gradients are compared. Every test draws its own inputs from a seed derived from its
name, so no two tests share data and a failure reproduces.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import zlib

import pytest
import torch

from lmdistill.losses import (
    KINDS,
    FusedLossSums,
    Head,
    LossArgumentError,
    SparseTargets,
    divergence,
    fused_loss,
    sparse_divergence,
)
from lmdistill.losses.divergences import divergence_from_logprobs

V = 101  # prime: never a multiple of a token chunk
HS, HT = 16, 24  # student and teacher widths differ


def _gen(request: pytest.FixtureRequest) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))


def _inputs(g: torch.Generator, n: int = 45, dtype: torch.dtype = torch.float32, bias: bool = True) -> dict:
    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    return {
        # scaled so the logits spread over a few nats, as trained models' do
        "hs": rnd(n, HS).requires_grad_(),
        "ws": rnd(V, HS, scale=0.6).requires_grad_(),
        "bs": rnd(V, scale=0.5).requires_grad_() if bias else None,
        "ht": rnd(n, HT),
        "wt": rnd(V, HT, scale=0.6),
        "bt": rnd(V, scale=0.5) if bias else None,
        "mask": torch.rand(n, generator=g) > 0.25,
    }


def _teacher(x: dict, ht: torch.Tensor | None = None, **head: float) -> dict:
    """The teacher keywords of fused_loss for these inputs."""
    return {"teacher_hidden": x["ht"] if ht is None else ht, "teacher_head": Head(x["wt"], x["bt"], **head)}


def _mean(sums: FusedLossSums) -> torch.Tensor:
    """Mean over the valid positions (all masked -> 0), to hold the loss to a mean-reduced reference."""
    return sums.total / sums.tokens.clamp_min(1).to(sums.total.dtype)


def _logits(h, w, b=None, scale=1.0, softcap=None):
    y = h @ w.t()
    if b is not None:
        y = y + b
    y = y * scale
    return y if softcap is None else softcap * torch.tanh(y / softcap)


def _grads(out: torch.Tensor, tensors: list) -> list:
    tensors = [t for t in tensors if t is not None]
    return list(torch.autograd.grad(out, tensors))


def _assert_close(got, want, rtol=2e-5, atol=2e-6):
    for a, b in zip(got, want, strict=True):
        scale = b.abs().max().item()
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol * max(scale, 1.0))


# ----------------------------------------------------------------------------------------------------------------
# dense teacher


@pytest.mark.parametrize("kind", KINDS)
def test_dense_value_and_grads_match_reference(request, kind):
    x = _inputs(_gen(request))
    kw = dict(kind=kind, beta=0.3, temperature=2.0, mask=x["mask"])
    ref = divergence(_logits(x["hs"], x["ws"], x["bs"]), _logits(x["ht"], x["wt"], x["bt"]), **kw)
    sums = fused_loss(x["hs"], Head(x["ws"], x["bs"]), chunk_size=7, backend="torch", **_teacher(x), **kw)
    # without labels the total is the divergence alone and the CE is 0
    assert torch.equal(sums.total.detach(), sums.kd) and sums.ce.item() == 0.0
    assert sums.tokens.item() == int(x["mask"].sum())
    got = _mean(sums)
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-6)
    params = [x["hs"], x["ws"], x["bs"]]
    _assert_close(_grads(got, params), _grads(ref, params))


@pytest.mark.parametrize(
    ("kind", "beta"),
    [("jsd", 0.0), ("jsd", 1.0), ("skew_forward_kl", 0.0), ("skew_forward_kl", 1.0), ("skew_reverse_kl", 0.0),
     ("skew_reverse_kl", 1.0), ("jsd", 0.9), ("skew_reverse_kl", 0.1)],
)  # fmt: skip
def test_beta_endpoints_match_reference(request, kind, beta):
    x = _inputs(_gen(request), bias=False)
    ref = divergence(_logits(x["hs"], x["ws"]), _logits(x["ht"], x["wt"]), kind, beta=beta)
    got = _mean(fused_loss(x["hs"], Head(x["ws"]), kind=kind, beta=beta, **_teacher(x)))
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-6)
    _assert_close(_grads(got, [x["hs"], x["ws"]]), _grads(ref, [x["hs"], x["ws"]]))


@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "tvd"])
def test_logit_scale_and_softcap_on_both_sides(request, kind):
    x = _inputs(_gen(request))
    s_logits = _logits(x["hs"], x["ws"], x["bs"], scale=1.7, softcap=3.0)
    t_logits = _logits(x["ht"], x["wt"], x["bt"], scale=0.5, softcap=2.0)
    ref = divergence(s_logits, t_logits, kind, temperature=0.7, mask=x["mask"])
    got = _mean(fused_loss(x["hs"], Head(x["ws"], x["bs"], scale=1.7, softcap=3.0), kind=kind, temperature=0.7,
                           mask=x["mask"], chunk_size=9, **_teacher(x, scale=0.5, softcap=2.0)))  # fmt: skip
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-6)
    params = [x["hs"], x["ws"], x["bs"]]
    _assert_close(_grads(got, params), _grads(ref, params))


def test_batched_hidden_and_mask_give_sums(request):
    g = _gen(request)
    b, t = 3, 11
    hs = torch.randn(b, t, HS, generator=g, requires_grad=True)
    ws = torch.randn(V, HS, generator=g, requires_grad=True)
    ht, wt = torch.randn(b, t, HT, generator=g), torch.randn(V, HT, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.4
    ref = divergence(hs @ ws.t(), ht @ wt.t(), "reverse_kl", mask=mask, reduction="sum")
    total, _, _, count = fused_loss(hs, Head(ws), teacher_hidden=ht, teacher_head=Head(wt), kind="reverse_kl",
                                    mask=mask, chunk_size=4)  # fmt: skip
    assert count.item() == mask.sum().item()
    torch.testing.assert_close(total, ref, rtol=2e-5, atol=1e-5)
    grads = _grads(total, [hs, ws])
    _assert_close(grads, _grads(ref, [hs, ws]))
    assert grads[0][~mask].abs().max() == 0  # masked positions get exactly no gradient


def test_all_masked_is_zero_with_zero_grads(request):
    x = _inputs(_gen(request))
    sums = fused_loss(x["hs"], Head(x["ws"]), mask=torch.zeros_like(x["mask"]), **_teacher(x))
    assert sums.total.item() == 0.0 and sums.tokens.item() == 0
    gh, gw = _grads(sums.total, [x["hs"], x["ws"]])
    assert gh.abs().max() == 0 and gw.abs().max() == 0


def test_backward_scales_by_incoming_gradient_and_no_grad_skips_it(request):
    x = _inputs(_gen(request), bias=False)
    kw = dict(kind="jsd", **_teacher(x))
    g1 = _grads(fused_loss(x["hs"], Head(x["ws"]), **kw).total, [x["hs"], x["ws"]])
    g3 = _grads(3.0 * fused_loss(x["hs"], Head(x["ws"]), **kw).total, [x["hs"], x["ws"]])
    _assert_close(g3, [3.0 * g for g in g1])
    with torch.no_grad():
        value = fused_loss(x["hs"], Head(x["ws"]), **kw).total
    assert not value.requires_grad
    torch.testing.assert_close(value, fused_loss(x["hs"], Head(x["ws"]), **kw).total.detach())


def test_second_backward_is_refused_with_a_clear_message(request):
    x = _inputs(_gen(request), bias=False)
    loss = fused_loss(x["hs"], Head(x["ws"]), **_teacher(x)).total
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_only_the_weight_requires_grad(request):
    x = _inputs(_gen(request), bias=False)
    hs = x["hs"].detach()
    got = _mean(fused_loss(hs, Head(x["ws"]), kind="skew_forward_kl", **_teacher(x)))
    ref = divergence(_logits(hs, x["ws"]), _logits(x["ht"], x["wt"]), "skew_forward_kl")
    _assert_close(_grads(got, [x["ws"]]), _grads(ref, [x["ws"]]))


@pytest.mark.parametrize("kind", KINDS)
def test_extreme_logits_stay_finite_and_exact(request, kind):
    x = _inputs(_gen(request), bias=False)
    hs = (x["hs"].detach() * 3e3).requires_grad_()  # logits of order 1e4: every softmax is one-hot
    ht = x["ht"] * -3e3
    got = _mean(fused_loss(hs, Head(x["ws"]), kind=kind, beta=0.5, **_teacher(x, ht=ht)))
    grads = _grads(got, [hs, x["ws"]])
    assert torch.isfinite(got) and all(torch.isfinite(g).all() for g in grads)
    ref = divergence(_logits(hs, x["ws"]), _logits(ht, x["wt"]), kind, beta=0.5)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # At logits ~1e4 the fp32 projection alone is off by ~1e-3 absolute, so gradients (differences of such logits)
    # carry ~1e-4 relative error whatever the loss does. Hold them to the reference definition evaluated in float64
    # (gradients that are exactly ~0 must come out ~0, which the fp32 reference itself does not always manage).
    h64, w64 = hs.detach().double().requires_grad_(), x["ws"].detach().double().requires_grad_()
    ls, lt = _logits(h64, w64).log_softmax(-1), _logits(ht.double(), x["wt"].double()).log_softmax(-1)
    exact = _grads(divergence_from_logprobs(ls, lt, kind, 0.5).mean(), [h64, w64])
    for g, e in zip(grads, exact, strict=True):
        assert (g.double() - e).norm() <= 1e-3 * e.norm() + 1e-7, (kind, (g.double() - e).norm(), e.norm())


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_bf16_inputs_within_bf16_tolerance(request, kind):
    x = _inputs(_gen(request), n=64, dtype=torch.bfloat16, bias=False)
    sums = fused_loss(x["hs"], Head(x["ws"]), kind=kind, chunk_size=16, **_teacher(x))
    assert sums.total.dtype == torch.float32 and sums.kd.dtype == torch.float32
    got = _mean(sums)
    # the reference on the bf16 projections the fused path also computes (bf16 matmul, fp32 softmax)
    ref = divergence(x["hs"] @ x["ws"].t(), x["ht"] @ x["wt"].t(), kind)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    got_g, ref_g = _grads(got, [x["hs"], x["ws"]]), _grads(ref, [x["hs"], x["ws"]])
    assert got_g[0].dtype == torch.bfloat16 and got_g[1].dtype == torch.bfloat16
    _assert_close(got_g, ref_g, rtol=2e-2, atol=2e-2)


def test_chunk_sizes_do_not_change_the_result(request):
    x = _inputs(_gen(request), bias=False)
    kw = dict(kind="tvd", mask=x["mask"], **_teacher(x))
    base = fused_loss(x["hs"], Head(x["ws"]), **kw).total
    for chunk in [1, 5, 1000, 23]:
        got = fused_loss(x["hs"], Head(x["ws"]), chunk_size=chunk, **kw).total
        torch.testing.assert_close(got, base, rtol=1e-5, atol=1e-6)


def test_errors_name_the_problem(request):
    x = _inputs(_gen(request), bias=False)
    hs, head, teacher = x["hs"], Head(x["ws"]), _teacher(x)
    with pytest.raises(ValueError, match="teacher_hidden width 24 does not match teacher_head.weight"):
        fused_loss(hs, head, teacher_hidden=x["ht"], teacher_head=head)
    with pytest.raises(ValueError, match="exactly one target"):
        fused_loss(hs, head)
    with pytest.raises(ValueError, match="teacher_hidden and teacher_head together"):
        fused_loss(hs, head, teacher_hidden=x["ht"])
    with pytest.raises(ValueError, match="shared real vocab"):
        fused_loss(hs, head, teacher_hidden=x["ht"], teacher_head=Head(x["wt"][:50]))
    with pytest.raises(ValueError, match="teacher_hidden positions"):
        fused_loss(hs, head, teacher_hidden=x["ht"][:40], teacher_head=teacher["teacher_head"])
    with pytest.raises(ValueError, match="unknown divergence kind"):
        fused_loss(hs, head, kind="kl", **teacher)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        fused_loss(hs, head, temperature=0.0, **teacher)
    with pytest.raises(ValueError, match="beta must be in"):
        fused_loss(hs, head, beta=1.5, **teacher)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_loss(hs, head, chunk_size=0, **teacher)
    with pytest.raises(ValueError, match="unknown backend"):
        fused_loss(hs, head, backend="cuda", **teacher)
    with pytest.raises(ValueError, match="mask shape"):
        fused_loss(hs, head, mask=x["mask"][:40], **teacher)
    with pytest.raises(ValueError, match="student_head must be a lmdistill.losses.Head"):
        fused_loss(hs, x["ws"], **teacher)  # the pre-Head calling convention: a weight tensor
    with pytest.raises(ValueError, match="student_head.bias must be"):
        fused_loss(hs, Head(x["ws"], torch.zeros(V + 1)), **teacher)
    with pytest.raises(ValueError, match="student_head.scale must be a finite non-zero"):
        fused_loss(hs, Head(x["ws"], scale=0.0), **teacher)
    with pytest.raises(ValueError, match="teacher_head.softcap must be None or a finite number > 0"):
        fused_loss(hs, head, teacher_hidden=x["ht"], teacher_head=Head(x["wt"], softcap=-1.0))
    with pytest.raises(ValueError, match="labels is None"):  # a CE weight without labels would be silently dropped
        fused_loss(hs, head, alpha=0.5, **teacher)


def test_auto_backend_is_the_torch_path_and_triton_is_opt_in(request, monkeypatch):
    from lmdistill.losses.fused import function

    x = _inputs(_gen(request), bias=False)
    calls = []
    torch_rows = function.dense_rows_torch
    monkeypatch.setattr(function, "dense_rows_torch", lambda *a, **k: calls.append(1) or torch_rows(*a, **k))
    fused_loss(x["hs"], Head(x["ws"]), backend="auto", **_teacher(x))
    assert calls  # the torch row arithmetic ran
    # auto stays on torch even where the kernel could run; "triton" asks for it
    monkeypatch.setattr(function, "_triton_available", lambda: True)
    cuda = torch.device("cuda")
    assert function.resolve_backend("auto", cuda, dense=True) == "torch"
    assert function.resolve_backend("triton", cuda, dense=True) == "triton"
    with pytest.raises(LossArgumentError, match="dense teacher"):
        function.resolve_backend("triton", cuda, dense=False)
    with pytest.raises(LossArgumentError, match="backend='triton' needs CUDA tensors"):
        fused_loss(x["hs"], Head(x["ws"]), backend="triton", **_teacher(x))  # CPU tensors


# ----------------------------------------------------------------------------------------------------------------
# sparse targets (a soft-label cache): the reference is sparse_divergence on the projected student logits


def _topk_targets(g: torch.Generator, n: int, k: int, tail: bool, absent: bool) -> SparseTargets:
    teacher_lp = torch.log_softmax(torch.randn(n, V, generator=g) * 2, dim=-1)
    lp, ids = teacher_lp.topk(k, dim=-1)
    if absent:  # some positions hold fewer than K entries
        drop = torch.rand(n, k, generator=g) < 0.2
        drop[:, 0] = False
        ids, lp = ids.masked_fill(drop, -1), lp.masked_fill(drop, 0.0)
    tail_lp = torch.log1p(-lp.exp().masked_fill(ids < 0, 0).sum(-1).clamp(max=1 - 1e-6)) if tail else None
    return SparseTargets(ids=ids, logprobs=lp, tail_logprob=tail_lp)


def _sampled_targets(g: torch.Generator, n: int, draws: int) -> SparseTargets:
    teacher_lp = torch.log_softmax(torch.randn(n, V, generator=g) * 2, dim=-1)
    sample = torch.multinomial(teacher_lp.exp(), draws, replacement=True, generator=g)
    counts = torch.zeros(n, V).scatter_add_(1, sample, torch.ones(n, draws))
    k = int((counts > 0).sum(-1).max())
    w, ids = counts.topk(k, dim=-1)
    ids = ids.masked_fill(w == 0, -1)
    lp = teacher_lp.gather(1, ids.clamp_min(0)).masked_fill(ids < 0, 0.0)
    return SparseTargets(ids=ids, logprobs=lp, weights=w / draws, estimator="sampled")


def _check_sparse(x: dict, targets: SparseTargets, kind: str, **kw) -> None:
    ref = sparse_divergence(
        _logits(x["hs"], x["ws"], x["bs"], scale=1.3, softcap=4.0), targets.ids, targets.logprobs, kind,
        tail_logprob=targets.tail_logprob, target_weights=targets.weights, estimator=targets.estimator,
        mask=x["mask"], **kw,
    )  # fmt: skip
    got = _mean(fused_loss(x["hs"], Head(x["ws"], x["bs"], scale=1.3, softcap=4.0), sparse=targets, kind=kind,
                           mask=x["mask"], chunk_size=6, **kw))  # fmt: skip
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-6)
    params = [x["hs"], x["ws"], x["bs"]]
    _assert_close(_grads(got, params), _grads(ref, params))


@pytest.mark.parametrize("tail", [True, False], ids=["tail", "no_tail"])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_sparse_topk_matches_reference(request, kind, tail):
    g = _gen(request)
    x = _inputs(g)
    _check_sparse(x, _topk_targets(g, 45, k=8, tail=tail, absent=True), kind, beta=0.4, temperature=1.5)


def test_sparse_sampled_matches_reference(request):
    g = _gen(request)
    x = _inputs(g)
    _check_sparse(x, _sampled_targets(g, 45, draws=12), "forward_kl", temperature=2.0)


def test_sparse_batched_shapes_and_errors(request):
    g = _gen(request)
    hs = torch.randn(3, 5, HS, generator=g, requires_grad=True)
    ws = torch.randn(V, HS, generator=g)
    flat = _topk_targets(g, 15, k=4, tail=True, absent=False)
    targets = SparseTargets(ids=flat.ids.view(3, 5, 4), logprobs=flat.logprobs.view(3, 5, 4),
                            tail_logprob=flat.tail_logprob.view(3, 5))  # fmt: skip
    got = fused_loss(hs, Head(ws), sparse=targets).total
    ref = sparse_divergence(hs @ ws.t(), targets.ids, targets.logprobs, tail_logprob=targets.tail_logprob,
                            reduction="sum")  # fmt: skip
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-5)
    _assert_close(_grads(got, [hs]), _grads(ref, [hs]))
    with pytest.raises(ValueError, match="exactly one target"):
        fused_loss(hs, Head(ws), sparse=targets, teacher_hidden=hs.detach(), teacher_head=Head(ws))
    with pytest.raises(ValueError, match="student_hidden positions"):
        fused_loss(hs[:, :4], Head(ws), sparse=targets)
    with pytest.raises(LossArgumentError, match="dense teacher"):
        fused_loss(hs, Head(ws), sparse=targets, backend="triton")


# ----------------------------------------------------------------------------------------------------------------
# the ground-truth cross-entropy folded into the same pass


def _labels(g: torch.Generator, n: int) -> torch.Tensor:
    labels = torch.randint(0, V, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.2] = -100  # some rows inside the mask have no target
    return labels


def _ce_reference(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[mask], labels[mask], ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("alpha", [0.0, 0.35, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 1.7], ids=["T1", "T1.7"])
@pytest.mark.parametrize("kind", KINDS)
def test_folded_ce_matches_divergence_plus_cross_entropy(request, kind, temperature, alpha):
    g = _gen(request)
    x = _inputs(g)
    labels = _labels(g, 45)
    s_logits = _logits(x["hs"], x["ws"], x["bs"], scale=1.2, softcap=6.0)
    t_logits = _logits(x["ht"], x["wt"], x["bt"])
    kd_ref = divergence(s_logits, t_logits, kind, beta=0.3, temperature=temperature, mask=x["mask"], reduction="sum")
    ce_ref = _ce_reference(s_logits, labels, x["mask"])
    got = fused_loss(x["hs"], Head(x["ws"], x["bs"], scale=1.2, softcap=6.0), kind=kind, beta=0.3,
                     temperature=temperature, mask=x["mask"], chunk_size=7, labels=labels, alpha=alpha,
                     **_teacher(x))  # fmt: skip
    torch.testing.assert_close(got.kd, kd_ref.detach(), rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(got.ce, ce_ref.detach(), rtol=2e-5, atol=1e-5)  # computed even at alpha = 1
    assert got.tokens.item() == int(x["mask"].sum())
    want = alpha * kd_ref + (1 - alpha) * ce_ref
    torch.testing.assert_close(got.total, want, rtol=2e-5, atol=1e-5)
    assert not got.kd.requires_grad and not got.ce.requires_grad
    params = [x["hs"], x["ws"], x["bs"]]
    _assert_close(_grads(got.total, params), _grads(want, params))


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
def test_folded_ce_with_sparse_targets(request, kind):
    g = _gen(request)
    x = _inputs(g)
    labels = _labels(g, 45)
    targets = _topk_targets(g, 45, k=8, tail=True, absent=True)
    s_logits = _logits(x["hs"], x["ws"], x["bs"])
    kd_ref = sparse_divergence(s_logits, targets.ids, targets.logprobs, kind, tail_logprob=targets.tail_logprob,
                               temperature=1.5, mask=x["mask"], reduction="sum")  # fmt: skip
    want = 0.6 * kd_ref + 0.4 * _ce_reference(s_logits, labels, x["mask"])
    got = fused_loss(x["hs"], Head(x["ws"], x["bs"]), sparse=targets, kind=kind, temperature=1.5, mask=x["mask"],
                     chunk_size=6, labels=labels, alpha=0.6)  # fmt: skip
    torch.testing.assert_close(got.total, want, rtol=2e-5, atol=1e-5)
    params = [x["hs"], x["ws"], x["bs"]]
    _assert_close(_grads(got.total, params), _grads(want, params))


def test_folded_ce_when_the_divergence_is_identically_zero(request):
    # skew forward KL at beta = 1 is KL(p_T || p_T) = 0: only the CE term is left, and it must still train
    g = _gen(request)
    x = _inputs(g)
    labels = _labels(g, 45)
    got = fused_loss(x["hs"], Head(x["ws"]), kind="skew_forward_kl", beta=1.0, labels=labels, alpha=0.5,
                     chunk_size=10, teacher_hidden=x["ht"], teacher_head=Head(x["wt"]))  # fmt: skip
    want = 0.5 * torch.nn.functional.cross_entropy(_logits(x["hs"], x["ws"]), labels, reduction="sum")
    assert got.kd.item() == 0.0
    torch.testing.assert_close(got.total, want, rtol=2e-5, atol=1e-5)
    _assert_close(_grads(got.total, [x["hs"], x["ws"]]), _grads(want, [x["hs"], x["ws"]]))


def test_folded_ce_defaults_its_mask_to_the_labelled_positions_and_checks_its_arguments(request):
    g = _gen(request)
    x = _inputs(g)
    labels = _labels(g, 45).view(5, 9)
    hs, head = x["hs"].view(5, 9, HS), Head(x["ws"])
    kw = {"teacher_hidden": x["ht"].view(5, 9, HT), "teacher_head": Head(x["wt"])}
    got = fused_loss(hs, head, labels=labels, alpha=0.5, **kw)
    labelled = labels != -100
    ref_kd = divergence(_logits(hs, x["ws"]), _logits(kw["teacher_hidden"], x["wt"]), mask=labelled, reduction="sum")
    torch.testing.assert_close(got.kd, ref_kd.detach(), rtol=2e-5, atol=1e-5)
    assert got.tokens.item() == int(labelled.sum())
    with pytest.raises(ValueError, match="labels shape"):
        fused_loss(hs, head, labels=labels[:, :4], alpha=0.5, **kw)
    with pytest.raises(ValueError, match="outside the vocab"):
        fused_loss(hs, head, labels=labels.clamp_min(0) + V - 1, alpha=0.5, **kw)
    with pytest.raises(ValueError, match="integer tensor"):
        fused_loss(hs, head, labels=labels.float(), alpha=0.5, **kw)
    with pytest.raises(ValueError, match="alpha must be in"):
        fused_loss(hs, head, labels=labels, alpha=1.5, **kw)


# ----------------------------------------------------------------------------------------------------------------
# a Hugging Face model's head: tied embeddings, padded vocab rows, gradients through the decoder


def _qwen2(vocab: int, hidden: int, tied: bool, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)  # fmt: skip
    return Qwen2ForCausalLM(config).eval()


def test_model_heads_match_reference_on_model_logits(request):
    g = _gen(request)
    n_vocab = 90  # both embedding matrices are padded past the real vocab, by different amounts
    student = _qwen2(96, HS, tied=True, seed=int(torch.randint(0, 2**31, (1,), generator=g)))
    teacher = _qwen2(112, HT, tied=False, seed=int(torch.randint(0, 2**31, (1,), generator=g)))
    ids = torch.randint(0, n_vocab, (2, 9), generator=g)
    mask = torch.rand(2, 9, generator=g) > 0.3

    s_logits = student(ids).logits[..., :n_vocab]
    with torch.no_grad():
        t_logits = teacher(ids).logits[..., :n_vocab]
    ref = divergence(s_logits, t_logits, "jsd", beta=0.5, temperature=1.5, mask=mask, reduction="sum")
    params = [p for p in student.parameters() if p.requires_grad]
    ref_grads = _grads(ref, params)

    h_s = student.model(ids).last_hidden_state
    with torch.no_grad():
        h_t = teacher.model(ids).last_hidden_state
    got = fused_loss(h_s, Head(student.get_output_embeddings().weight[:n_vocab]), teacher_hidden=h_t,
                     teacher_head=Head(teacher.get_output_embeddings().weight[:n_vocab]), kind="jsd", beta=0.5,
                     temperature=1.5, mask=mask, chunk_size=5).total  # fmt: skip
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-5)
    # every student parameter, the tied embedding (lm_head rows past n_vocab: zero) and the decoder included
    _assert_close(_grads(got, params), ref_grads, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# CUDA (pytest -m gpu on a GPU machine) and the Triton kernel under Triton's CPU interpreter


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


@pytest.mark.skipif(
    not (_has_triton() and os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs the triton package and TRITON_INTERPRET=1 (runs the kernel on CPU through Triton's interpreter)",
)
@pytest.mark.parametrize("softcap", [None, 4.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("kind", KINDS)
def test_triton_kernel_under_interpreter_matches_torch_rows(request, kind, softcap, monkeypatch):
    from lmdistill.losses.fused import rows
    from lmdistill.losses.fused import triton as kernel
    from lmdistill.losses.fused.plan import Plan

    monkeypatch.setattr(kernel, "BLOCK", 64)  # several blocks per row, the last one partial
    g = _gen(request)
    teacher = Head(weight=torch.empty(0), bias=None, scale=0.7, softcap=3.0)
    plan = Plan(rows=None, student_scale=1.3, student_softcap=softcap, teacher=teacher, teacher_hidden=None,
                sparse=None, kind=rows.effective_kind(kind, 0.3), beta=0.3, temperature=1.5, chunk_size=8,
                backend="triton")  # fmt: skip
    ys, yt = torch.randn(6, V, generator=g) * 3, torch.randn(6, V, generator=g) * 3
    want_v, _, want_g = rows.dense_rows_torch(plan, [ys.clone(), yt.clone()], need_grad=True)
    got_v, got_g = kernel.dense_rows_triton(plan, ys.clone(), yt.clone(), need_grad=True)
    torch.testing.assert_close(got_v, want_v, rtol=1e-5, atol=1e-5)
    _assert_close([got_g], [want_g])
    value_only, none = kernel.dense_rows_triton(plan, ys.clone(), yt.clone(), need_grad=False)
    assert none is None
    torch.testing.assert_close(value_only, want_v, rtol=1e-5, atol=1e-5)


_BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not _has_triton(), reason="needs triton"))]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_matches_reference(request, kind, dtype, backend):
    g = _gen(request)
    n, vocab, hs_w, ht_w = 300, 5003, 64, 96

    def rnd(*shape, std=1.0, grad=False):
        return (torch.randn(*shape, generator=g) * std).to("cuda", dtype).requires_grad_(grad)

    hs, ws, bs = rnd(n, hs_w, grad=True), rnd(vocab, hs_w, std=0.25, grad=True), rnd(vocab, std=0.5, grad=True)
    ht, wt = rnd(n, ht_w), rnd(vocab, ht_w, std=0.2)
    mask = (torch.rand(n, generator=g) > 0.2).cuda()
    kw = dict(kind=kind, beta=0.3, temperature=1.5, mask=mask)
    ref = divergence(
        _logits(hs, ws, bs, scale=1.2, softcap=20.0), _logits(ht, wt, scale=0.9, softcap=25.0), **kw
    )  # fmt: skip
    got = _mean(fused_loss(hs, Head(ws, bs, scale=1.2, softcap=20.0), teacher_hidden=ht,
                           teacher_head=Head(wt, scale=0.9, softcap=25.0), chunk_size=128, backend=backend, **kw))
    # bf16 / fp16: the reference rounds the biased, scaled, capped logits at each step, the fused path only the
    # matmul output, so they differ by the round-off of the logits
    fp32 = dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=2e-5 if fp32 else 2e-2, atol=1e-6 if fp32 else 1e-3)
    tol = dict(rtol=2e-5, atol=2e-6) if fp32 else dict(rtol=5e-2, atol=2e-2)
    _assert_close(_grads(got, [hs, ws, bs]), _grads(ref, [hs, ws, bs]), **tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 1.5], ids=["T1", "T1.5"])
@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_cuda_folded_ce_matches_reference(request, kind, temperature, backend):
    # with backend="triton" the divergence runs in the Triton kernel and the CE reads the projection before it does
    g = _gen(request)
    n, vocab, width = 300, 5003, 64

    def rnd(*shape, std=1.0, grad=False):
        return (torch.randn(*shape, generator=g) * std).cuda().requires_grad_(grad)

    hs, ws, ht, wt = rnd(n, width, grad=True), rnd(vocab, width, std=0.25, grad=True), rnd(n, width), rnd(vocab, width)
    labels = torch.randint(0, vocab, (n,), generator=g).cuda()
    labels[::7] = -100
    s_logits = _logits(hs, ws)
    want = 0.7 * divergence(s_logits, _logits(ht, wt), kind, beta=0.3, temperature=temperature,
                            mask=labels != -100, reduction="sum")
    want = want + 0.3 * torch.nn.functional.cross_entropy(s_logits, labels, reduction="sum")
    got = fused_loss(hs, Head(ws), teacher_hidden=ht, teacher_head=Head(wt), kind=kind, beta=0.3,
                     temperature=temperature, labels=labels, alpha=0.7, chunk_size=128, backend=backend)
    torch.testing.assert_close(got.total, want, rtol=2e-5, atol=1e-4)
    _assert_close(_grads(got.total, [hs, ws]), _grads(want, [hs, ws]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_matches_float64_reference(request, kind, backend):
    # fp32 inputs against the definition evaluated in float64 (log-softmax, divergence, T^2, the folded CE and
    # autograd's gradients): every kind at T != 1, a mask, labels with ignored rows, biases, scale and softcap on both
    # sides, several chunks
    g = _gen(request)
    n, vocab, hs_w, ht_w = 300, 5003, 64, 96

    def rnd(*shape, std=1.0, grad=False):
        return (torch.randn(*shape, generator=g) * std).cuda().requires_grad_(grad)

    hs, ws, bs = rnd(n, hs_w, grad=True), rnd(vocab, hs_w, std=0.25, grad=True), rnd(vocab, std=0.5, grad=True)
    ht, wt, bt = rnd(n, ht_w), rnd(vocab, ht_w, std=0.2), rnd(vocab, std=0.5)
    mask = (torch.rand(n, generator=g) > 0.2).cuda()
    labels = torch.randint(0, vocab, (n,), generator=g).cuda()
    labels[::5] = -100
    beta, temperature, alpha = 0.3, 1.5, 0.7
    s_head, t_head = dict(scale=1.2, softcap=20.0), dict(scale=0.9, softcap=25.0)

    leaves = [t.detach().double().requires_grad_() for t in (hs, ws, bs)]
    s64 = _logits(*leaves, **s_head)[mask]
    t64 = _logits(ht.double(), wt.double(), bt.double(), **t_head)[mask]
    ls, lt = torch.log_softmax(s64 / temperature, dim=-1), torch.log_softmax(t64 / temperature, dim=-1)
    kd = divergence_from_logprobs(ls, lt, kind, beta).sum() * temperature**2
    ce = torch.nn.functional.cross_entropy(s64, labels[mask], ignore_index=-100, reduction="sum")
    want = alpha * kd + (1 - alpha) * ce
    got = fused_loss(hs, Head(ws, bs, **s_head), teacher_hidden=ht, teacher_head=Head(wt, bt, **t_head), kind=kind,
                     beta=beta, temperature=temperature, mask=mask, labels=labels, alpha=alpha, chunk_size=128,
                     backend=backend)  # fmt: skip
    assert got.tokens.item() == int(mask.sum())
    for a, b in [(got.kd, kd), (got.ce, ce), (got.total, want)]:
        torch.testing.assert_close(a.double(), b.detach(), rtol=1e-4, atol=1e-4)
    grads, ref_grads = _grads(got.total, [hs, ws, bs]), _grads(want, leaves)
    if kind == "tvd":  # its gradient has sign(p_S - p_T), which fp32 and fp64 may disagree on where p_S ~ p_T
        for a, b in zip(grads, ref_grads, strict=True):
            assert (a.double() - b).norm() <= 1e-4 * b.norm()
    else:
        _assert_close(grads, ref_grads, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("encoding", ["topk", "sampled"])
def test_cuda_sparse_targets_with_folded_ce_match_reference(request, encoding, dtype):
    # the sparse (cache) path on CUDA: top-k + tail (JSD) or sampled (forward KL) targets, the CE folded in
    g = _gen(request)
    n = 300
    x = {k: None if v is None else v.detach().cuda().requires_grad_(v.requires_grad)
         for k, v in _inputs(g, n=n, dtype=dtype).items()}  # fmt: skip
    cpu = _topk_targets(g, n, k=8, tail=True, absent=True) if encoding == "topk" else _sampled_targets(g, n, draws=12)
    targets = SparseTargets(**{f.name: v.cuda() if isinstance(v := getattr(cpu, f.name), torch.Tensor) else v
                               for f in dataclasses.fields(cpu)})  # fmt: skip
    kind = "jsd" if encoding == "topk" else "forward_kl"
    labels = _labels(g, n).cuda()
    s_logits = _logits(x["hs"], x["ws"], x["bs"], scale=1.3, softcap=4.0)
    kd_ref = sparse_divergence(s_logits, targets.ids, targets.logprobs, kind, tail_logprob=targets.tail_logprob,
                               target_weights=targets.weights, estimator=targets.estimator, beta=0.4, temperature=1.5,
                               mask=x["mask"], reduction="sum")  # fmt: skip
    want = 0.6 * kd_ref + 0.4 * _ce_reference(s_logits.float(), labels, x["mask"])
    got = fused_loss(x["hs"], Head(x["ws"], x["bs"], scale=1.3, softcap=4.0), sparse=targets, kind=kind, beta=0.4,
                     temperature=1.5, mask=x["mask"], labels=labels, alpha=0.6, chunk_size=64)  # fmt: skip
    count = int(x["mask"].sum())
    fp32 = dtype == torch.float32
    torch.testing.assert_close(got.total / count, want / count, rtol=2e-5 if fp32 else 2e-2,
                               atol=1e-6 if fp32 else 1e-3)  # fmt: skip
    tol = dict(rtol=2e-5, atol=2e-6) if fp32 else dict(rtol=5e-2, atol=2e-2)
    params = [x["hs"], x["ws"], x["bs"]]
    _assert_close(_grads(got.total, params), _grads(want, params), **tol)
