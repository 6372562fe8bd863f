"""What the bundled trainer trains: the `run.train:` section of a spec (model, data, steps).

Plain pydantic v2 data, no torch (the launcher and the planner read it on login nodes). How the
engine trains (ZeRO stage, precision, optimizer, batch) is `engine/config.py`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from dsl.engine.config import StrictModel


class ModelConfig(StrictModel):
    """The model, in one of three forms:

    - the bundled Llama-style decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention), in Hugging
      Face's names; `preset` fills every field not written explicitly. The trainer trains this one.
    - `hf: DIR` or `hf_config: FILE`: a Hugging Face model described by its config.json
      (engine/modeldesc/ counts its parameters by family); `seq_len` may be written next to it.
    - `params: N` and `largest_layer_params: M`: a model known only by its counts, with `layers`,
      `hidden`, `heads`, `vocab`, `seq_len` when known (activations need them).

    `dsl plan` describes all three; `dsl launch` trains the first two (engine/hf_model.py builds a
    Hugging Face model), not the counts (engine/validity.py `model_problems`)."""

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
    hf: str | None = None
    """A folder holding a Hugging Face model's config.json (relative paths start at the spec
    file's folder): `dsl plan` describes that model instead of the bundled Llama."""
    hf_config: str | None = None
    """A Hugging Face config.json file (relative paths start at the spec file's folder), as `hf`."""
    params: int | None = Field(None, ge=1)
    """Every parameter of a model known only by its counts (with largest_layer_params): model
    states are exact from it; activations need layers, hidden, heads, vocab and seq_len."""
    largest_layer_params: int | None = Field(None, ge=1)
    """With params: the parameters of the largest unit ZeRO-3 gathers at once (one transformer
    block, or the embedding), DeepSpeed's `largest_layer_params`."""
    layers: int | None = Field(None, ge=1)
    """With params: transformer blocks."""
    hidden: int | None = Field(None, ge=1)
    """With params: width of the residual stream."""
    heads: int | None = Field(None, ge=1)
    """With params: attention heads."""
    vocab: int | None = Field(None, ge=2)
    """With params: vocabulary size."""

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
    def _one_form(self) -> "ModelConfig":
        written = self.model_fields_set
        forms = [name for name in ("hf", "hf_config", "params") if getattr(self, name) is not None]
        if len(forms) > 1:
            raise ValueError(f"{' and '.join(forms)} are alternatives: give one (hf: a folder with config.json, "
                             "hf_config: the file itself, params: the counts)")
        llama = sorted(written & _LLAMA_FIELDS)
        # resolved.yaml writes every field, the unused count fields as null: only values count.
        counts = sorted(f for f in written & _COUNT_FIELDS if getattr(self, f) is not None)
        if forms and llama:
            source = "the counts" if forms == ["params"] else "config.json"
            raise ValueError(f"{', '.join(llama)} describe the bundled Llama; with {forms[0]} the model comes from "
                             f"{source}: remove {', '.join(llama)} (seq_len may stay)")
        if forms and forms != ["params"] and counts:
            raise ValueError(f"{', '.join(counts)} go with params (a model known by its counts); with {forms[0]} "
                             f"config.json gives the dimensions: remove {', '.join(counts)}")
        if forms == ["params"]:
            if self.largest_layer_params is None:
                raise ValueError("params needs largest_layer_params: the parameters of the largest block (or the "
                                 "embedding, when larger), which ZeRO-3 gathers at once")
            if self.largest_layer_params > self.params:  # type: ignore[operator]
                raise ValueError(f"largest_layer_params ({self.largest_layer_params:,}) is more than params "
                                 f"({self.params:,})")
            if self.heads is not None and self.hidden is not None and self.hidden % self.heads:
                raise ValueError(f"heads ({self.heads}) must divide hidden ({self.hidden})")
        elif not forms and counts:
            raise ValueError(f"{', '.join(counts)} describe a model known by its counts: they need params "
                             "(and largest_layer_params)")
        return self

    @model_serializer(mode="wrap")
    def _written(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A Hugging Face or counts model is dumped without the bundled Llama's fields: their
        defaults would otherwise come back as written values (`_one_form` refuses them), and the
        spec `dsl launch` writes for the ranks (resolved.yaml) is a dump."""
        data = handler(self)
        if self.form == "llama":
            return data
        return {key: value for key, value in data.items() if key not in _LLAMA_FIELDS}

    @property
    def form(self) -> str:
        """`llama` (the bundled decoder), `hf` (hf or hf_config) or `counts` (params)."""
        if self.hf is not None or self.hf_config is not None:
            return "hf"
        return "counts" if self.params is not None else "llama"

    @property
    def form_field(self) -> str:
        """The field that chose the form (hf, hf_config, params; preset or seq_len for the Llama)."""
        for name in ("hf", "hf_config", "params"):
            if getattr(self, name) is not None:
                return name
        return "preset" if self.preset is not None else "seq_len"

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


_LLAMA_FIELDS = frozenset({"preset", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "num_key_value_heads", "intermediate_size", "tie_word_embeddings", "rope_theta",
                           "rms_norm_eps", "num_experts", "num_experts_per_tok"})
_COUNT_FIELDS = frozenset({"largest_layer_params", "layers", "hidden", "heads", "vocab"})


class DataConfig(StrictModel):
    """Where training tokens come from (`run.train.data`). Every rank reads by global sample
    index, so any split of a global batch over ranks and micro-steps reads the same samples."""

    kind: Literal["synthetic", "tokens", "text"] = "synthetic"
    """`synthetic`: tokens from a fixed random Markov chain (learnable, needs no files).
    `tokens`: sequences cut from a flat file of token ids (`path`, `dtype`).
    `text`: documents (`path`: .jsonl or .parquet, or a folder of them) tokenized with the model's
    tokenizer and packed into sequences (engine/text_data.py)."""
    seed: int = 1234
    """Seed of the synthetic chain, or of the window order of a token file or text with order:
    shuffle; the same seed gives the same sequences on every run."""
    path: str | None = None
    """kind: tokens: a flat binary file of token ids (nanoGPT's train.bin format: no header,
    native byte order), memory-mapped, never loaded whole. kind: text: a .jsonl file (one JSON
    object per line), a .parquet file, or a folder of them read in sorted order. Relative paths
    start at the ranks' working directory (run.workdir; default where `dsl launch` runs)."""
    dtype: Literal["uint16", "uint32"] = "uint16"
    """kind: tokens only: the integer type of each token id in `path` (uint16 for vocabularies of
    up to 65,536 ids)."""
    order: Literal["shuffle", "sequential"] = "shuffle"
    """kind: tokens and text: read the seq_len-token windows in a permutation drawn anew for every
    epoch from `seed` (shuffle), or front to back (sequential); both wrap around at the end."""
    text_field: str = "text"
    """kind: text only: the field of each JSON record (or the parquet column) holding a document."""
    tokenizer: str | None = None
    """kind: text (required there): a folder holding the model's tokenizer (tokenizer.json and the
    files transformers saves; usually the model's `hf` folder), read locally; relative paths start
    at the ranks' working directory."""

    @model_validator(mode="after")
    def _path_with_tokens(self) -> "DataConfig":
        if self.kind in ("tokens", "text") and self.path is None:
            what = "the token file" if self.kind == "tokens" else "the documents (.jsonl, .parquet or a folder)"
            raise ValueError(f"kind: {self.kind} needs path: {what} to read")
        if self.kind == "synthetic" and self.path is not None:
            raise ValueError(f"path ({self.path!r}) is read only with kind: tokens or text; "
                             "set kind or remove path")
        for name in ("tokenizer", "text_field"):
            if self.kind != "text" and name in self.model_fields_set and getattr(self, name) not in (None, "text"):
                raise ValueError(f"{name} ({getattr(self, name)!r}) is read only with kind: text (kind is "
                                 f"{self.kind}); set kind: text or remove {name}")
        return self

    @model_serializer(mode="wrap")
    def _written(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Other kinds are dumped without the text-only fields: a checkpoint records this dump
        (engine/train.py compares it on resume), and those of runs before kind: text lack them."""
        data = handler(self)
        if self.kind == "text":
            return data
        return {key: value for key, value in data.items() if key not in ("text_field", "tokenizer")}


class InitFromConfig(StrictModel):
    """Where a new run's starting point comes from (`run.train.init_from`; one of the two)."""

    deepspeed: str | None = Field(None, min_length=1)
    """A DeepSpeed 0.19.8 ZeRO checkpoint folder (stages 1-3, any rank count, the one holding
    `latest` or a global_step folder): imported once into output_dir/checkpoints
    (engine/ds_import.py), then resumed from like a dsl checkpoint."""
    optimizer: bool = True
    """With deepspeed: carry the Adam moments and the step count over (false: weights only)."""
    hf: str | None = Field(None, min_length=1)
    """A Hugging Face folder whose *.safetensors weights the model (run.train.model hf or
    hf_config, the same architecture) starts from."""

    @model_validator(mode="after")
    def _one(self) -> "InitFromConfig":
        given = [k for k in ("deepspeed", "hf") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of deepspeed (a DeepSpeed checkpoint folder) or hf (a Hugging "
                             f"Face folder with weights); got {', '.join(given) or 'neither'}")
        if self.hf is not None and "optimizer" in self.model_fields_set:
            raise ValueError("optimizer applies to init_from.deepspeed only (hf folders hold weights only)")
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
    init_from: InitFromConfig | None = None
    """Start a new run (no output_dir/checkpoints/latest yet) from a DeepSpeed checkpoint or a
    Hugging Face folder's weights; a run that has a checkpoint of its own resumes from that."""

    @model_validator(mode="after")
    def _data_fits_model(self) -> "TrainConfig":
        from dsl.engine.validity import data_reason

        reason = data_reason(self.data, self.model)
        if reason:
            raise ValueError(reason)
        if self.init_from is not None and self.init_from.hf is not None and self.model.form != "hf":
            raise ValueError("init_from.hf loads Hugging Face weights: it needs run.train.model hf or hf_config "
                             "(the same architecture)")
        return self
