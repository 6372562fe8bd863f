"""Warm-up + cosine learning-rate schedule values."""

from __future__ import annotations

import math

import pytest

from dsl.engine.schedule import WarmupCosine


def test_warmup_is_linear_and_peaks_at_warmup_end() -> None:
    s = WarmupCosine(lr=3e-3, warmup_steps=20, total_steps=300, min_lr_ratio=0.1)
    assert s(1) == pytest.approx(3e-3 / 20)
    assert s(10) == pytest.approx(1.5e-3)
    assert s(20) == pytest.approx(3e-3)


def test_cosine_reaches_min_at_the_last_step_and_stays() -> None:
    s = WarmupCosine(lr=3e-3, warmup_steps=20, total_steps=300, min_lr_ratio=0.1)
    assert s(300) == pytest.approx(3e-4)
    assert s(400) == pytest.approx(3e-4)
    # Half-way through the decay: the mean of peak and floor.
    assert s(160) == pytest.approx((3e-3 + 3e-4) / 2)
    values = [s(step) for step in range(20, 301)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_without_warmup_first_step_is_almost_peak() -> None:
    s = WarmupCosine(lr=1.0, warmup_steps=0, total_steps=100, min_lr_ratio=0.0)
    assert s(1) == pytest.approx(0.5 * (1 + math.cos(math.pi / 100)))
    assert s(100) == pytest.approx(0.0)


def test_warmup_longer_than_run_never_decays() -> None:
    s = WarmupCosine(lr=1.0, warmup_steps=10, total_steps=5)
    assert s(5) == pytest.approx(0.5)
    assert s(10) == pytest.approx(1.0)
    assert s(11) == pytest.approx(1.0)


def test_step_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="from 1"):
        WarmupCosine(lr=1.0, warmup_steps=1, total_steps=2)(0)
