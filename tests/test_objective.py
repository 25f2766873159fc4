"""The shared soft/hard arithmetic: CE as (sum, count), the alpha mix, normalisation by the global token count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmdistill.losses import ce_sum_and_count, divergence, mix


def _batch(seed: int = 0, b: int = 3, t: int = 6, v: int = 37):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=gen) * 2
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[0, :2] = -100
    labels[2, -3:] = -100
    return logits, labels


def test_ce_matches_cross_entropy():
    logits, labels = _batch()
    total, count = ce_sum_and_count(logits, labels)
    expected = F.cross_entropy(logits.reshape(-1, 37), labels.reshape(-1), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(total, expected)
    assert count.item() == 13 and count.dtype == torch.int64
    mean = F.cross_entropy(logits.reshape(-1, 37), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(total / count, mean)


def test_ce_bf16_computed_in_fp32_and_all_ignored():
    logits, labels = _batch(1)
    total, _ = ce_sum_and_count(logits.bfloat16(), labels)
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, ce_sum_and_count(logits.bfloat16().float(), labels)[0])
    x = logits.clone().requires_grad_()
    total, count = ce_sum_and_count(x, torch.full_like(labels, -100))
    total.backward()
    assert total.item() == 0.0 and count.item() == 0 and torch.isfinite(x.grad).all()
    assert mix(None, total, count, 0.0).item() == 0.0  # all padding: 0, not NaN


def test_ce_shape_error():
    logits, labels = _batch()
    with pytest.raises(ValueError, match=r"labels shape \(3, 5\).*\(3, 6\)"):
        ce_sum_and_count(logits, labels[:, 1:])


def test_mix_arithmetic():
    kd, ce = torch.tensor(6.0), torch.tensor(10.0)
    assert mix(kd, ce, 4, 0.25).item() == pytest.approx((0.25 * 6 + 0.75 * 10) / 4)
    assert mix(kd, ce, torch.tensor(4), 1.0).item() == pytest.approx(1.5)
    assert mix(kd, ce, 4, 0.0).item() == pytest.approx(2.5)
    assert mix(kd, ce, 0, 0.5).item() == pytest.approx(8.0)  # n_tokens clamped to 1
    # a term with weight 0 is skipped, so a NaN or None there cannot leak in
    assert mix(torch.tensor(float("nan")), ce, 4, 0.0).item() == pytest.approx(2.5)
    assert mix(kd, None, 4, 1.0).item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="kd_sum is None"):
        mix(None, ce, 4, 0.5)
    with pytest.raises(ValueError, match="ce_sum is None"):
        mix(kd, None, 4, 0.5)


@pytest.mark.parametrize("alpha", [1.5, -0.1, float("nan"), "x"])
def test_mix_alpha_validation(alpha):
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got"):
        mix(torch.tensor(1.0), torch.tensor(1.0), 1, alpha)
    if alpha == 1.5:
        with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
            mix(torch.tensor(1.0), torch.tensor(1.0), 1, alpha)


def test_accumulated_micro_batches_equal_one_batch():
    """Sums over uneven micro-batches divided once by the global count == the loss of the whole batch."""
    logits, labels = _batch(2, b=4)
    teacher = torch.randn_like(logits)
    mask = labels != -100
    alpha = 0.7

    whole_ce, n = ce_sum_and_count(logits, labels)
    whole_kd = divergence(logits, teacher, mask=mask, reduction="sum")
    whole = mix(whole_kd, whole_ce, n, alpha)

    ce_parts, kd_parts, counts = [], [], []
    for rows in (slice(0, 1), slice(1, 4)):  # uneven split, different padding per micro-batch
        c, k = ce_sum_and_count(logits[rows], labels[rows])
        d = divergence(logits[rows], teacher[rows], mask=mask[rows], reduction="sum")
        ce_parts.append(c)
        kd_parts.append(d)
        counts.append(k)
    global_n = sum(counts)
    accumulated = sum(mix(d, c, global_n, alpha) for d, c in zip(kd_parts, ce_parts, strict=True))
    torch.testing.assert_close(accumulated, whole)
    # the per-micro-batch mean (the classic bug) differs when padding is uneven
    naive = sum(mix(d, c, k, alpha) for d, c, k in zip(kd_parts, ce_parts, counts, strict=True)) / 2
    assert not torch.allclose(naive, whole)


@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
def test_chunked_ce_matches_cross_entropy_on_materialised_logits(softcap):
    from lmdistill.losses import Head
    from lmdistill.losses.chunked_ce import chunked_ce_sum_and_count, chunked_ce_sums

    gen = torch.Generator().manual_seed(5)
    h = torch.randn(3, 7, 16, generator=gen).requires_grad_()
    w = (torch.randn(41, 16, generator=gen) * 0.5).requires_grad_()
    b = (torch.randn(41, generator=gen) * 0.3).requires_grad_()
    gt = torch.randint(0, 41, (3, 7), generator=gen)
    gt[0, :3] = -100
    teacher = torch.randint(0, 41, (3, 7), generator=gen)
    teacher[1, 2:] = -100  # the two label sets skip different positions

    logits = (h @ w.t() + b) * 1.5
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)

    def ref(labels):
        return F.cross_entropy(logits.reshape(-1, 41), labels.reshape(-1), reduction="sum")

    head = Head(w, b, scale=1.5, softcap=softcap)
    one, count = chunked_ce_sum_and_count(h, head, gt, chunk_size=4)  # 21 positions: chunks of 4, last 1
    assert count.item() == int((gt != -100).sum())
    torch.testing.assert_close(one, ref(gt))
    both = chunked_ce_sums(h, head, [teacher, gt], chunk_size=4)
    torch.testing.assert_close(both, torch.stack([ref(teacher), ref(gt)]))
    mixed, want = 0.3 * both[0] + 0.7 * both[1], 0.3 * ref(teacher) + 0.7 * ref(gt)
    for got_g, want_g in zip(torch.autograd.grad(mixed, [h, w, b]), torch.autograd.grad(want, [h, w, b]),
                             strict=True):
        torch.testing.assert_close(got_g, want_g, rtol=1e-5, atol=1e-6)
