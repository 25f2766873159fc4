"""The fused, chunked divergence equals the reference on materialised logits: values and gradients.

The reference is :func:`lmdistill.losses.divergence` (and ``sparse_divergence``) on the projected logits; both
compute in fp32, so the tolerances below are fp32 round-off (bf16 inputs get bf16 tolerances). Every test draws its
own inputs from a seed derived from its name, so no two tests share data and a failure reproduces.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

from lmdistill.losses import KINDS, divergence, sparse_divergence
from lmdistill.losses.divergences import divergence_from_logprobs
from lmdistill.losses.fused import (
    SparseTargets,
    fused_distill_loss_sums,
    fused_divergence,
    fused_divergence_from_models,
    fused_divergence_sum_and_count,
    last_hidden_states,
    lm_head_spec,
)

V = 101  # prime: never a multiple of a token chunk or a vocab tile
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


@pytest.mark.parametrize("vocab_chunk", [None, 32], ids=["rows", "tiles"])
@pytest.mark.parametrize("kind", KINDS)
def test_dense_value_and_grads_match_reference(request, kind, vocab_chunk):
    x = _inputs(_gen(request))
    kw = dict(kind=kind, beta=0.3, temperature=2.0, mask=x["mask"])
    ref = divergence(_logits(x["hs"], x["ws"], x["bs"]), _logits(x["ht"], x["wt"], x["bt"]), **kw)
    got = fused_divergence(
        x["hs"], x["ws"], student_bias=x["bs"], teacher_hidden=x["ht"], teacher_weight=x["wt"],
        teacher_bias=x["bt"], chunk_size=7, vocab_chunk_size=vocab_chunk, backend="torch", **kw,
    )  # fmt: skip
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
    got = fused_divergence(x["hs"], x["ws"], teacher_hidden=x["ht"], teacher_weight=x["wt"], kind=kind, beta=beta)
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-6)
    _assert_close(_grads(got, [x["hs"], x["ws"]]), _grads(ref, [x["hs"], x["ws"]]))


@pytest.mark.parametrize("vocab_chunk", [None, 16], ids=["rows", "tiles"])
@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "tvd"])
def test_logit_scale_and_softcap_on_both_sides(request, kind, vocab_chunk):
    x = _inputs(_gen(request))
    s_logits = _logits(x["hs"], x["ws"], x["bs"], scale=1.7, softcap=3.0)
    t_logits = _logits(x["ht"], x["wt"], x["bt"], scale=0.5, softcap=2.0)
    ref = divergence(s_logits, t_logits, kind, temperature=0.7, mask=x["mask"])
    got = fused_divergence(
        x["hs"], x["ws"], student_bias=x["bs"], teacher_hidden=x["ht"], teacher_weight=x["wt"],
        teacher_bias=x["bt"], student_logit_scale=1.7, teacher_logit_scale=0.5, student_softcap=3.0,
        teacher_softcap=2.0, kind=kind, temperature=0.7, mask=x["mask"], chunk_size=9, vocab_chunk_size=vocab_chunk,
    )  # fmt: skip
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-6)
    params = [x["hs"], x["ws"], x["bs"]]
    _assert_close(_grads(got, params), _grads(ref, params))


def test_batched_hidden_and_mask_and_sum_reduction(request):
    g = _gen(request)
    b, t = 3, 11
    hs = torch.randn(b, t, HS, generator=g, requires_grad=True)
    ws = torch.randn(V, HS, generator=g, requires_grad=True)
    ht, wt = torch.randn(b, t, HT, generator=g), torch.randn(V, HT, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.4
    ref = divergence(hs @ ws.t(), ht @ wt.t(), "reverse_kl", mask=mask, reduction="sum")
    total, count = fused_divergence_sum_and_count(hs, ws, teacher_hidden=ht, teacher_weight=wt, kind="reverse_kl",
                                                  mask=mask, chunk_size=4)  # fmt: skip
    assert count.item() == mask.sum().item()
    torch.testing.assert_close(total, ref, rtol=2e-5, atol=1e-5)
    grads = _grads(total, [hs, ws])
    _assert_close(grads, _grads(ref, [hs, ws]))
    assert grads[0][~mask].abs().max() == 0  # masked positions get exactly no gradient
    mean = fused_divergence(hs, ws, teacher_hidden=ht, teacher_weight=wt, kind="reverse_kl", mask=mask)
    torch.testing.assert_close(mean * count, total.detach(), rtol=1e-6, atol=1e-6)


def test_all_masked_is_zero_with_zero_grads(request):
    x = _inputs(_gen(request))
    mask = torch.zeros_like(x["mask"])
    got = fused_divergence(x["hs"], x["ws"], teacher_hidden=x["ht"], teacher_weight=x["wt"], mask=mask)
    assert got.item() == 0.0
    gh, gw = _grads(got, [x["hs"], x["ws"]])
    assert gh.abs().max() == 0 and gw.abs().max() == 0


def test_backward_scales_by_incoming_gradient_and_no_grad_skips_it(request):
    x = _inputs(_gen(request), bias=False)
    kw = dict(teacher_hidden=x["ht"], teacher_weight=x["wt"], kind="jsd")
    g1 = _grads(fused_divergence(x["hs"], x["ws"], **kw), [x["hs"], x["ws"]])
    g3 = _grads(3.0 * fused_divergence(x["hs"], x["ws"], **kw), [x["hs"], x["ws"]])
    _assert_close(g3, [3.0 * g for g in g1])
    with torch.no_grad():
        value = fused_divergence(x["hs"], x["ws"], **kw)
    assert not value.requires_grad
    torch.testing.assert_close(value, fused_divergence(x["hs"], x["ws"], **kw).detach())


def test_second_backward_is_refused_with_a_clear_message(request):
    x = _inputs(_gen(request), bias=False)
    loss = fused_divergence(x["hs"], x["ws"], teacher_hidden=x["ht"], teacher_weight=x["wt"])
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_only_the_weight_requires_grad(request):
    x = _inputs(_gen(request), bias=False)
    hs = x["hs"].detach()
    got = fused_divergence(hs, x["ws"], teacher_hidden=x["ht"], teacher_weight=x["wt"], kind="skew_forward_kl")
    ref = divergence(_logits(hs, x["ws"]), _logits(x["ht"], x["wt"]), "skew_forward_kl")
    _assert_close(_grads(got, [x["ws"]]), _grads(ref, [x["ws"]]))


@pytest.mark.parametrize("vocab_chunk", [None, 32], ids=["rows", "tiles"])
@pytest.mark.parametrize("kind", KINDS)
def test_extreme_logits_stay_finite_and_exact(request, kind, vocab_chunk):
    x = _inputs(_gen(request), bias=False)
    hs = (x["hs"].detach() * 3e3).requires_grad_()  # logits of order 1e4: every softmax is one-hot
    ht = x["ht"] * -3e3
    got = fused_divergence(hs, x["ws"], teacher_hidden=ht, teacher_weight=x["wt"], kind=kind, beta=0.5,
                           vocab_chunk_size=vocab_chunk)  # fmt: skip
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
    got = fused_divergence(x["hs"], x["ws"], teacher_hidden=x["ht"], teacher_weight=x["wt"], kind=kind,
                           chunk_size=16)  # fmt: skip
    assert got.dtype == torch.float32
    # the reference on the bf16 projections the fused path also computes (bf16 matmul, fp32 softmax)
    ref = divergence(x["hs"] @ x["ws"].t(), x["ht"] @ x["wt"].t(), kind)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    got_g, ref_g = _grads(got, [x["hs"], x["ws"]]), _grads(ref, [x["hs"], x["ws"]])
    assert got_g[0].dtype == torch.bfloat16 and got_g[1].dtype == torch.bfloat16
    _assert_close(got_g, ref_g, rtol=2e-2, atol=2e-2)


def test_chunk_sizes_do_not_change_the_result(request):
    x = _inputs(_gen(request), bias=False)
    kw = dict(teacher_hidden=x["ht"], teacher_weight=x["wt"], kind="tvd", mask=x["mask"])
    base = fused_divergence(x["hs"], x["ws"], **kw)
    for chunk, tile in [(1, None), (5, 7), (1000, 1000), (23, 3)]:
        got = fused_divergence(x["hs"], x["ws"], chunk_size=chunk, vocab_chunk_size=tile, **kw)
        torch.testing.assert_close(got, base, rtol=1e-5, atol=1e-6)


def test_errors_name_the_problem(request):
    x = _inputs(_gen(request), bias=False)
    with pytest.raises(ValueError, match="teacher_hidden width 24 does not match teacher_weight"):
        fused_divergence(x["hs"], x["ws"], teacher_hidden=x["ht"], teacher_weight=x["ws"])
    with pytest.raises(ValueError, match="exactly one target"):
        fused_divergence(x["hs"], x["ws"])
    with pytest.raises(ValueError, match="shared real vocab"):
        fused_divergence(x["hs"], x["ws"], teacher_hidden=x["ht"], teacher_weight=x["wt"][:50])
    with pytest.raises(ValueError, match="reduction"):
        fused_divergence(x["hs"], x["ws"], teacher_hidden=x["ht"], teacher_weight=x["wt"], reduction="none")
    with pytest.raises(ValueError, match="unknown divergence kind"):
        fused_divergence(x["hs"], x["ws"], teacher_hidden=x["ht"], teacher_weight=x["wt"], kind="kl")
    with pytest.raises(ValueError, match="chunk_size"):
        fused_divergence(x["hs"], x["ws"], teacher_hidden=x["ht"], teacher_weight=x["wt"], chunk_size=0)


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
    got = fused_divergence(x["hs"], x["ws"], student_bias=x["bs"], sparse_targets=targets, student_logit_scale=1.3,
                           student_softcap=4.0, kind=kind, mask=x["mask"], chunk_size=6, **kw)  # fmt: skip
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
    got = fused_divergence(hs, ws, sparse_targets=targets, reduction="sum")
    ref = sparse_divergence(hs @ ws.t(), targets.ids, targets.logprobs, tail_logprob=targets.tail_logprob,
                            reduction="sum")  # fmt: skip
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-5)
    _assert_close(_grads(got, [hs]), _grads(ref, [hs]))
    with pytest.raises(ValueError, match="exactly one target"):
        fused_divergence(hs, ws, sparse_targets=targets, teacher_hidden=hs.detach(), teacher_weight=ws)
    with pytest.raises(ValueError, match="student_hidden positions"):
        fused_divergence(hs[:, :4], ws, sparse_targets=targets)


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
@pytest.mark.parametrize("vocab_chunk", [None, 32], ids=["rows", "tiles"])
@pytest.mark.parametrize("kind", KINDS)
def test_folded_ce_matches_divergence_plus_cross_entropy(request, kind, vocab_chunk, temperature, alpha):
    g = _gen(request)
    x = _inputs(g)
    labels = _labels(g, 45)
    s_logits = _logits(x["hs"], x["ws"], x["bs"], scale=1.2, softcap=6.0)
    t_logits = _logits(x["ht"], x["wt"], x["bt"])
    kd_ref = divergence(s_logits, t_logits, kind, beta=0.3, temperature=temperature, mask=x["mask"], reduction="sum")
    ce_ref = _ce_reference(s_logits, labels, x["mask"])
    got = fused_distill_loss_sums(
        x["hs"], x["ws"], teacher_hidden=x["ht"], teacher_weight=x["wt"], student_bias=x["bs"],
        teacher_bias=x["bt"], student_logit_scale=1.2, student_softcap=6.0, kind=kind, beta=0.3,
        temperature=temperature, mask=x["mask"], chunk_size=7, vocab_chunk_size=vocab_chunk, labels=labels,
        alpha=alpha,
    )  # fmt: skip
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
    got = fused_distill_loss_sums(x["hs"], x["ws"], student_bias=x["bs"], sparse_targets=targets, kind=kind,
                                  temperature=1.5, mask=x["mask"], chunk_size=6, labels=labels, alpha=0.6)  # fmt: skip
    torch.testing.assert_close(got.total, want, rtol=2e-5, atol=1e-5)
    params = [x["hs"], x["ws"], x["bs"]]
    _assert_close(_grads(got.total, params), _grads(want, params))


def test_folded_ce_when_the_divergence_is_identically_zero(request):
    # skew forward KL at beta = 1 is KL(p_T || p_T) = 0: only the CE term is left, and it must still train
    g = _gen(request)
    x = _inputs(g)
    labels = _labels(g, 45)
    got = fused_distill_loss_sums(x["hs"], x["ws"], teacher_hidden=x["ht"], teacher_weight=x["wt"],
                                  kind="skew_forward_kl", beta=1.0, labels=labels, alpha=0.5, chunk_size=10)
    want = 0.5 * torch.nn.functional.cross_entropy(_logits(x["hs"], x["ws"]), labels, reduction="sum")
    assert got.kd.item() == 0.0
    torch.testing.assert_close(got.total, want, rtol=2e-5, atol=1e-5)
    _assert_close(_grads(got.total, [x["hs"], x["ws"]]), _grads(want, [x["hs"], x["ws"]]))


def test_folded_ce_defaults_its_mask_to_the_labelled_positions_and_checks_its_arguments(request):
    g = _gen(request)
    x = _inputs(g)
    labels = _labels(g, 45).view(5, 9)
    hs = x["hs"].view(5, 9, HS)
    kw = {"teacher_hidden": x["ht"].view(5, 9, HT), "teacher_weight": x["wt"]}
    got = fused_distill_loss_sums(hs, x["ws"], labels=labels, alpha=0.5, **kw)
    labelled = labels != -100
    ref_kd = divergence(_logits(hs, x["ws"]), _logits(kw["teacher_hidden"], x["wt"]), mask=labelled, reduction="sum")
    torch.testing.assert_close(got.kd, ref_kd.detach(), rtol=2e-5, atol=1e-5)
    assert got.tokens.item() == int(labelled.sum())
    with pytest.raises(ValueError, match="labels shape"):
        fused_distill_loss_sums(hs, x["ws"], labels=labels[:, :4], alpha=0.5, **kw)
    with pytest.raises(ValueError, match="outside the vocab"):
        fused_distill_loss_sums(hs, x["ws"], labels=labels.clamp_min(0) + V - 1, alpha=0.5, **kw)
    with pytest.raises(ValueError, match="integer tensor"):
        fused_distill_loss_sums(hs, x["ws"], labels=labels.float(), alpha=0.5, **kw)
    with pytest.raises(ValueError, match="alpha must be in"):
        fused_distill_loss_sums(hs, x["ws"], labels=labels, alpha=1.5, **kw)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face models: lm_head from the model, tied embeddings, padded vocab rows


def _qwen2(vocab: int, hidden: int, tied: bool, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)  # fmt: skip
    return Qwen2ForCausalLM(config).eval()


def test_from_models_matches_reference_on_model_logits(request):
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

    h_s = last_hidden_states(student, ids)
    with torch.no_grad():
        h_t = last_hidden_states(teacher, ids)
    got = fused_divergence_from_models(student, h_s, teacher, h_t, n_vocab=n_vocab, kind="jsd", beta=0.5,
                                       temperature=1.5, mask=mask, chunk_size=5)  # fmt: skip
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-5)
    # every student parameter, the tied embedding (lm_head rows past n_vocab: zero) and the decoder included
    _assert_close(_grads(got, params), ref_grads, rtol=1e-4, atol=1e-5)


def test_lm_head_spec_reads_softcap_scale_and_refuses_short_heads():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0)  # fmt: skip
    model = Gemma2ForCausalLM(config)
    spec = lm_head_spec(model, 60)
    assert spec.softcap == 30.0 and spec.logit_scale == 1.0 and spec.weight.shape == (60, 16)
    assert spec.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied: the same storage
    with pytest.raises(ValueError, match="fewer than n_vocab=65"):
        lm_head_spec(model, 65)


# ----------------------------------------------------------------------------------------------------------------
# CUDA (pytest -m gpu on a GPU machine) and the Triton kernel under Triton's CPU interpreter


def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


@pytest.mark.skipif(
    not (_has_triton() and os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs the triton package and TRITON_INTERPRET=1 (runs the kernel on CPU through Triton's interpreter)",
)
@pytest.mark.parametrize("softcap", [None, 4.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("kind", KINDS)
def test_triton_kernel_under_interpreter_matches_torch_rows(request, kind, softcap, monkeypatch):
    from lmdistill.losses import fused, fused_triton

    monkeypatch.setattr(fused_triton, "BLOCK", 64)  # several blocks per row, the last one partial
    g = _gen(request)
    teacher = fused._Head(weight=torch.empty(0), bias=None, scale=0.7, softcap=3.0)
    plan = fused._Plan(rows=None, student_scale=1.3, student_softcap=softcap, teacher=teacher, teacher_hidden=None,
                       sparse=None, kind=fused._effective_kind(kind, 0.3), beta=0.3, temperature=1.5, chunk_size=8,
                       vocab_chunk_size=V, backend="triton")  # fmt: skip
    ys, yt = torch.randn(6, V, generator=g) * 3, torch.randn(6, V, generator=g) * 3
    want_v, _, want_g = fused._dense_rows_torch(plan, [ys.clone(), yt.clone()], need_grad=True)
    got_v, got_g = fused_triton.dense_rows_triton(plan, ys.clone(), yt.clone(), need_grad=True)
    torch.testing.assert_close(got_v, want_v, rtol=1e-5, atol=1e-5)
    _assert_close([got_g], [want_g])
    value_only, none = fused_triton.dense_rows_triton(plan, ys.clone(), yt.clone(), need_grad=False)
    assert none is None
    torch.testing.assert_close(value_only, want_v, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
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
    got = fused_divergence(hs, ws, student_bias=bs, teacher_hidden=ht, teacher_weight=wt, student_logit_scale=1.2,
                           teacher_logit_scale=0.9, student_softcap=20.0, teacher_softcap=25.0, chunk_size=128,
                           backend=backend, **kw)  # fmt: skip
    # bf16: the reference rounds the biased, scaled, capped logits to bf16 at each step, the fused path only the
    # matmul output, so they differ by bf16 round-off of the logits
    fp32 = dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=2e-5 if fp32 else 2e-2, atol=1e-6 if fp32 else 1e-3)
    tol = dict(rtol=2e-5, atol=2e-6) if fp32 else dict(rtol=5e-2, atol=2e-2)
    _assert_close(_grads(got, [hs, ws, bs]), _grads(ref, [hs, ws, bs]), **tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("temperature", [1.0, 1.5], ids=["T1", "T1.5"])
@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_cuda_folded_ce_matches_reference(request, kind, temperature, backend):
    # with backend="auto" the divergence runs in the Triton kernel and the CE reads the projection before it does
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
    got = fused_distill_loss_sums(hs, ws, teacher_hidden=ht, teacher_weight=wt, kind=kind, beta=0.3,
                                  temperature=temperature, labels=labels, alpha=0.7, chunk_size=128, backend=backend)
    torch.testing.assert_close(got.total, want, rtol=2e-5, atol=1e-4)
    _assert_close(_grads(got.total, [hs, ws]), _grads(want, [hs, ws]))
