"""The memory model's peak is the live peak a training step reaches (engine/memory_peak.py).

Measured, not derived: 2 gloo ranks train the bundled model and a thread samples glibc's in-use
heap bytes through a step (tests/heap_measure.py); the model's device peak (without the runtime
term) must be within 10% of the larger rank's live peak, and the phase it names must be the one
where the terms it leaves out were indeed not live (with checkpointing the sum of every term
overstates the peak by the recomputed layer, measurably).
"""

from __future__ import annotations

import pytest

from tests.heap_measure import measure_heap, predicted_live

EAGER = {"compile": False, "micro_batch": 8}
CASES = [
    {"zero_stage": 0, "precision": "fp32", **EAGER},
    {"zero_stage": 1, "precision": "bf16", **EAGER},
    {"zero_stage": 2, "precision": "fp32", **EAGER},
    {"zero_stage": 3, "precision": "bf16", **EAGER},
    {"zero_stage": 3, "precision": "bf16", "activation_checkpointing": True, **EAGER},
    {"zero_stage": 2, "precision": "bf16", "offload": {"optimizer": "cpu"}, **EAGER},
    {"zero_stage": 2, "precision": "fp32", "tiled_loss": {"enabled": True, "chunk_tokens": 512},
     "tiled_mlp": {"enabled": True, "chunk_tokens": 512}, **EAGER},
]


@pytest.fixture(scope="module")
def measured():
    from dsl.engine.presets import PRESETS

    model = dict(PRESETS["bench"])
    return model, measure_heap([dict(c) for c in CASES], model)


@pytest.mark.parametrize("index", range(len(CASES)), ids=lambda i: "-".join(
    f"{k}={v}" for k, v in CASES[i].items() if k not in EAGER))
def test_predicted_peak_is_the_measured_live_peak_within_10_percent(measured, index):
    model, ranks = measured
    predicted, phase = predicted_live(model, CASES[index])
    live = max(r[index]["peak"] for r in ranks)
    assert abs(live / predicted - 1) <= 0.10, (CASES[index], phase, predicted / 2**20, live / 2**20)


def test_the_sum_of_every_term_overstates_a_checkpointed_step(measured):
    """With checkpointing the recomputed layer and the logits are never live together: the sum
    adds both, the phase peak does not, and the measurement sides with the phase peak."""
    from dsl.engine.config import EngineConfig
    from dsl.engine.memory import RUNTIME, estimate
    from dsl.engine.train_config import ModelConfig

    model, ranks = measured
    index = next(i for i, c in enumerate(CASES) if c.get("activation_checkpointing"))
    b = estimate(ModelConfig(**model), EngineConfig(**CASES[index]), dp=2, accelerator=False)
    runtime = b.term(RUNTIME).device_bytes
    live = max(r[index]["peak"] for r in ranks)
    assert b.device_sum_bytes > b.device_bytes
    assert abs(live - (b.device_bytes - runtime)) < abs(live - (b.device_sum_bytes - runtime))
    assert b.peak.phase == "loss backward" and "recomputation peak" not in dict(b.peak.live)
