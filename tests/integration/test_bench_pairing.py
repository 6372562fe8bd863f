"""The engine benchmark's paired runs (tests/bench/run.py, engine_step.py): engines started together
really take turns step by step, an engine that refuses its configuration keeps the rotation going,
and ratios are taken step by step."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import run  # noqa: E402


def test_paired_ratio_cancels_drift() -> None:
    # The machine slows down 2x halfway; `b` is always 1.5x slower than `a` at the same moment.
    drift = [1.0] * 10 + [2.0] * 10
    a = {"steps_s": [0.1 * d for d in drift]}
    b = {"steps_s": [0.15 * d for d in drift]}
    median, lo, hi = run.paired(a, b)
    assert median == pytest.approx(1.5) and lo == pytest.approx(1.5) and hi == pytest.approx(1.5)
    assert run.paired(a, {"steps_s": [0.1] * 19}) is None  # unequal runs are not paired
    assert run.paired(a, {"error": "refused"}) is None


def test_table_shows_paired_ratio_and_its_spread() -> None:
    name = run.set_name("bench", "fp32", 1)
    base = {"stage": 1, "precision": "fp32", "shape": "bench", "compile": "off", "set": name,
            "peak_rss_bytes": 2**30}
    dsl = {**base, "impl": "dsl", "steps_s": [1.0, 1.0, 1.0, 2.0], "tokens_per_s": 4000}
    ds = {**base, "impl": "deepspeed", "steps_s": [1.2, 1.1, 1.3, 2.4], "tokens_per_s": 3500}
    text = run.table([dsl, ds], "bench")
    row = next(ln for ln in text.splitlines() if ln.startswith("| fp32 | 1 |"))
    assert "| 4,000 | 3,500 | 1.20x [1.12-1.28] |" in row


def test_engines_take_turns_and_a_refusal_keeps_the_rotation() -> None:
    py = sys.executable
    variants = [(py, "local", 0, "fp32", "tiny", "off"), (py, "ddp", 0, "fp32", "tiny", "off"),
                # DeepSpeed is not installed in the project's environment: this slot fails at setup
                (py, "deepspeed", 0, "fp32", "tiny", "off")]
    local, ddp, ds = run.run_set(variants, steps=20, warmup=2, timeout=600)
    assert "error" in ds and "deepspeed" in ds["error"].lower()
    for r in (local, ddp):
        assert "error" not in r, r
        assert len(r["steps_s"]) == 20 and len(r["starts_unix"]) == 22
    # Strict alternation: local's k-th step starts before ddp's k-th, which starts before local's
    # (k+1)-th; and each step ended before the next slot started (the turn is passed after it).
    for k in range(22):
        assert local["starts_unix"][k] < ddp["starts_unix"][k]
        if k + 1 < 22:
            assert ddp["starts_unix"][k] < local["starts_unix"][k + 1]
    for k in range(2, 22):  # measured steps (after the 2 warm-up ones)
        assert local["starts_unix"][k] + local["steps_s"][k - 2] <= ddp["starts_unix"][k] + 1e-3
