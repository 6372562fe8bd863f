"""Hugging Face causal LMs in the bundled trainer: `run.train.model: {hf: DIR}` or `{hf_config: FILE}`.

`build(model_cfg, seed=)` returns an `HFCausalLM`: the `transformers.AutoModelForCausalLM` that
config.json describes, wrapped so the engine calls it as it calls the bundled Llama
(engine/model.py, engine/train.py):

    forward(tokens [B, T] int64, targets [B, T] int64 | None = None, *, positions [T] | [B, T] | None)
      -> mean cross entropy over all B*T positions (0-dim fp32), or logits [B, T, vocab] without targets

`targets` are already the next-token ids (engine/data.py), so the loss is a plain cross entropy
over the logits (fp32 log-softmax, as the bundled Llama), not Hugging Face's `labels` path, which
shifts by one itself. `positions` become HF's `position_ids` (a sequence-parallel shard passes
its own). The wrapped model is `.lm`; its parameter names are Hugging Face's behind `lm.`.

Weights:
- config.json only: random initialisation by the family's own `_init_weights` after
  `torch.manual_seed(seed)`, so every rank builds the same weights and a plain
  `torch.manual_seed(seed); AutoModelForCausalLM.from_config(config)` builds exactly these.
- `*.safetensors` in DIR (one file or an index of shards): loaded with `from_pretrained`
  (local files only, never the network).
Parameters are fp32 whatever config.json's `dtype` says: the engine keeps fp32 masters and
applies bf16/fp16 itself (engine/precision.py).

Engine features on it (engine/long/setup.py): activation checkpointing of its repeated blocks
(engine/long/blocks.py), Ulysses through transformers' attention interface
(engine/long/hf_ulysses.py), the tiled loss over `lm.base_model`'s output and the output
projection (`tiled_loss_reason`), the tiled MLP on SwiGLU-shaped MLPs (`swiglu_mlps`).

Every rank builds the whole model on the host before the engine partitions it; at ZeRO stage 3
the engine then keeps only this rank's partition (engine/zero/stage3.py), so the whole model is
resident once per rank during start-up only.

transformers and safetensors are the optional extra `dsl[hf]`, imported here only (never by
`dsl --help` or `dsl plan`); without them `build` raises a UserError with the install hint.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from dsl.engine.errors import UserError
from dsl.engine.long.tiled_loss import tiled_cross_entropy
from dsl.engine.validity import hf_missing

if TYPE_CHECKING:
    from dsl.engine.train_config import ModelConfig

__all__ = ["HFCausalLM", "build", "INSTALL_HINT", "config_path"]

INSTALL_HINT = "pip install 'dsl[hf]'"


def config_path(model: "ModelConfig") -> Path:
    """The config.json a `hf` / `hf_config` model names (as written: resolve relative paths first)."""
    if model.hf is not None:
        return Path(model.hf).expanduser() / "config.json"
    if model.hf_config is not None:
        return Path(model.hf_config).expanduser()
    raise ValueError("not a Hugging Face model (run.train.model has neither hf nor hf_config)")


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM behind the bundled model's call (see the module docstring)."""

    def __init__(self, lm: nn.Module, *, seq_len: int) -> None:
        super().__init__()
        self.lm = lm
        self.seq_len = seq_len
        """Tokens per training sequence (run.train.model.seq_len)."""
        self.activation_checkpointing = False
        """Set by engine/long/setup.py when the engine checkpoints this model's blocks."""
        self.loss_chunk_tokens: int | None = None
        """Tiled loss (engine/long/tiled_loss.py; set by engine/long/setup.py after
        `tiled_loss_reason`): tokens per chunk of the cross entropy, never the full logits."""

    @property
    def config(self) -> Any:
        """The Hugging Face config (what Hugging Face's DeepSpeed integration reads, engine/core.py)."""
        return self.lm.config

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is not None and positions.dim() == 1:
            positions = positions.unsqueeze(0).expand(tokens.shape[0], -1)
        if targets is not None and self.loss_chunk_tokens is not None:
            # The causal LM is its base model and a bias-free output projection (tiled_loss_reason).
            hidden = self.lm.base_model(input_ids=tokens, position_ids=positions, use_cache=False).last_hidden_state
            return tiled_cross_entropy(hidden.flatten(0, 1), self.lm.get_output_embeddings().weight,
                                       targets.flatten(), self.loss_chunk_tokens)
        logits = self.lm(input_ids=tokens, position_ids=positions, use_cache=False).logits
        if targets is None:
            return logits
        # fp32 log-softmax: under bf16 autocast the logits are bf16 (engine/model.py does the same).
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def tiled_loss_reason(self) -> str | None:
        """Why the loss cannot be tiled on this model (its logits are not just a bias-free linear
        map of the base model's output), or None."""
        head = self.lm.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            return f"needs an nn.Linear output projection; {type(self.lm).__name__} has {type(head).__name__}"
        if head.bias is not None:
            return f"needs an output projection without bias; {type(self.lm).__name__}'s has one"
        config = self.lm.config
        for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
            if getattr(config, name, None) not in (None, 1, 1.0):
                return (f"{type(self.lm).__name__} transforms its logits ({name} = {getattr(config, name)}), which "
                        "the tiled loss does not")
        return None

    def swiglu_mlps(self) -> list[nn.Module]:
        """The MLPs of the form down_proj(silu(gate_proj(x)) * up_proj(x)) with bias-free nn.Linear
        projections (Llama, Mistral, Qwen2/3 dense layers): what engine/long/tiled_mlp.py tiles."""
        found = []
        for module in self.lm.modules():
            projections = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
            act = getattr(module, "act_fn", None)
            if (all(isinstance(p, nn.Linear) and p.bias is None for p in projections)
                    and type(act).__name__ in ("SiLU", "SiLUActivation")):
                found.append(module)
        return found

    def num_params(self) -> int:
        """Distinct parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())


def _import_transformers() -> Any:
    missing = hf_missing()
    if missing:
        raise UserError(f"run.train.model: training a Hugging Face model needs {' and '.join(missing)} "
                        f"(the optional extra dsl[hf]): {INSTALL_HINT}")
    import transformers

    transformers.utils.logging.set_verbosity_error()  # its per-model notes are not the user's problem
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars on every rank's stderr
    return transformers


def build(model: "ModelConfig", *, seed: int, weights_from: str | None = None) -> HFCausalLM:
    """The Hugging Face model `model` names (`hf` / `hf_config` already absolute, as
    engine/train.py `load_run_spec` leaves them), fp32, in training mode; with `weights_from`
    (run.train.init_from.hf) its weights come from that folder's *.safetensors. Raises UserError."""
    transformers = _import_transformers()
    path = config_path(model)
    field = "hf" if model.hf is not None else "hf_config"
    where = f"run.train.model.{field}"
    if not path.is_file():
        raise UserError(f"{where}: no such file: {path}")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{where}: {path}: transformers cannot read this config: {err}") from None
    limit = _max_positions(config)
    if limit is not None and model.seq_len > limit:
        raise UserError(f"{where}: run.train.model.seq_len ({model.seq_len}) is longer than the model's "
                        f"max_position_embeddings ({limit}) in {path}; set seq_len <= {limit}")
    source = path.parent if model.hf is not None else None
    if weights_from is not None:
        source = Path(weights_from)
        if not sorted(source.glob("*.safetensors")):
            raise UserError(f"run.train.init_from.hf: no *.safetensors weights in {source}")
        where = "run.train.init_from.hf"
    weights = sorted(source.glob("*.safetensors")) if source is not None else []
    torch.manual_seed(seed)  # the same weights on every rank (and in a plain transformers loop)
    try:
        if weights:
            lm, info = transformers.AutoModelForCausalLM.from_pretrained(
                str(source), config=config, dtype=torch.float32, local_files_only=True, output_loading_info=True)
            bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
            if bad:  # never train from partly random weights without a word
                detail = "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, sorted(v, key=str)[:5]))}"
                                   + (" ..." if len(v) > 5 else "") for k, v in bad.items())
                raise UserError(f"{where}: the weights in {source} do not fit the model of {path}: {detail}")
        else:
            lm = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except ValueError as err:  # a model_type without a causal LM class, a bad weight file
        raise UserError(f"{where}: {path}: transformers cannot build a causal LM from it: {err}") from None
    lm.train()  # from_pretrained returns eval mode; dropout, if the config has any, is the user's
    return HFCausalLM(lm, seq_len=model.seq_len)


def _max_positions(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
