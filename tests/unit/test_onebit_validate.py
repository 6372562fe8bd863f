"""`dsl validate` on specs that combine 1-bit Adam or int8 gradient quantization with a ZeRO stage
they do not support: exit 2, one located line naming the field and the stages that work."""

from __future__ import annotations

import pytest

from dsl.engine.config import EngineConfig, unsupported_reason
from tests.conftest import run_dsl

SPEC = """name: onebit
run:
  train: {{model: {{preset: tiny}}, steps: 10}}
engine:
  zero_stage: {stage}
  optimizer:
    type: onebit_adam
    freeze_step: 5
"""


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_validate_rejects_onebit_adam_at_partitioned_stages(write, stage):
    spec = write("job.yaml", SPEC.format(stage=stage))
    proc = run_dsl("validate", str(spec))
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"dsl: error: {spec}:7:5 engine.optimizer: optimizer.type onebit_adam works with "
                           f"zero_stage 0 only (got zero_stage: {stage})"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_validate_accepts_onebit_adam_at_stage_0(write):
    spec = write("job.yaml", SPEC.format(stage=0))
    proc = run_dsl("validate", str(spec))
    assert proc.returncode == 0, proc.stderr
    assert f"{spec}: ok" in proc.stdout


def test_validate_rejects_quantized_gradients_without_reduce_scatter(write):
    spec = write("job.yaml", "name: q\nrun: {train: {}}\nengine:\n  zero_stage: 0\n"
                             "  comm:\n    quantize_gradients: true\n")
    proc = run_dsl("validate", str(spec))
    assert proc.returncode == 2
    assert f"{spec}:6:5 engine.comm: comm.quantize_gradients quantizes the gradient reduce-scatter " \
           "of zero_stage 2 or 3 only (got zero_stage: 0" in proc.stderr


def test_planner_configs_are_refused_too():
    """The planner varies zero_stage with model_copy (no validators): unsupported_reason must
    refuse 1-bit Adam at stage 2 so that `zero_stage: auto` never lands there."""
    auto = EngineConfig(zero_stage="auto", optimizer={"type": "onebit_adam"})
    assert unsupported_reason(auto.model_copy(update={"zero_stage": 0})) is None
    assert "zero_stage 0 only" in unsupported_reason(auto.model_copy(update={"zero_stage": 2}))
    assert "precision fp32 or bf16" in unsupported_reason(EngineConfig(precision="fp16", optimizer={"type": "onebit_adam"}))
    assert "offload.optimizer: none" in unsupported_reason(
        EngineConfig(zero_stage="auto", optimizer={"type": "onebit_adam"}, offload={"optimizer": "cpu"}))
