"""a(t): how much a co-distilled student listens to its teacher at optimizer step t.

    student loss = a(t) * divergence(student, teacher.detach()) + (1 - a(t)) * CE(student, ground truth)

Schedules (`loss.weight.schedule`):

- ``constant``: ``a = value``.
- ``linear`` / ``cosine``: ``start_value`` up to ``value`` over ``[start_step, end_step]`` (flat before and after);
  cosine is the half-cosine shape ``start + (value - start) * (1 - cos(pi * p)) / 2``, slow at both ends.
- ``dynamic``: driven by how much better the teacher currently predicts the data than the student::

      gap  = (L_S - L_T) / L_S                    relative per-token CE gap, from running averages
      a(t) = value * clip(gap / gap_scale, 0, 1)

  ``L_T`` and ``L_S`` are bias-corrected exponential moving averages (decay ``ema``) of each model's per-token CE on
  the training batches, measured by the forward passes the step runs anyway, *before* either model is updated on
  that batch. In the first epoch no model has seen the batch yet, so these are held-out estimates at no extra cost.
  ``a(t)`` only uses measurements of steps ``< t``; with none yet it is 0 (nothing says the teacher is any good).

Why this rule: the divergence term moves the student towards the teacher's distribution, which helps exactly as far
as that distribution is closer to the truth than the student's own. The CE gap measures that directly: an untrained
teacher is no better than the student (gap <= 0, a = 0, the student learns from ground truth alone); as the larger
teacher pulls ahead the weight grows, saturating at ``value`` once the teacher is ``gap_scale`` (10 % by default)
better, so some ground-truth signal always remains. A teacher that gets worse (a bad update, divergence, noise) raises
``L_T`` and the weight falls within ~1 / (1 - ema) steps. Teacher *confidence* was rejected as the signal: it measures
sharpness, not correctness, and a collapsed teacher can be very confident. The gap is relative so one ``gap_scale``
fits any vocabulary size. It is self-limiting: as the student catches up through distillation the gap shrinks and
the weight backs off towards ground truth, which is what one wants when the teacher has nothing left to teach.

Every schedule is a pure function of the step and a small JSON state (``state_dict``), so resume is exact.
"""

from __future__ import annotations

import math
from typing import Any

from lmdistill.config import CodistillWeightConfig


class Weighting:
    """Base: a(t) from the step alone; `observe` and the state are no-ops."""

    def value(self, step: int) -> float:
        """a(t) for optimizer step `step` (0-based), in [0, 1]."""
        raise NotImplementedError

    def observe(self, teacher_ce: float, student_ce: float) -> None:
        """Per-token CE of both models on the step's batch, measured before their updates."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class ConstantWeight(Weighting):
    def __init__(self, value: float) -> None:
        self.a = float(value)

    def value(self, step: int) -> float:
        return self.a


class RampWeight(Weighting):
    """start_value until start_step, then linear or half-cosine up to value at end_step, value afterwards."""

    def __init__(self, start_value: float, value: float, start_step: int, end_step: int, shape: str = "linear") -> None:
        if end_step <= start_step:
            raise ValueError(f"a ramp needs end_step > start_step, got {start_step}..{end_step}")
        if shape not in ("linear", "cosine"):
            raise ValueError(f"unknown ramp shape {shape!r}; choose linear or cosine")
        self.lo, self.hi, self.t0, self.t1, self.shape = float(start_value), float(value), start_step, end_step, shape

    def value(self, step: int) -> float:
        p = min(max((step - self.t0) / (self.t1 - self.t0), 0.0), 1.0)
        if self.shape == "cosine":
            p = 0.5 * (1.0 - math.cos(math.pi * p))
        return self.lo + (self.hi - self.lo) * p


class DynamicWeight(Weighting):
    """a = value * clip(((L_S - L_T) / L_S) / gap_scale, 0, 1) over bias-corrected EMAs of both models' CE."""

    def __init__(self, value: float, ema: float = 0.9, gap_scale: float = 0.1) -> None:
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        if gap_scale <= 0:
            raise ValueError(f"gap_scale must be > 0, got {gap_scale}")
        self.ceiling, self.decay, self.gap_scale = float(value), float(ema), float(gap_scale)
        self.m_teacher = 0.0
        self.m_student = 0.0
        self.n = 0

    def running_ce(self) -> tuple[float, float] | None:
        """(L_T, L_S): bias-corrected running per-token CE of teacher and student, or None before any observation."""
        if self.n == 0:
            return None
        correction = 1.0 - self.decay**self.n
        return self.m_teacher / correction, self.m_student / correction

    def gap(self) -> float | None:
        ce = self.running_ce()
        if ce is None:
            return None
        l_t, l_s = ce
        if not (math.isfinite(l_t) and math.isfinite(l_s)) or l_s <= 0:
            return None
        return (l_s - l_t) / l_s

    def value(self, step: int) -> float:
        g = self.gap()
        if g is None:
            return 0.0  # no evidence yet (or a non-finite loss): trust the ground truth only
        return self.ceiling * min(max(g / self.gap_scale, 0.0), 1.0)

    def observe(self, teacher_ce: float, student_ce: float) -> None:
        if not math.isfinite(student_ce):
            return  # nothing to compare the teacher against
        if not math.isfinite(teacher_ce):
            teacher_ce = 1e9  # a diverged teacher is as bad as it gets (a -> 0), without NaN in the averages
        self.m_teacher = self.decay * self.m_teacher + (1 - self.decay) * float(teacher_ce)
        self.m_student = self.decay * self.m_student + (1 - self.decay) * float(student_ce)
        self.n += 1

    def state_dict(self) -> dict[str, Any]:
        return {"m_teacher": self.m_teacher, "m_student": self.m_student, "n": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.m_teacher = float(state["m_teacher"])
        self.m_student = float(state["m_student"])
        self.n = int(state["n"])


def build_weighting(cfg: CodistillWeightConfig, max_steps: int) -> Weighting:
    """The schedule `cfg` names; a ramp without end_step ends at `max_steps`."""
    if cfg.schedule == "constant":
        return ConstantWeight(cfg.value)
    if cfg.schedule in ("linear", "cosine"):
        end = cfg.end_step if cfg.end_step is not None else max(max_steps, cfg.start_step + 1)
        return RampWeight(cfg.start_value, cfg.value, cfg.start_step, end, shape=cfg.schedule)
    return DynamicWeight(cfg.value, ema=cfg.ema, gap_scale=cfg.gap_scale)
