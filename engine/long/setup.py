"""Apply an EngineConfig's long-context settings to a model (called by `Engine.__init__`).

- sequence_parallel > 1: form the SP/DP groups (groups.py, collective) and give every
  `Attention` of the model the SP group; the degree is checked against each attention's heads
  and the model's seq_len first (degrees.py), so an impossible degree fails on every rank
  before any group is formed.
- tiled_loss / tiled_mlp: chunk sizes on the `Llama` / each `SwiGLU`.
- activation_offload: an `ActivationOffload` on the `Llama` (used only while checkpointing).

A feature the model cannot take (not a dsl Llama) is a UserError naming the setting, never a
silent no-op.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from dsl.engine.errors import UserError
from dsl.engine.long.degrees import sp_reason
from dsl.engine.long.groups import SequenceGroups, build_groups

if TYPE_CHECKING:
    from dsl.engine.config import EngineConfig

__all__ = ["apply", "sequence_degree"]


def sequence_degree(config: "EngineConfig") -> int:
    """The sp a config runs with (`auto` unresolved by a planner runs as 1)."""
    return 1 if config.sequence_parallel == "auto" else int(config.sequence_parallel)


def apply(model: nn.Module, config: "EngineConfig", *, world_size: int, rank: int) -> SequenceGroups:
    """Configure `model` for `config`'s long-context settings; returns this rank's groups."""
    from dsl.engine.model import Attention, Llama, SwiGLU

    sp = sequence_degree(config)
    llama = model if isinstance(model, Llama) else None
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    mlps = [m for m in model.modules() if isinstance(m, SwiGLU)]
    if sp > 1:
        if not attentions:
            raise UserError(f"engine.sequence_parallel ({sp}) needs a model built from "
                            "dsl.engine.model.Attention layers (the bundled Llama)")
        seq_len = llama.cfg.seq_len if llama is not None else None
        for attn in attentions:
            reason = sp_reason(sp, heads=attn.heads, kv_heads=attn.kv_heads,
                               seq_len=seq_len if seq_len is not None else sp)
            if reason:
                raise UserError(f"engine.sequence_parallel: {reason}")
    groups = build_groups(world_size, rank, sp)
    for attn in attentions:
        attn.sequence_group = groups.sp_group
    if config.tiled_loss.enabled:
        if llama is None:
            raise UserError("engine.tiled_loss needs the bundled Llama model (dsl.engine.model.Llama)")
        llama.loss_chunk_tokens = config.tiled_loss.chunk_tokens
    if config.tiled_mlp.enabled:
        if not mlps:
            raise UserError("engine.tiled_mlp needs a model with dsl.engine.model.SwiGLU MLPs")
        for mlp in mlps:
            mlp.chunk_tokens = config.tiled_mlp.chunk_tokens
    if llama is not None and config.activation_checkpointing is True:
        llama.activation_checkpointing = True
    if config.activation_offload:
        if llama is None or not llama.activation_checkpointing:
            raise UserError("engine.activation_offload moves activation checkpoints to host memory: it needs "
                            "the bundled Llama model with activation_checkpointing: true")
        from dsl.engine.long.act_offload import ActivationOffload

        llama.activation_offload = ActivationOffload()
    return groups
