"""Apply an EngineConfig's long-context settings to a model (called by `Engine.__init__`).

- sequence_parallel > 1: form the SP/DP groups (groups.py, collective) and give every
  `Attention` of the model the SP group, or make a Hugging Face model (engine/hf_model.py)
  attend through hf_ulysses.py; the degree is checked against the heads and the model's
  seq_len first (degrees.py), so an impossible degree fails on every rank before any group is
  formed.
- tiled_loss / tiled_mlp: chunk sizes on the `Llama` (or a Hugging Face model whose logits are
  a bias-free linear map of its base model's output) / each `SwiGLU` (or each SwiGLU-shaped MLP
  of a Hugging Face model, `HFCausalLM.swiglu_mlps`, whose forward becomes the tiled one).
- activation_checkpointing: true: the bundled `Llama` checkpoints its decoder layers itself;
  any other model (or any model with `checkpoint_module`) has its blocks found and each
  recomputed in backward (blocks.py); no block found is a UserError.
- activation_offload: an `ActivationOffload` on the checkpointed blocks (used only while
  checkpointing): the `Llama`'s own, or blocks.py's for any other model.

A feature the model cannot take is a UserError naming the setting, never a silent no-op (a
validity.Refusal: the trainer prints it at the setting's place in the spec).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from dsl.engine.long.degrees import sp_reason
from dsl.engine.long.groups import SequenceGroups, build_groups
from dsl.engine.long.tiled_mlp import tiled_swiglu
from dsl.engine.validity import Problem, Refusal

if TYPE_CHECKING:
    from dsl.engine.config import EngineConfig

__all__ = ["apply", "sequence_degree"]


def sequence_degree(config: "EngineConfig") -> int:
    """The sp a config runs with (`auto` unresolved by a planner runs as 1)."""
    return 1 if config.sequence_parallel == "auto" else int(config.sequence_parallel)


def apply(model: nn.Module, config: "EngineConfig", *, world_size: int, rank: int) -> SequenceGroups:
    """Configure `model` for `config`'s long-context settings; returns this rank's groups."""
    from dsl.engine.model import Attention, Llama, SwiGLU

    from dsl.engine.hf_model import HFCausalLM

    sp = sequence_degree(config)
    llama = model if isinstance(model, Llama) else None
    hf = model if isinstance(model, HFCausalLM) else None
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    mlps = [m for m in model.modules() if isinstance(m, SwiGLU)]
    if sp > 1 and hf is not None:
        from dsl.engine.long import hf_ulysses

        hf_ulysses.check(hf, sp)
    elif sp > 1:
        if not attentions:
            raise Refusal([Problem(("sequence_parallel",), f"{sp} needs a model built from dsl.engine.model."
                                                            "Attention layers (the bundled Llama)")])
        seq_len = llama.cfg.seq_len if llama is not None else None
        for attn in attentions:
            reason = sp_reason(sp, heads=attn.heads, kv_heads=attn.kv_heads,
                               seq_len=seq_len if seq_len is not None else sp)
            if reason:
                raise Refusal([Problem(("sequence_parallel",), reason)])
    groups = build_groups(world_size, rank, sp)
    for attn in attentions:
        attn.sequence_group = groups.sp_group
    if sp > 1 and hf is not None:
        hf_ulysses.install(hf, groups.sp_group)
    if config.tiled_loss.enabled:
        target = llama if llama is not None else hf
        reason = (hf.tiled_loss_reason() if hf is not None else
                  None if llama is not None else "needs the bundled Llama model or a Hugging Face causal LM "
                                                 "(run.train.model: {hf: DIR}, engine/hf_model.py)")
        if reason:
            raise Refusal([Problem(("tiled_loss",), reason)])
        target.loss_chunk_tokens = config.tiled_loss.chunk_tokens
    if config.tiled_mlp.enabled:
        chunk = config.tiled_mlp.chunk_tokens
        hf_mlps = hf.swiglu_mlps() if hf is not None else []
        if not mlps and not hf_mlps:
            raise Refusal([Problem(("tiled_mlp",), "needs SwiGLU MLPs: the bundled Llama's (dsl.engine.model.SwiGLU) "
                                                   "or a Hugging Face model's down_proj(silu(gate_proj(x)) * up_proj(x))"
                                                   " without biases (Llama, Mistral, Qwen dense layers)")])
        for mlp in mlps:
            mlp.chunk_tokens = chunk
        for mlp in hf_mlps:  # the same computation, chunked (forward replaced: the module's hooks stay)
            mlp.forward = lambda x, mlp=mlp: tiled_swiglu(x, mlp.gate_proj.weight, mlp.up_proj.weight,
                                                          mlp.down_proj.weight, chunk)
    _checkpointing(model, llama, config)
    return groups


def _checkpointing(model: nn.Module, llama: nn.Module | None, config: "EngineConfig") -> None:
    """Activation checkpointing and its offload (module docstring). `auto` unresolved by a
    planner stays off; activation_offload without checkpointing is refused (validity.py)."""
    from dsl.engine.long.act_offload import ActivationOffload
    from dsl.engine.long.blocks import checkpoint_blocks, find_blocks

    on = config.activation_checkpointing is True
    if config.activation_offload and not (on or (llama is not None and llama.activation_checkpointing)):
        raise Refusal([Problem(("activation_offload",), "moves activation checkpoints to host memory: it needs "
                                                        "activation_checkpointing: true")])
    if not on:
        return
    offload = ActivationOffload() if config.activation_offload else None
    if llama is not None and config.checkpoint_module is None:  # the Llama recomputes its layers itself
        llama.activation_checkpointing = True
        llama.activation_offload = offload
        return
    setting = "activation_offload" if config.activation_offload else "activation_checkpointing"
    blocks = find_blocks(model, config.checkpoint_module, setting=setting)
    if llama is not None:
        llama.activation_checkpointing = False  # the blocks found are recomputed instead
    checkpoint_blocks(model, blocks, offload)
    if llama is None and hasattr(model, "activation_checkpointing"):  # engine/hf_model.py's flag
        model.activation_checkpointing = True
    model.activation_offload = offload
