"""Issue 13's device-memory promise, on the planner's own output: for the 7B spec on 8 H100s, the
device bytes of dsl's model-state terms are at most DeepSpeed 0.19.8's estimator figure for every
setting it covers, and the engine runs each of those candidates (tests/bench/ds_parity.py writes
the same rows to docs/benchmarks.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from ds_parity import SETTINGS, plan_json, rows  # noqa: E402


@pytest.fixture(scope="module")
def parity() -> list[dict]:
    return rows(plan_json())


@pytest.mark.parametrize("index", range(len(SETTINGS)),
                         ids=[f"zero{s}-opt_{o}-params_{p}" for s, o, p, _, _ in SETTINGS])
def test_model_states_on_the_device_are_at_most_deepspeeds(parity, index):
    row = parity[index]
    assert row["unsupported"] is None, row
    assert row["dsl_bytes"] <= row["deepspeed_bytes"], row


def test_offload_leaves_only_16_bit_parameters(parity):
    by = {(r["stage"], r["offload"], r["offload_params"]): r for r in parity}
    p2 = by[(2, "cpu", "none")]
    assert p2["dsl_bytes"] == p2["deepspeed_bytes"]  # 2P: the bf16 parameters, nothing else
    assert by[(3, "cpu", "cpu")]["dsl_bytes"] == 0
