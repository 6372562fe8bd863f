"""What the bundled engine runs: the `engine:` and `run.train:` sections of a spec.

Plain pydantic v2 data, no torch, so the launcher can validate and plan on a login node. The
launcher's `Spec` composes these models; the engine re-validates the same sections on every rank
from the resolved spec the launcher wrote, so both sides read one schema.

Every field carries a docstring: it is the field's description in `dsl schema`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    """Base of every spec model: unknown keys are errors, docstrings become descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class ModelConfig(StrictModel):
    """A GPT-style decoder (pre-norm, causal self-attention, GELU MLP)."""

    vocab_size: int = Field(256, ge=2)
    """Number of token ids."""
    hidden: int = Field(64, ge=1)
    """Width of the residual stream (d_model)."""
    layers: int = Field(2, ge=1)
    """Number of transformer blocks."""
    heads: int = Field(4, ge=1)
    """Attention heads per block; must divide `hidden`."""
    ffn: int | None = Field(None, ge=1)
    """Inner width of the MLP; default 4 x hidden."""
    seq_len: int = Field(64, ge=2)
    """Tokens per training sequence (also the context length)."""
    tied_embeddings: bool = True
    """Share the input embedding with the output projection."""

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "ModelConfig":
        if self.hidden % self.heads:
            raise ValueError(
                f"heads ({self.heads}) must divide hidden ({self.hidden}); "
                f"hidden/heads = {self.hidden / self.heads:g}"
            )
        return self

    @property
    def ffn_size(self) -> int:
        return self.ffn if self.ffn is not None else 4 * self.hidden


class DataConfig(StrictModel):
    """Where training tokens come from."""

    kind: Literal["synthetic"] = "synthetic"
    """`synthetic`: tokens from a fixed random Markov chain (learnable, needs no files)."""
    seed: int = 1234
    """Seed of the synthetic chain; the same seed gives the same tokens on every run."""


class TrainConfig(StrictModel):
    """Settings of a training run of the bundled engine (`run.train`)."""

    model: ModelConfig = ModelConfig()
    """The model to train."""
    data: DataConfig = DataConfig()
    """The training data."""
    steps: int = Field(300, ge=1)
    """Optimizer steps to run."""
    lr: float = Field(3e-3, gt=0)
    """Peak learning rate."""
    warmup_steps: int = Field(20, ge=0)
    """Linear warm-up steps before the cosine decay."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Final learning rate as a fraction of `lr`."""
    weight_decay: float = Field(0.0, ge=0)
    """Decoupled weight decay (AdamW)."""
    seed: int = 0
    """Seed of model initialisation; every rank starts from the same weights."""
    log_every: int = Field(10, ge=1)
    """Print a progress line (and write metrics.jsonl) every this many steps."""


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
