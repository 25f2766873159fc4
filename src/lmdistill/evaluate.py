"""Held-out metrics of a student against ground truth and (optionally) its teacher.

Per target token: cross-entropy (-> perplexity), KL(teacher || student), top-1 agreement with the teacher, and the
expected calibration error of the student's top-1 prediction against the ground-truth next token.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmdistill.data import IGNORE, TokenBlocks

ECE_BINS = 15


def expected_calibration_error(confidence: Tensor, correct: Tensor, n_bins: int = ECE_BINS) -> float:
    """ECE = sum_b (|B_b| / N) * |accuracy(B_b) - mean confidence(B_b)| over equal-width confidence bins.

    Args:
        confidence: [N] top-1 probability of each prediction, in [0, 1].
        correct: [N] bool, whether the top-1 prediction was the true token.
    """
    hist = CalibrationHistogram(n_bins)
    hist.add(confidence, correct)
    return hist.ece()


@dataclass
class CalibrationHistogram:
    """Running per-bin sums, so ECE over many batches equals ECE over the concatenation."""

    n_bins: int = ECE_BINS
    count: Tensor = field(init=False)
    conf_sum: Tensor = field(init=False)
    correct_sum: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.count = torch.zeros(self.n_bins, dtype=torch.float64)
        self.conf_sum = torch.zeros(self.n_bins, dtype=torch.float64)
        self.correct_sum = torch.zeros(self.n_bins, dtype=torch.float64)

    def add(self, confidence: Tensor, correct: Tensor) -> None:
        conf = confidence.detach().double().flatten().cpu()
        # Bin b holds (b/n, (b+1)/n]; confidence exactly 0 goes to the first bin.
        idx = (torch.ceil(conf * self.n_bins).long() - 1).clamp(0, self.n_bins - 1)
        self.count.index_add_(0, idx, torch.ones_like(conf))
        self.conf_sum.index_add_(0, idx, conf)
        self.correct_sum.index_add_(0, idx, correct.detach().double().flatten().cpu())

    def ece(self) -> float:
        total = float(self.count.sum())
        if total == 0:
            return 0.0
        nonempty = self.count > 0
        gap = (self.correct_sum[nonempty] - self.conf_sum[nonempty]).abs()
        return float(gap.sum() / total)


@dataclass
class MetricSums:
    """Sums over target tokens; `result()` turns them into per-token means."""

    tokens: int = 0
    ce: float = 0.0
    kl: float = 0.0
    agree: float = 0.0
    teacher_ce: float = 0.0
    has_teacher: bool = False
    calib: CalibrationHistogram = field(default_factory=CalibrationHistogram)

    def add(self, student_logits: Tensor, labels: Tensor, teacher_logits: Tensor | None = None) -> None:
        """student_logits/teacher_logits [B, T, V] (sliced to the shared vocab), labels [B, T] with -100 ignored."""
        mask = labels != IGNORE
        if not mask.any():
            return
        s = student_logits[mask].float()
        y = labels[mask]
        logp = torch.log_softmax(s, dim=-1)
        self.tokens += int(y.numel())
        self.ce += float(F.nll_loss(logp, y, reduction="sum"))
        conf, pred = logp.max(dim=-1)
        self.calib.add(conf.exp(), pred == y)
        if teacher_logits is not None:
            self.has_teacher = True
            lt = torch.log_softmax(teacher_logits[mask].float(), dim=-1)
            pt = lt.exp()
            self.kl += float((pt * (lt - logp)).nan_to_num(0.0).sum())
            self.agree += float((pred == lt.argmax(dim=-1)).sum())
            self.teacher_ce += float(F.nll_loss(lt, y, reduction="sum"))

    def result(self) -> dict[str, float]:
        n = max(self.tokens, 1)
        out = {"ce": self.ce / n, "perplexity": math.exp(min(self.ce / n, 50.0)), "ece": self.calib.ece(),
               "tokens": float(self.tokens)}
        if self.has_teacher:
            out.update(kl_to_teacher=self.kl / n, agreement=self.agree / n,
                       teacher_perplexity=math.exp(min(self.teacher_ce / n, 50.0)))
        return out


@torch.no_grad()
def evaluate_blocks(student: nn.Module, blocks: TokenBlocks, *, n_vocab: int, batch_size: int = 4,
                    max_batches: int | None = None,
                    teacher_logits_fn: Callable[[dict[str, Tensor]], Tensor] | None = None,
                    device: torch.device | str | None = None) -> dict[str, float]:
    """Metrics of `student` on held-out blocks; with `teacher_logits_fn` also KL to the teacher and agreement."""
    if len(blocks) == 0:
        return {}
    was_training = student.training
    student.eval()
    device = device or next(student.parameters()).device
    sums = MetricSums()
    n_batches = math.ceil(len(blocks) / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    t0 = time.perf_counter()
    for b in range(n_batches):
        idx = list(range(b * batch_size, min((b + 1) * batch_size, len(blocks))))
        batch = {k: v.to(device) for k, v in blocks.batch(idx).items()}
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., :n_vocab]
        t_logits = teacher_logits_fn(batch)[..., :n_vocab] if teacher_logits_fn is not None else None
        sums.add(logits, batch["labels"], t_logits)
    out = sums.result()
    out["eval_tokens_per_s"] = sums.tokens / max(time.perf_counter() - t0, 1e-9)
    student.train(was_training)
    return out
