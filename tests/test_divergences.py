"""Dense divergences vs a float64 reference written straight from the definitions, plus identities and numerics."""

from __future__ import annotations

import os

import pytest
import torch

from lmdistill.losses import KINDS, divergence


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh seed per test (LMDISTILL_TEST_SEED pins it); printed, so a failure shows how to reproduce it."""
    seed = int(os.environ.get("LMDISTILL_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"seed={seed} (rerun with LMDISTILL_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)


def _logits(gen: torch.Generator, *shape: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


# ---------------------------------------------------------------------------------------------------------------
# reference: float64, probabilities, straight from the definitions


def _kl64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(a > 0, a * (a.log() - b.log()), torch.zeros_like(a)).sum(-1)


def reference(s: torch.Tensor, t: torch.Tensor, kind: str, beta: float, temperature: float) -> torch.Tensor:
    """Per-position divergence [...] in float64."""
    q = torch.softmax(s.double() / temperature, -1)  # student
    p = torch.softmax(t.double() / temperature, -1)  # teacher
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        d = _kl64(p, q)
    elif kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        d = _kl64(q, p)
    elif kind == "jsd":
        m = beta * p + (1 - beta) * q
        d = beta * _kl64(p, m) + (1 - beta) * _kl64(q, m)
    elif kind == "skew_forward_kl":
        d = _kl64(p, beta * p + (1 - beta) * q)
    elif kind == "skew_reverse_kl":
        d = _kl64(q, beta * q + (1 - beta) * p)
    elif kind == "tvd":
        d = 0.5 * (p - q).abs().sum(-1)
    else:
        raise AssertionError(kind)
    return d * temperature**2


BETAS = {"jsd": 0.3, "skew_forward_kl": 0.1, "skew_reverse_kl": 0.7}


# ---------------------------------------------------------------------------------------------------------------
# values and gradients vs the reference


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("vocab", [37, 1000])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_matches_float64_reference(gen, kind, vocab, temperature):
    beta = BETAS.get(kind, 0.5)
    s, t = _logits(gen, 2, 5, vocab), _logits(gen, 2, 5, vocab)
    mask = torch.rand(2, 5, generator=gen) > 0.3
    mask[0, 0] = True
    ref = reference(s, t, kind, beta, temperature) * mask
    kw = dict(kind=kind, beta=beta, temperature=temperature, mask=mask)

    none = divergence(s, t, reduction="none", **kw)
    assert none.dtype == torch.float32 and none.shape == (2, 5)
    torch.testing.assert_close(none.double(), ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(divergence(s, t, reduction="sum", **kw).double(), ref.sum(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(divergence(s, t, **kw).double(), ref.sum() / mask.sum(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_matches_float64_autograd(gen, kind):
    beta, temperature = BETAS.get(kind, 0.5), 1.5
    s, t = _logits(gen, 3, 4, 37), _logits(gen, 3, 4, 37)
    mask = torch.rand(3, 4, generator=gen) > 0.4
    mask[0, 0] = True
    mask[-1, -1] = False  # at least one masked position, whose gradient must be 0 (a draw can mask none)

    s32 = s.clone().requires_grad_()
    t32 = t.clone().requires_grad_()
    divergence(s32, t32, kind, beta=beta, temperature=temperature, mask=mask, reduction="sum").backward()

    s64 = s.double().requires_grad_()
    t64 = t.double().requires_grad_()
    (reference(s64, t64, kind, beta, temperature) * mask).sum().backward()

    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(t32.grad.double(), t64.grad, rtol=1e-4, atol=1e-6)
    assert s32.grad[~mask].abs().max() == 0  # masked positions get no gradient


# ---------------------------------------------------------------------------------------------------------------
# identities


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
def test_zero_on_identical_and_nonnegative(gen, kind, beta):
    s, t = _logits(gen, 4, 6, 101), _logits(gen, 4, 6, 101)
    same = divergence(t, t.clone(), kind, beta=beta, reduction="none")
    torch.testing.assert_close(same, torch.zeros_like(same), atol=1e-5, rtol=0)
    diff = divergence(s, t, kind, beta=beta, temperature=0.7, reduction="none")
    assert (diff >= -1e-6).all()
    if not (kind.startswith("skew") and beta == 1.0) and not (kind == "tvd"):
        assert (diff > 0).all()  # different distributions, strictly positive (skew beta=1 is identically 0)


def test_jsd_endpoints_are_the_kls(gen):
    s, t = _logits(gen, 3, 7, 64), _logits(gen, 3, 7, 64)
    for temperature in (0.5, 2.0):
        fwd = divergence(s, t, "forward_kl", temperature=temperature, reduction="none")
        rev = divergence(s, t, "reverse_kl", temperature=temperature, reduction="none")
        torch.testing.assert_close(divergence(s, t, "jsd", beta=0.0, temperature=temperature, reduction="none"), fwd)
        torch.testing.assert_close(divergence(s, t, "jsd", beta=1.0, temperature=temperature, reduction="none"), rev)
        # DistiLLM's skews with no skew are the plain KLs
        torch.testing.assert_close(divergence(s, t, "skew_forward_kl", beta=0.0, temperature=temperature), fwd.mean())
        torch.testing.assert_close(divergence(s, t, "skew_reverse_kl", beta=0.0, temperature=temperature), rev.mean())
        assert not torch.allclose(fwd, rev)


def test_jsd_beta_weights_the_teacher(gen):
    """TRL/Liger convention: beta * KL(p_T || m) + (1 - beta) * KL(p_S || m), m = beta * p_T + (1 - beta) * p_S."""
    s, t = _logits(gen, 2, 3, 50), _logits(gen, 2, 3, 50)
    p, q = torch.softmax(t.double(), -1), torch.softmax(s.double(), -1)
    m = 0.2 * p + 0.8 * q
    expected = 0.2 * (p * (p / m).log()).sum(-1) + 0.8 * (q * (q / m).log()).sum(-1)
    torch.testing.assert_close(
        divergence(s, t, "jsd", beta=0.2, reduction="none").double(), expected, rtol=1e-4, atol=0
    )


def test_tvd_in_unit_interval(gen):
    s, t = _logits(gen, 4, 8, 37, scale=20.0), _logits(gen, 4, 8, 37, scale=20.0)
    tvd = divergence(s, t, "tvd", reduction="none")
    assert (tvd >= 0).all() and (tvd <= 1 + 1e-6).all()
    # disjoint one-hot-like distributions: TVD = 1
    a = torch.full((1, 37), -1e4)
    b = a.clone()
    a[0, 0], b[0, 1] = 1e4, 1e4
    assert divergence(a, b, "tvd").item() == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# numerics: extreme logits, -inf entries, bf16, masking


def _assert_finite_value_and_grad(s, t, kind, **kw):
    s = s.clone().requires_grad_()
    t = t.clone().requires_grad_()
    value = divergence(s, t, kind, **kw)
    value.backward()
    assert torch.isfinite(value), (kind, value)
    assert s.grad is not None and torch.isfinite(s.grad).all(), kind
    # the teacher may be outside the graph (skew_reverse_kl with beta=1 is KL(p_S || p_S) = 0)
    assert t.grad is None or torch.isfinite(t.grad).all(), kind
    return value


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_finite_at_extreme_logits(gen, kind, beta):
    sign = lambda: torch.randint(0, 2, (2, 4, 37), generator=gen).float() * 2 - 1  # noqa: E731
    s, t = sign() * 1e4, sign() * 1e4
    for temperature in (0.5, 1.0):
        _assert_finite_value_and_grad(s, t, kind, beta=beta, temperature=temperature)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["both", "teacher", "student"])
def test_finite_with_neg_inf_vocab_entries(gen, kind, side):
    s, t = _logits(gen, 2, 4, 37), _logits(gen, 2, 4, 37)
    masked = torch.zeros(37, dtype=torch.bool)
    masked[[3, 17, 36]] = True
    if side in ("both", "student"):
        s[..., masked] = float("-inf")
    if side in ("both", "teacher"):
        t[..., masked] = float("-inf")
    for beta in (0.0, 0.5, 1.0):
        value = _assert_finite_value_and_grad(s, t, kind, beta=beta, temperature=2.0)
        if side == "both":
            # masking an entry on both sides is the same as removing it from the vocab
            ref = divergence(s[..., ~masked], t[..., ~masked], kind, beta=beta, temperature=2.0)
            torch.testing.assert_close(value.detach(), ref)


def test_extreme_logits_are_not_clamped():
    """A confidently wrong student pays the full price: no clamping of finite log-probs."""
    t = torch.full((1, 5), -1e4)
    s = t.clone()
    t[0, 0], s[0, 1] = 1e4, 1e4
    s.requires_grad_()
    value = divergence(s, t, "forward_kl")
    value.backward()
    assert value.item() == pytest.approx(2e4, rel=1e-6)  # log p_T(0) - log p_S(0) = 0 - (-2e4)
    assert s.grad[0, 0].item() == pytest.approx(-1.0) and s.grad[0, 1].item() == pytest.approx(1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_inputs_within_tolerance(gen, kind):
    s, t = _logits(gen, 2, 6, 1000), _logits(gen, 2, 6, 1000)
    beta = BETAS.get(kind, 0.5)
    sb = s.bfloat16().requires_grad_()
    value = divergence(sb, t.bfloat16(), kind, beta=beta, temperature=2.0)
    value.backward()
    assert value.dtype == torch.float32 and sb.grad.dtype == torch.bfloat16
    # the same bf16 numbers upcast: computed in fp32, so this is tight
    exact = divergence(sb.detach().float(), t.bfloat16().float(), kind, beta=beta, temperature=2.0)
    torch.testing.assert_close(value.detach(), exact, rtol=1e-5, atol=1e-6)
    # against the unrounded fp32 logits: bf16 rounding of the logits (8 bits of mantissa) is the only error
    full = divergence(s, t, kind, beta=beta, temperature=2.0)
    torch.testing.assert_close(value.detach(), full, rtol=3e-2, atol=1e-3)
    assert torch.isfinite(sb.grad).all()


@pytest.mark.parametrize("kind", KINDS)
def test_all_masked_gives_zero_and_finite_grads(gen, kind):
    s = _logits(gen, 2, 3, 37).requires_grad_()
    t = _logits(gen, 2, 3, 37)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for reduction in ("mean", "sum"):
        value = divergence(s, t, kind, mask=mask, reduction=reduction)
        assert value.item() == 0.0
        value.backward()
        assert s.grad is not None and s.grad.abs().max() == 0
        s.grad = None
    none = divergence(s, t, kind, mask=mask, reduction="none")
    assert none.shape == (2, 3) and none.abs().max() == 0


def test_masked_rows_may_hold_garbage(gen):
    """NaN or all -inf logits at masked positions (padding) never reach the value or the gradient."""
    s, t = _logits(gen, 2, 4, 37), _logits(gen, 2, 4, 37)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 2:] = False
    s[1, 2], t[1, 3] = float("nan"), float("-inf")
    s.requires_grad_()
    for kind in KINDS:
        value = divergence(s, t, kind, mask=mask)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(s.grad).all()
        s.grad = None


@pytest.mark.parametrize("kind", KINDS)
def test_reductions_consistent(gen, kind):
    s, t = _logits(gen, 3, 5, 37), _logits(gen, 3, 5, 37)
    mask = torch.rand(3, 5, generator=gen) > 0.5
    mask[0, 0] = True
    kw = dict(kind=kind, temperature=1.3, mask=mask)
    total, count = divergence(s, t, reduction="sum", **kw), mask.sum()
    torch.testing.assert_close(divergence(s, t, reduction="mean", **kw) * count, total)
    none = divergence(s, t, reduction="none", **kw)
    torch.testing.assert_close(none.sum(), total)
    assert (none[~mask] == 0).all()
    # no mask = everything counts
    torch.testing.assert_close(divergence(s, t, kind, reduction="mean") * 15, divergence(s, t, kind, reduction="sum"))


def test_arbitrary_leading_dims(gen):
    s, t = _logits(gen, 2, 3, 4, 37), _logits(gen, 2, 3, 4, 37)
    flat = divergence(s.reshape(-1, 37), t.reshape(-1, 37), reduction="none")
    torch.testing.assert_close(divergence(s, t, reduction="none"), flat.reshape(2, 3, 4))
    one = divergence(s[0, 0, 0], t[0, 0, 0], reduction="none")
    assert one.shape == () and one.item() == pytest.approx(flat[0].item())


# ---------------------------------------------------------------------------------------------------------------
# errors a user can cause


def test_errors_name_the_problem():
    s, t = torch.zeros(2, 3, 10), torch.zeros(2, 3, 10)
    with pytest.raises(ValueError, match="unknown divergence kind 'kl'.*forward_kl, reverse_kl, jsd"):
        divergence(s, t, "kl")
    with pytest.raises(ValueError, match="temperature must be .* > 0, got 0"):
        divergence(s, t, temperature=0)
    with pytest.raises(ValueError, match="temperature"):
        divergence(s, t, temperature=-1.0)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\], got 1.5"):
        divergence(s, t, "jsd", beta=1.5)
    with pytest.raises(ValueError, match="unknown reduction 'avg'"):
        divergence(s, t, reduction="avg")
    with pytest.raises(ValueError, match=r"\(2, 3, 10\).*\(2, 4, 10\)") as info:
        divergence(s, torch.zeros(2, 4, 10))
    assert "shared vocab" not in str(info.value)
    with pytest.raises(ValueError, match=r"\(2, 3, 10\).*\(2, 3, 12\).*slice both to the shared vocab"):
        divergence(s, torch.zeros(2, 3, 12))
    with pytest.raises(ValueError, match="mask shape"):
        divergence(s, t, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="float"):
        divergence(s.long(), t)
