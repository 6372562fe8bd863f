"""What the memory model needs to know of a model, counted from its Hugging Face config.json.

`ModelDescription` is plain data (frozen, torch-free): the exact parameter count, the largest unit
ZeRO-3 gathers at once, and the dimensions that activations depend on. The family modules of this
package (decoders.py, gpt.py, encoders.py, t5.py) build one per `model_type`; `registry.py` picks
the family.

What "the model" is, per kind (the class transformers builds for the config, counted by
tests/unit/test_modeldesc.py against `sum(p.numel())` on the meta device):
- decoder: the causal-LM model (backbone + LM head; a tied head counts once);
- encoder (BERT, RoBERTa, DeBERTa): the base model (`AutoModel`: BERT's and RoBERTa's pooler
  included, no task head: a classification head adds hidden x labels);
- encoder-decoder (T5): the seq2seq LM (`T5ForConditionalGeneration`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from dsl.engine.modeldesc.traits import Traits

Kind = Literal["decoder", "encoder", "encoder-decoder"]


@dataclass(frozen=True)
class ModelDescription:
    """A model as the planner sees it: counts and dimensions, no weights."""

    family: str
    """The config's `model_type` (llama, qwen3_moe, t5, ...)."""
    kind: Kind
    params: int
    """Every parameter, exactly; a tied embedding/head counts once."""
    largest_layer_params: int
    """The largest unit ZeRO-3 gathers at once: one transformer block, or the embedding, or an
    untied LM head (DeepSpeed's `largest_layer_params`)."""
    layers: int
    """Transformer blocks (encoder + decoder for an encoder-decoder)."""
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    """Inner width of a dense MLP block (for MoE: of an expert, `expert_intermediate` repeats it)."""
    vocab: int
    max_positions: int
    """The longest sequence the config supports (max_position_embeddings, n_positions; T5:
    n_positions, which its relative positions do not enforce)."""
    tied: bool
    """The LM head shares the input embedding (decoders, T5)."""
    embedding_params: int
    """Input embeddings (tokens, plus learned positions and token types where the family has them)."""
    head_params: int
    """An untied LM head (0 when tied or absent)."""
    active_params: int
    """Parameters one token multiplies through or looks up: MoE counts only experts_per_tok experts."""
    experts: int = 0
    experts_per_tok: int = 0
    expert_intermediate: int = 0
    shared_expert_intermediate: int = 0
    """Width of the always-on shared expert (Qwen2-MoE), 0 when there is none."""
    moe_layers: int = 0
    """Blocks whose MLP is a mixture of experts (the others are dense)."""
    encoder_layers: int = 0
    decoder_layers: int = 0
    gated_mlp: bool = True
    """The MLP has a gate (SwiGLU/GeGLU: three matrices) rather than two matrices."""
    traits: Traits = Traits()
    """What else decides the saved activations (norm, activation, dropouts, relative attention)."""

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def linear(fan_in: int, fan_out: int, bias: bool = False) -> int:
    """Parameters of nn.Linear(fan_in, fan_out, bias)."""
    return fan_in * fan_out + (fan_out if bias else 0)


def layer_norm(width: int, bias: bool = True) -> int:
    """nn.LayerNorm (weight and bias) or, with bias=False, an RMSNorm's weight."""
    return 2 * width if bias else width
