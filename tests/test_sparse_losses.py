"""Sparse divergences: top-k + tail is exact on K+1 buckets (= dense at K = V); the sampled estimator is unbiased."""

from __future__ import annotations

import os

import pytest
import torch

from lmdistill.losses import KINDS, divergence, sparse_divergence

BETAS = {"jsd": 0.3, "skew_forward_kl": 0.1, "skew_reverse_kl": 0.7}


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh seed per test (LMDISTILL_TEST_SEED pins it); printed, so a failure shows how to reproduce it."""
    seed = int(os.environ.get("LMDISTILL_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"seed={seed} (rerun with LMDISTILL_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)


def _topk_targets(teacher_logits: torch.Tensor, k: int, temperature: float):
    """What a top-k cache stores: ids, their log-probs at the temperature, log of the mass outside them."""
    lt = torch.log_softmax(teacher_logits.double() / temperature, -1)
    values, ids = lt.topk(k, dim=-1)
    rest = lt.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return ids, values.float(), rest.float()


def _kl64(a, b):
    return torch.where(a > 0, a * (a.log() - b.log()), torch.zeros_like(a)).sum(-1)


def _reference(q: torch.Tensor, p: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """Divergence of student probs q vs teacher probs p, float64, from the definitions."""
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return _kl64(p, q)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return _kl64(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * _kl64(p, m) + (1 - beta) * _kl64(q, m)
    if kind == "skew_forward_kl":
        return _kl64(p, beta * p + (1 - beta) * q)
    if kind == "skew_reverse_kl":
        return _kl64(q, beta * q + (1 - beta) * p)
    return 0.5 * (p - q).abs().sum(-1)


# ---------------------------------------------------------------------------------------------------------------
# top-k with a tail


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_topk_with_tail_at_k_equals_v_is_dense(gen, kind, temperature):
    beta = BETAS.get(kind, 0.5)
    vocab = 37
    s, t = torch.randn(2, 5, vocab, generator=gen) * 3, torch.randn(2, 5, vocab, generator=gen) * 3
    mask = torch.rand(2, 5, generator=gen) > 0.3
    mask[0, 0] = True
    ids, logprobs, tail = _topk_targets(t, vocab, temperature)
    assert torch.isneginf(tail).all()  # K = V: nothing outside

    s_sparse, s_dense = s.clone().requires_grad_(), s.clone().requires_grad_()
    kw = dict(beta=beta, temperature=temperature, mask=mask)
    sparse = sparse_divergence(s_sparse, ids, logprobs, kind, tail_logprob=tail, reduction="none", **kw)
    dense = divergence(s_dense, t, kind, reduction="none", **kw)
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-5)
    sparse.sum().backward()
    dense.sum().backward()
    assert torch.isfinite(s_sparse.grad).all()
    torch.testing.assert_close(s_sparse.grad, s_dense.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_topk_with_tail_is_exact_on_buckets_and_below_dense(gen, kind):
    beta, temperature, vocab, k = BETAS.get(kind, 0.5), 1.5, 1000, 16
    s, t = torch.randn(3, 4, vocab, generator=gen) * 2, torch.randn(3, 4, vocab, generator=gen) * 2
    ids, logprobs, tail = _topk_targets(t, k, temperature)
    got = sparse_divergence(s, ids, logprobs, kind, tail_logprob=tail, beta=beta, temperature=temperature,
                            reduction="none")  # fmt: skip

    # the (K+1)-bucket coarsening, by hand in float64
    p, q = torch.softmax(t.double() / temperature, -1), torch.softmax(s.double() / temperature, -1)
    pk, qk = p.gather(-1, ids), q.gather(-1, ids)
    pb = torch.cat([pk, (1 - pk.sum(-1, keepdim=True))], -1)
    qb = torch.cat([qk, (1 - qk.sum(-1, keepdim=True))], -1)
    expected = _reference(qb, pb, kind, beta) * temperature**2
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)
    # data-processing inequality: coarsening never increases an f-divergence
    dense = divergence(s, t, kind, beta=beta, temperature=temperature, reduction="none")
    assert (got <= dense + 1e-5).all()


def test_student_tail_stays_exact_when_tiny():
    """A rest bucket of mass 1e-20 is not lost to rounding (1 - sum p_k would give 0 in fp32)."""
    s = torch.tensor([[10.0, 10.0, -36.0]])  # p_S(2) ~ 1.6e-20
    t = torch.tensor([[0.0, 0.0, 0.0]])
    ids, logprobs, tail = _topk_targets(t, 2, 1.0)  # teacher rest = 1/3
    got = sparse_divergence(s, ids, logprobs, "forward_kl", tail_logprob=tail)
    torch.testing.assert_close(got, divergence(s, t, "forward_kl"))  # K+1 = V here: the dense value


# ---------------------------------------------------------------------------------------------------------------
# top-k without a tail


def test_topk_without_tail_forward_kl_keeps_student_unrenormalised(gen):
    vocab, k, temperature = 50, 5, 2.0
    s, t = torch.randn(4, vocab, generator=gen) * 2, torch.randn(4, vocab, generator=gen) * 2
    ids, logprobs, _ = _topk_targets(t, k, temperature)
    got = sparse_divergence(s, ids, logprobs, "forward_kl", temperature=temperature, reduction="none")
    q_teacher = torch.softmax(logprobs.double(), -1)  # renormalised top-K
    log_ps = torch.log_softmax(s.double() / temperature, -1).gather(-1, ids)  # full-vocab student
    expected = (q_teacher * (q_teacher.log() - log_ps)).sum(-1) * temperature**2
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    assert (got > 0).all()


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "forward_kl"])
def test_topk_without_tail_other_kinds_use_renormalised_support(gen, kind):
    beta, vocab, k, temperature = BETAS.get(kind, 0.5), 50, 7, 0.5
    s, t = torch.randn(4, vocab, generator=gen) * 2, torch.randn(4, vocab, generator=gen) * 2
    ids, logprobs, _ = _topk_targets(t, k, temperature)
    got = sparse_divergence(s, ids, logprobs, kind, beta=beta, temperature=temperature, reduction="none")
    q = torch.softmax(s.double().gather(-1, ids) / temperature, -1)
    p = torch.softmax(logprobs.double(), -1)
    torch.testing.assert_close(got.double(), _reference(q, p, kind, beta) * temperature**2, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# padding and masking


@pytest.mark.parametrize(
    "estimator,with_tail,kind", [("topk", True, "jsd"), ("topk", False, "forward_kl"), ("topk", False, "tvd"),
                                 ("sampled", False, "forward_kl")]
)  # fmt: skip
def test_padded_ids_are_ignored(gen, estimator, with_tail, kind):
    vocab, k = 37, 6
    s, t = torch.randn(3, vocab, generator=gen), torch.randn(3, vocab, generator=gen)
    ids, logprobs, tail = _topk_targets(t, k, 1.0)
    weights = torch.softmax(torch.randn(3, k, generator=gen), -1) if estimator == "sampled" else None
    kw = dict(estimator=estimator, tail_logprob=tail if with_tail else None, reduction="none")
    plain = sparse_divergence(s, ids, logprobs, kind, target_weights=weights, **kw)

    # interleave absent entries holding garbage
    pad = 3
    ids_p = torch.cat([ids, torch.full((3, pad), -1)], -1)
    lp_p = torch.cat([logprobs, torch.tensor([[0.0, float("nan"), float("-inf")]] * 3)], -1)
    w_p = None if weights is None else torch.cat([weights, torch.full((3, pad), 0.5)], -1)
    perm = torch.randperm(k + pad, generator=gen)
    s_leaf = s.clone().requires_grad_()
    padded = sparse_divergence(s_leaf, ids_p[:, perm], lp_p[:, perm], kind,
                               target_weights=None if w_p is None else w_p[:, perm], **kw)  # fmt: skip
    torch.testing.assert_close(padded, plain)
    padded.sum().backward()
    assert torch.isfinite(s_leaf.grad).all()


@pytest.mark.parametrize("with_tail", [True, False])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_all_padded_row_all_masked_and_extremes_stay_finite(gen, with_tail, kind):
    vocab, k = 37, 4
    s = (torch.randint(0, 2, (3, vocab), generator=gen).float() * 2 - 1) * 1e4
    s[0, :5] = float("-inf")  # student masks some vocab entries, maybe some of the teacher's top-k
    t = torch.randn(3, vocab, generator=gen) * 3
    ids, logprobs, tail = _topk_targets(t, k, 1.0)
    ids[2] = -1  # a row with no target at all
    tail_arg = tail if with_tail else None
    s_leaf = s.clone().requires_grad_()
    value = sparse_divergence(s_leaf, ids, logprobs, kind, tail_logprob=tail_arg, temperature=0.5, reduction="sum")
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s_leaf.grad).all()
    if not with_tail:  # nothing to compare against: no loss, no gradient
        row2 = sparse_divergence(s[2:], ids[2:], logprobs[2:], kind, reduction="sum")
        assert row2.item() == 0.0

    s_leaf.grad = None
    none_mask = torch.zeros(3, dtype=torch.bool)
    for reduction in ("mean", "sum"):
        value = sparse_divergence(s_leaf, ids, logprobs, kind, tail_logprob=tail_arg, mask=none_mask,
                                  reduction=reduction)  # fmt: skip
        value.backward()
        assert value.item() == 0.0 and s_leaf.grad.abs().max() == 0


def test_reductions_and_mask_consistent(gen):
    vocab, k = 37, 5
    s, t = torch.randn(3, 4, vocab, generator=gen), torch.randn(3, 4, vocab, generator=gen)
    ids, logprobs, tail = _topk_targets(t, k, 1.0)
    mask = torch.rand(3, 4, generator=gen) > 0.5
    mask[0, 0] = True
    kw = dict(kind="reverse_kl", tail_logprob=tail, mask=mask, temperature=1.7)
    total, count = sparse_divergence(s, ids, logprobs, reduction="sum", **kw), mask.sum()
    torch.testing.assert_close(sparse_divergence(s, ids, logprobs, reduction="mean", **kw) * count, total)
    none = sparse_divergence(s, ids, logprobs, reduction="none", **kw)
    assert none.shape == (3, 4) and (none[~mask] == 0).all()
    torch.testing.assert_close(none.sum(), total)
    # masked rows are dropped, not computed: garbage there is harmless
    s_bad = s.clone()
    s_bad[~mask] = float("nan")
    torch.testing.assert_close(sparse_divergence(s_bad, ids, logprobs, reduction="sum", **kw), total)


def test_bf16_student_logits(gen):
    s, t = torch.randn(2, 5, 1000, generator=gen) * 2, torch.randn(2, 5, 1000, generator=gen) * 2
    ids, logprobs, tail = _topk_targets(t, 32, 1.0)
    sb = s.bfloat16().requires_grad_()
    got = sparse_divergence(sb, ids, logprobs, "jsd", tail_logprob=tail)
    got.backward()
    assert got.dtype == torch.float32 and sb.grad.dtype == torch.bfloat16 and torch.isfinite(sb.grad).all()
    exact = sparse_divergence(sb.detach().float(), ids, logprobs, "jsd", tail_logprob=tail)
    torch.testing.assert_close(got.detach(), exact, rtol=1e-5, atol=1e-6)
    full = sparse_divergence(s, ids, logprobs, "jsd", tail_logprob=tail)
    torch.testing.assert_close(got.detach(), full, rtol=3e-2, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# the sampled estimator


def test_sampled_estimator_is_unbiased_in_value_and_gradient(gen):
    """Mean of many sparse losses from multinomial draws -> dense forward KL, within a few standard errors."""
    vocab, draws, reps, temperature = 37, 8, 4000, 2.0
    s, t = torch.randn(vocab, generator=gen) * 2, torch.randn(vocab, generator=gen) * 2
    teacher_lp = torch.log_softmax(t / temperature, -1)

    # what a sampled cache stores per position: distinct ids drawn, count / n, teacher log-probs of them
    samples = torch.multinomial(teacher_lp.exp().expand(reps, vocab), draws, replacement=True, generator=gen)
    counts = torch.zeros(reps, vocab).scatter_add_(1, samples, torch.ones(reps, draws))
    top_counts, ids = counts.topk(draws, dim=-1)  # at most `draws` distinct ids; the rest padded with -1
    ids = torch.where(top_counts > 0, ids, torch.full_like(ids, -1))
    weights = top_counts / draws
    logprobs = torch.where(ids >= 0, teacher_lp[ids.clamp_min(0)], torch.zeros_like(weights))

    s_reps = s.expand(reps, vocab).clone().requires_grad_()  # one leaf row per replica: per-sample gradients
    per_sample = sparse_divergence(s_reps, ids, logprobs, "forward_kl", target_weights=weights, estimator="sampled",
                                   temperature=temperature, reduction="none")  # fmt: skip
    per_sample.sum().backward()

    s_dense = s.clone().requires_grad_()
    dense = divergence(s_dense, t, "forward_kl", temperature=temperature)
    dense.backward()

    def within(samples: torch.Tensor, target: torch.Tensor, n_se: float) -> None:
        mean = samples.double().mean(0)
        se = samples.double().std(0) / reps**0.5
        err = (mean - target.double()).abs()
        assert (err <= n_se * se + 1e-7).all(), (err / se.clamp_min(1e-12)).max()

    within(per_sample.detach(), dense.detach(), 4.0)
    # 37 gradient components tested at once: 5 standard errors keeps the family-wise false alarm below 1e-4
    within(s_reps.grad, s_dense.grad, 5.0)
    # and the estimator is not trivially exact: single draws do scatter
    assert per_sample.std() > 0.01


def test_sampled_with_exact_weights_equals_dense(gen):
    """Weights equal to the teacher's probabilities over the full vocab (the expectation) give the dense loss."""
    vocab = 37
    s, t = torch.randn(2, vocab, generator=gen), torch.randn(2, vocab, generator=gen)
    lp = torch.log_softmax(t, -1)
    ids = torch.arange(vocab).expand(2, vocab)
    got = sparse_divergence(s, ids, lp, target_weights=lp.exp(), estimator="sampled", reduction="none")
    torch.testing.assert_close(got, divergence(s, t, reduction="none"), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# errors a user can cause


def test_errors_name_the_problem():
    s = torch.zeros(2, 3, 10)
    ids = torch.zeros(2, 3, 4, dtype=torch.long)
    lp = torch.zeros(2, 3, 4)
    w = torch.full((2, 3, 4), 0.25)
    with pytest.raises(ValueError, match="estimator='sampled' supports only kind='forward_kl'.*reverse_kl"):
        sparse_divergence(s, ids, lp, "reverse_kl", target_weights=w, estimator="sampled")
    with pytest.raises(ValueError, match="needs target_weights"):
        sparse_divergence(s, ids, lp, estimator="sampled")
    with pytest.raises(ValueError, match="tail_logprob belongs to estimator='topk'"):
        sparse_divergence(s, ids, lp, target_weights=w, estimator="sampled", tail_logprob=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="target_weights belong to estimator='sampled'"):
        sparse_divergence(s, ids, lp, target_weights=w)
    with pytest.raises(ValueError, match="unknown estimator 'exact'"):
        sparse_divergence(s, ids, lp, estimator="exact")
    with pytest.raises(ValueError, match="unknown divergence kind"):
        sparse_divergence(s, ids, lp, "kl")
    with pytest.raises(ValueError, match=r"target_ids must lie in \[0, 10\).*\[12\]"):
        sparse_divergence(s, ids.index_fill(-1, torch.tensor([1]), 12), lp)
    with pytest.raises(ValueError, match="target_ids shape"):
        sparse_divergence(s, ids[:, :2], lp[:, :2])
    with pytest.raises(ValueError, match="target_logprobs"):
        sparse_divergence(s, ids, lp[..., :3])
    with pytest.raises(ValueError, match="target_ids must be integer"):
        sparse_divergence(s, ids.float(), lp)
    with pytest.raises(ValueError, match="tail_logprob shape"):
        sparse_divergence(s, ids, lp, tail_logprob=torch.zeros(2))
    with pytest.raises(ValueError, match="temperature"):
        sparse_divergence(s, ids, lp, temperature=0.0)
    with pytest.raises(ValueError, match="beta"):
        sparse_divergence(s, ids, lp, "jsd", beta=-0.5)
    with pytest.raises(ValueError, match="unknown reduction"):
        sparse_divergence(s, ids, lp, reduction="batchmean")
