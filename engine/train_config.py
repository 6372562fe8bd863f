"""What the bundled trainer trains: the `run.train:` section of a spec (model, data, steps).

Plain pydantic v2 data, no torch (the launcher and the planner read it on login nodes). How the
engine trains (ZeRO stage, precision, optimizer, batch) is `engine/config.py`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dsl.engine.config import StrictModel


class ModelConfig(StrictModel):
    """A Llama-style decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention), in Hugging Face's
    names. `preset` fills every field not written explicitly."""

    preset: str | None = None
    """A named shape (see engine/presets.py): tiny, bench, llama-1b, llama2-7b, llama3-8b,
    llama2-13b, llama2-70b, llama3-70b. Fields written next to it override the preset's."""
    vocab_size: int = Field(256, ge=2)
    """Number of token ids."""
    hidden_size: int = Field(64, ge=1)
    """Width of the residual stream (d_model)."""
    num_hidden_layers: int = Field(2, ge=1)
    """Number of transformer blocks."""
    num_attention_heads: int = Field(4, ge=1)
    """Query heads per block; must divide hidden_size."""
    num_key_value_heads: int | None = Field(None, ge=1)
    """Key/value heads (grouped-query attention); must divide num_attention_heads. Default: as many
    as query heads (multi-head attention)."""
    intermediate_size: int | None = Field(None, ge=1)
    """Inner width of the SwiGLU MLP; default: 8/3 x hidden_size rounded up to a multiple of 16."""
    seq_len: int = Field(64, ge=2)
    """Tokens per training sequence (also the longest position RoPE is used at)."""
    tie_word_embeddings: bool = True
    """Share the input embedding with the output projection."""
    rope_theta: float = Field(10000.0, gt=0)
    """Base of the rotary position embedding's frequencies."""
    rms_norm_eps: float = Field(1e-5, gt=0)
    """Epsilon of RMSNorm."""
    num_experts: int = Field(0, ge=0)
    """Mixture-of-experts MLPs per layer (0: dense). Used by the planner; the engine trains dense."""
    num_experts_per_tok: int = Field(2, ge=1)
    """Experts each token is routed to (MoE only)."""

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("preset") is not None:
            from dsl.engine.presets import PRESETS

            name = data["preset"]
            if name not in PRESETS:
                raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
            return {**PRESETS[name], **data}
        return data

    @model_validator(mode="after")
    def _divisible(self) -> "ModelConfig":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size "
                f"({self.hidden_size}); hidden_size/heads = {self.hidden_size / self.num_attention_heads:g}")
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim = hidden_size / num_attention_heads = {self.hidden_size} / "
                f"{self.num_attention_heads} = {self.head_dim} must be even (RoPE rotates pairs)")
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(f"num_key_value_heads ({self.kv_heads}) must divide num_attention_heads "
                             f"({self.num_attention_heads})")
        return self

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        return -(-int(8 * self.hidden_size / 3) // 16) * 16


class DataConfig(StrictModel):
    """Where training tokens come from (`run.train.data`). Every rank reads by global sample
    index, so any split of a global batch over ranks and micro-steps reads the same samples."""

    kind: Literal["synthetic", "tokens"] = "synthetic"
    """`synthetic`: tokens from a fixed random Markov chain (learnable, needs no files).
    `tokens`: sequences cut from a flat file of token ids (`path`, `dtype`)."""
    seed: int = 1234
    """Seed of the synthetic chain, or of the window order of a token file with order: shuffle;
    the same seed gives the same sequences on every run."""
    path: str | None = None
    """kind: tokens only: a flat binary file of token ids (nanoGPT's train.bin format: no header,
    native byte order), memory-mapped, never loaded whole. Relative paths start at the ranks'
    working directory (run.workdir; default where `dsl launch` runs)."""
    dtype: Literal["uint16", "uint32"] = "uint16"
    """kind: tokens only: the integer type of each token id in `path` (uint16 for vocabularies of
    up to 65,536 ids)."""
    order: Literal["shuffle", "sequential"] = "shuffle"
    """kind: tokens only: read the file's seq_len-token windows in a permutation drawn anew for
    every epoch from `seed` (shuffle), or front to back (sequential); both wrap around at the end."""

    @model_validator(mode="after")
    def _path_with_tokens(self) -> "DataConfig":
        if self.kind == "tokens" and self.path is None:
            raise ValueError("kind: tokens needs path: the token file to read")
        if self.kind == "synthetic" and self.path is not None:
            raise ValueError(f"path ({self.path!r}) is read only with kind: tokens; "
                             "set kind: tokens or remove path")
        return self


class TrainConfig(StrictModel):
    """Settings of a training run of the bundled engine (`run.train`)."""

    model: ModelConfig = ModelConfig()
    """The model to train."""
    data: DataConfig = DataConfig()
    """The training data."""
    steps: int = Field(300, ge=1)
    """Optimizer steps to run (the optimizer and its schedule are in the engine section)."""
    seed: int = 0
    """Seed of model initialisation; every rank starts from the same weights."""
    log_every: int = Field(10, ge=1)
    """Print a progress line (and write metrics.jsonl) every this many steps."""
    checkpoint_every: int | None = Field(None, ge=1)
    """Write a checkpoint to output_dir/checkpoints every this many steps (and at the end)."""
    keep_checkpoints: int = Field(3, ge=1)
    """How many of the newest checkpoints to keep."""
    resume: bool = True
    """Continue from output_dir/checkpoints/latest when it exists."""
