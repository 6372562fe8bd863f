"""How the bundled engine trains: the `engine:` section of a spec (and `StrictModel`).

Plain pydantic v2 data, no torch, so the launcher can validate and plan on a login node. The
launcher's `Spec` composes these models with `train_config.TrainConfig` (what is trained); the
engine re-validates the same sections on every rank from the resolved spec the launcher wrote,
so both sides read one schema.

Every field carries a docstring: it is the field's description in `dsl schema`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    """Base of every spec model: unknown keys are errors, docstrings become descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class EngineConfig(StrictModel):
    """How the engine trains: parallelism, precision and batch (`engine:` in the spec)."""

    zero_stage: Literal[0, 1, 2, 3, "auto"] = 0
    """ZeRO stage: 0 replicates everything, 1 shards optimizer states, 2 also gradients,
    3 also parameters. `auto` lets the planner choose."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Compute precision. bf16/fp16 keep fp32 master weights."""
    micro_batch: int = Field(8, ge=1)
    """Sequences per rank per forward/backward pass."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step; gradients are exchanged on the last one."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value; null disables clipping."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """The optimizer."""
    bucket_mib: float = Field(25.0, gt=0)
    """Size of a gradient all-reduce bucket in MiB."""


def unsupported_reason(engine: EngineConfig) -> str | None:
    """Why this version of the bundled engine cannot run `engine`, or None when it can.

    Checked by the launcher at plan time (so `dsl launch` fails before starting anything) and by
    the engine itself on every rank.
    """
    if engine.zero_stage not in (0, "auto"):
        return (
            f"zero_stage {engine.zero_stage} is not implemented in this version of the bundled "
            "engine; use zero_stage: 0"
        )
    if engine.precision == "fp16":
        return "precision fp16 (dynamic loss scaling) is not implemented yet; use fp32 or bf16"
    return None
