"""A spec's model as the planner's `ModelShape` (engine/memory_shape.py), whatever its form.

The memory model (engine/memory.py) and the planner (launcher/planner.py) read a shape object:
its dimensions for activations and logits, and `params`, `largest_unit_params`, `matmul_params`,
`flop_params`, `head_dim` for the model states, ZeRO-3's gathered unit, autocast weight copies,
step time and RoPE tables. `DescribedShape` is a ModelShape whose counts are the exact ones of a
description (engine/modeldesc/) or of the spec's `params` form instead of the bundled Llama's
formula, so the planner plans any model without a change to memory.py.

A described model carries its family's `traits` (engine/modeldesc/traits.py): engine/memory_acts.py
then counts its activations with that family's formulas (engine/modeldesc/activations.py:
decoders, encoders, T5's encoder and decoder, eager vs flash attention, MoE routing buffers);
logits stay 12 B per token and vocabulary entry (an encoder's masked-LM head, T5's decoder tokens).
A model known only by its counts is planned with the bundled decoder's formulas when its
dimensions are given; without them the shape has zero width, so
activations and logits are 0, and `model_states_only` says the plan covers model states only;
with layers, hidden and vocab given, the MLP width is what the counts leave for it:
f = (P / L - 4 h^2) / (3 h), a SwiGLU block of multi-head attention being 4 h^2 + 3 h f.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from dsl.engine.memory_shape import ModelShape
from dsl.engine.modeldesc.traits import Traits

if TYPE_CHECKING:
    from dsl.engine.modeldesc.description import ModelDescription
    from dsl.engine.train_config import ModelConfig


@dataclass(frozen=True)
class DescribedShape(ModelShape):
    """A ModelShape with exact counts (see the module docstring)."""

    total_params: int = 0
    largest_unit: int = 0
    matmul: int = 0
    active: int = 0
    per_head: int = 0
    family: str = "counts"
    kind: str = "decoder"
    model_states_only: bool = False
    """No dimensions are known: activations and logits are not counted (reported as unknown)."""
    traits: Traits | None = None
    """A described family's activation traits (engine/modeldesc/activations.py); None: the counts
    form, planned with the bundled decoder's formulas."""
    encoder_layers: int = 0
    decoder_layers: int = 0
    moe_layers: int = 0
    dense_ffn: int = 0
    """The dense MLP's width (for MoE, `ffn` is an expert's)."""
    decoder_seq_len: int = 0
    """An encoder-decoder's target length when it differs from seq_len (the encoder's); 0: the
    same. engine/memory_acts.py sizes the decoder's activations and the logits by it."""

    @property
    def params(self) -> int:  # type: ignore[override]
        return self.total_params

    @property
    def largest_unit_params(self) -> int:  # type: ignore[override]
        return self.largest_unit

    @property
    def matmul_params(self) -> int:  # type: ignore[override]
        return self.matmul

    @property
    def flop_params(self) -> int:  # type: ignore[override]
        return self.matmul

    @property
    def head_dim(self) -> int:  # type: ignore[override]
        return self.per_head


def from_description(d: "ModelDescription", seq_len: int, decoder_seq_len: int = 0) -> DescribedShape:
    """The shape of a described model at `seq_len` tokens per sequence (an encoder-decoder's
    decoder at `decoder_seq_len`, when given)."""
    # Matmul weights a token passes through: everything it uses but the embedding lookup, plus the
    # LM head's matmul (tied: the embedding matrix again).
    matmul = d.active_params - d.embedding_params + (d.vocab * d.hidden if d.tied else 0)
    return DescribedShape(
        layers=d.layers, hidden=d.hidden, heads=d.heads, kv_heads=d.kv_heads,
        ffn=d.expert_intermediate if d.experts else d.intermediate, vocab=d.vocab, seq_len=seq_len, tied=d.tied,
        experts=d.experts, experts_per_tok=d.experts_per_tok or 2,
        total_params=d.params, largest_unit=d.largest_layer_params, matmul=max(matmul, 0), active=d.active_params,
        per_head=d.head_dim, family=d.family, kind=d.kind, traits=d.traits, encoder_layers=d.encoder_layers,
        decoder_layers=d.decoder_layers, moe_layers=d.moe_layers, dense_ffn=d.intermediate,
        decoder_seq_len=decoder_seq_len if d.kind == "encoder-decoder" else 0)


