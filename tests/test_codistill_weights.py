"""a(t) schedules of co-distillation: the values they promise, and the dynamic rule's bounds and responses."""

from __future__ import annotations

import math

import pytest

from lmdistill.codistill_weights import ConstantWeight, DynamicWeight, RampWeight, build_weighting
from lmdistill.config import CodistillWeightConfig
from lmdistill.errors import ConfigError


def test_constant_is_constant():
    w = ConstantWeight(0.3)
    assert [w.value(s) for s in (0, 1, 50, 10_000)] == [0.3] * 4


def test_linear_ramp_values():
    w = RampWeight(0.1, 0.9, start_step=10, end_step=30, shape="linear")
    assert w.value(0) == pytest.approx(0.1)
    assert w.value(10) == pytest.approx(0.1)
    assert w.value(15) == pytest.approx(0.1 + 0.8 * 0.25)
    assert w.value(20) == pytest.approx(0.5)
    assert w.value(30) == pytest.approx(0.9)
    assert w.value(1000) == pytest.approx(0.9)


def test_cosine_ramp_values():
    w = RampWeight(0.0, 1.0, start_step=0, end_step=100, shape="cosine")
    assert w.value(0) == pytest.approx(0.0)
    assert w.value(25) == pytest.approx(0.5 * (1 - math.cos(math.pi / 4)))
    assert w.value(50) == pytest.approx(0.5)
    assert w.value(100) == pytest.approx(1.0)
    # slower than linear at the start, faster in the middle
    assert w.value(10) < 0.1
    assert w.value(40) - w.value(30) > 0.1


def test_ramp_ends_at_max_steps_by_default_and_down_ramps_work():
    w = build_weighting(CodistillWeightConfig(schedule="linear", start_value=0.0, value=0.8), max_steps=40)
    assert w.value(20) == pytest.approx(0.4) and w.value(40) == pytest.approx(0.8)
    down = build_weighting(CodistillWeightConfig(schedule="linear", start_value=0.9, value=0.1, end_step=10), 100)
    assert down.value(0) == pytest.approx(0.9) and down.value(5) == pytest.approx(0.5)


def test_config_refuses_bad_weights():
    from lmdistill.config import CodistillConfig, load_config

    with pytest.raises(ConfigError, match="value"):
        load_config(CodistillConfig, None, ["--loss.weight.value", "1.5"])
    with pytest.raises(ConfigError, match="end_step"):
        load_config(CodistillConfig, None, ["--loss.weight.start_step", "10", "--loss.weight.end_step", "5"])
    with pytest.raises(ConfigError, match="schedule"):
        load_config(CodistillConfig, None, ["--loss.weight.schedule", "sometimes"])


def test_dynamic_starts_at_zero_and_follows_the_gap():
    w = DynamicWeight(0.8, ema=0.0, gap_scale=0.1)  # ema=0: the last observation alone, to pin exact values
    assert w.value(0) == 0.0  # no evidence yet
    w.observe(teacher_ce=4.75, student_ce=5.0)  # gap 5 % -> half of the way to the ceiling
    assert w.value(1) == pytest.approx(0.8 * 0.5)
    w.observe(teacher_ce=3.0, student_ce=5.0)  # gap 40 % >= gap_scale -> the ceiling
    assert w.value(2) == pytest.approx(0.8)
    w.observe(teacher_ce=5.5, student_ce=5.0)  # the teacher is worse than the student -> 0
    assert w.value(3) == 0.0


def test_dynamic_ema_is_bias_corrected():
    w = DynamicWeight(1.0, ema=0.9, gap_scale=0.1)
    w.observe(4.0, 5.0)
    assert w.running_ce() == pytest.approx((4.0, 5.0))  # not pulled towards the zero it starts from
    w.observe(2.0, 5.0)
    l_t, _ = w.running_ce()
    assert l_t == pytest.approx((0.9 * 0.1 * 4.0 + 0.1 * 2.0) / (1 - 0.81))


def test_dynamic_stays_in_unit_interval_and_drops_when_the_teacher_gets_worse():
    import random

    rng = random.Random(0)
    w = DynamicWeight(1.0, ema=0.8, gap_scale=0.05)
    values = []
    for step in range(200):  # a teacher that improves faster than the student, with noisy measurements
        t_ce = 6.0 * math.exp(-step / 60) + 1.0 + rng.gauss(0, 0.3)
        s_ce = 6.0 * math.exp(-step / 120) + 1.5 + rng.gauss(0, 0.3)
        w.observe(t_ce, s_ce)
        values.append(w.value(step + 1))
    assert all(0.0 <= v <= 1.0 for v in values)
    assert values[-1] > 0.9  # a mature teacher earns (nearly) the full weight
    before = values[-1]
    after = []
    for step in range(200, 215):  # the teacher is broken: its loss jumps above the student's
        w.observe(8.0, 2.2)
        after.append(w.value(step + 1))
    assert after[0] < before and after[-1] == 0.0
    assert all(b <= a for a, b in zip(after, after[1:], strict=False))
    w.observe(float("nan"), 2.2)  # a diverged teacher reads as maximally bad, never NaN
    assert w.value(216) == 0.0
    w.observe(1.0, float("inf"))  # an unusable student measurement is skipped
    assert w.value(217) == 0.0


def test_dynamic_state_round_trips_exactly():
    a, b = DynamicWeight(0.7, ema=0.9), DynamicWeight(0.7, ema=0.9)
    for t_ce, s_ce in [(5.1, 5.3), (4.2, 4.9), (3.3, 4.4)]:
        a.observe(t_ce, s_ce)
    import json

    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.value(3) == a.value(3)
    a.observe(3.0, 4.0)
    b.observe(3.0, 4.0)
    assert b.value(4) == a.value(4)
