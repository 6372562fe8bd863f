"""Ulysses sequence parallelism for Hugging Face models, through transformers' attention interface.

transformers' attention layers (Llama, Qwen, Mistral, Mixtral, GPT-2, GPT-NeoX, ...) project and
rotate q, k, v themselves and then call the function `config._attn_implementation` names in
`transformers.AttentionInterface`. `apply` registers `dsl_ulysses` there and selects it for the
model: it receives this rank's q [B, a, T/sp, d], k, v [B, kv, T/sp, d] (RoPE already applied at
the shard's true positions, the `position_ids` engine/hf_model.py passes) and returns
engine/long/ulysses.py's causal attention over the whole sequence as [B, T/sp, a, d]; the
communication plan is ulysses.py's (4 all-to-alls per layer and direction on the SP group). A
custom attention function gets no mask from transformers (it builds none for names it does not
know), which is right: attention is causal over the full sequence, and the shards hold no padding.

Each rank's loss is the mean over its own tokens; the engine averages gradients over all ranks, so
with equal shards the step is the full sequence's (engine/data.py gives each rank its slice of
the same samples).

What it refuses, at the first forward (a UserError naming engine.sequence_parallel): a layer whose
scaling is not 1/sqrt(head_dim) (ulysses.py's kernel uses that), attention dropout while
training, a sliding window, an explicit attention mask.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dsl.engine.long.degrees import sp_reason
from dsl.engine.long.ulysses import ulysses_attention
from dsl.engine.validity import Problem, Refusal

__all__ = ["check", "install", "NAME"]

NAME = "dsl_ulysses"
"""The name the attention function is registered under in transformers.AttentionInterface."""


def _refuse(message: str) -> Refusal:
    return Refusal([Problem(("sequence_parallel",), message)])


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               sliding_window: int | None = None, **_: Any) -> tuple[torch.Tensor, None]:
    group = getattr(module, "dsl_sequence_group", None)
    name = type(module).__name__
    d = query.shape[-1]
    if scaling is not None and abs(scaling - d ** -0.5) > 1e-6 * d ** -0.5:
        raise _refuse(f"{name} scales attention by {scaling:g}, not 1/sqrt(head_dim) = {d ** -0.5:g}: Ulysses "
                      "attention (engine/long/ulysses.py) cannot run it; set sequence_parallel: 1")
    if dropout:
        raise _refuse(f"{name} has attention dropout {dropout:g} in training: Ulysses attention has none; set "
                      "the config's attention dropout to 0 or sequence_parallel: 1")
    if sliding_window is not None:
        raise _refuse(f"{name} attends through a sliding window of {sliding_window}: Ulysses attention is full "
                      "causal attention; set sequence_parallel: 1")
    if attention_mask is not None:
        raise _refuse(f"{name} was given an attention mask: Ulysses attention is causal over whole sequences "
                      "without padding")
    b, a, t, _ = query.shape
    out = ulysses_attention(query, key, value, group)  # [B, T/sp, a*d]
    return out.view(b, t, a, d), None


def check(model: nn.Module, sp: int) -> None:
    """Raise a Refusal when the heads or seq_len of the Hugging Face model inside `model`
    (engine/hf_model.py's `.lm`) do not split over sp ranks (every rank, before groups form)."""
    config = model.lm.config
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if not isinstance(heads, int):
        raise _refuse(f"{sp}: the model's config has no num_attention_heads to split over the ranks")
    reason = sp_reason(sp, heads=heads, kv_heads=kv_heads, seq_len=model.seq_len)
    if reason:
        raise _refuse(reason)


def install(model: nn.Module, group: Any) -> None:
    """Make the Hugging Face model inside `model` attend with Ulysses over `group`."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, _attention)
    model.lm.set_attn_implementation(NAME)
    for module in model.lm.modules():  # the attention layers read it (any layer may be one)
        module.dsl_sequence_group = group