def from_counts(model: "ModelConfig") -> DescribedShape:
    """The shape of a `params` spec: exact model states; activations when dimensions are given."""
    params, largest = int(model.params or 0), int(model.largest_layer_params or 0)
    layers, hidden, vocab = model.layers, model.hidden, model.vocab
    if layers is None or hidden is None or vocab is None or "seq_len" not in model.model_fields_set:
        return DescribedShape(layers=layers or 1, hidden=0, heads=1, kv_heads=1, ffn=0, vocab=0,
                              seq_len=model.seq_len if "seq_len" in model.model_fields_set else 1, tied=True,
                              total_params=params, largest_unit=largest, matmul=params, active=params,
                              per_head=0, model_states_only=True)
    heads = model.heads or max(1, hidden // 128)
    per_layer = max(0, params - vocab * hidden) // layers
    ffn = (per_layer - 4 * hidden * hidden) // (3 * hidden)
    ffn = ffn if ffn > 0 else 4 * hidden
    return DescribedShape(layers=layers, hidden=hidden, heads=heads, kv_heads=heads, ffn=ffn, vocab=vocab,
                          seq_len=model.seq_len, tied=True, total_params=params, largest_unit=largest,
                          matmul=params, active=params, per_head=hidden // heads)


def shape_of(model: "ModelConfig", base: Path, where: Callable[[str], str]) -> tuple[ModelShape, list[str]]:
    """(the shape to plan, notes for the plan) of a spec's `run.train.model`; `base` is the spec
    file's folder, `where(field)` locates a field of run.train.model for errors."""
    if model.form == "llama":
        return ModelShape.of(model), []
    if model.form == "counts":
        shape = from_counts(model)
        notes = [f"model given by its counts ({shape.params:,} parameters, largest layer "
                 f"{shape.largest_unit_params:,}): model states are exact"]
        notes.append("unsupported by dsl's engine: a model known by its counts has no weights to train "
                     "(engine/validity.py); the plan's memory verdict stands")
        if shape.model_states_only:
            notes.append("the plan covers model states only: activations and logits are unknown without layers, "
                         "hidden, vocab and seq_len (run.train.model)")
        else:
            notes.append(f"activations from the given dimensions with an MLP width of {shape.ffn} inferred from "
                         f"the counts and {shape.heads} heads")
        return shape, notes
    from dsl.engine.modeldesc.registry import describe_file

    field = "hf" if model.hf is not None else "hf_config"
    written = Path(str(model.hf if model.hf is not None else model.hf_config)).expanduser()
    path = written if written.is_absolute() else base / written
    if model.hf is not None:
        path = path / "config.json"
    description = describe_file(path.resolve(), where(field))
    notes = [f"model from {path}: {description.family} ({description.kind}), {description.params:,} parameters"
             + (f", {description.experts} experts with {description.experts_per_tok} per token "
                f"({description.active_params:,} active)" if description.experts else "")]
    if description.kind != "decoder":
        notes.append(f"unsupported by dsl's engine: its trainer builds Hugging Face causal LMs (engine/hf_model.py); "
                     f"this {description.kind} is planned, not trained")
    if "seq_len" in model.model_fields_set:
        seq_len = model.seq_len
    else:
        seq_len = description.max_positions
        notes.append(f"seq_len not set: planning at the model's longest sequence, {seq_len} "
                     "(its config's max_position_embeddings); set run.train.model.seq_len")
    return from_description(description, seq_len), notes
