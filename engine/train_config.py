"""What the bundled trainer trains: the `run.train:` section of a spec (model, data, steps).

Plain pydantic v2 data, no torch (the launcher and the planner read it on login nodes). How the
engine trains (ZeRO stage, precision, optimizer, batch) is `engine/config.py`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dsl.engine.config import StrictModel


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
