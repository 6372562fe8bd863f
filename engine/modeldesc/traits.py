"""What decides a family's saved activations beyond its dimensions (torch-free).

`Traits` is part of a `ModelDescription` (engine/modeldesc/description.py): which norm, which MLP
activation, which dropouts are on in training, rotary or learned positions, DeBERTa's relative
attention and T5's relative bias. engine/modeldesc/activations.py turns a description's
dimensions and traits into the bytes autograd saves; the family modules (decoders.py, gpt.py,
encoders.py, t5.py) fill the traits from config.json with transformers' defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Norm = Literal["rms", "t5", "gemma", "layer", "deberta"]
"""rms: Llama's RMSNorm, computed in fp32 (it saves the fp32 input, the fp32 reciprocal root mean
square and the normalised value in the input dtype); t5: T5's, which also keeps its 16-bit input
(it multiplies the input, not the fp32 copy, by the rstd); layer: nn.LayerNorm (its input, mean
and reciprocal standard deviation); gemma: as rms but the normalised value stays fp32 (4 tw) and
the (1 + weight) factor is fp32 (4 w); deberta: DeBERTa v1's own LayerNorm, computed in fp32 (x -
mean, the standard deviation and the normalised value in fp32, plus its cast back)."""

Activation = Literal["silu", "gelu", "gelu_tanh", "gelu_new", "relu"]
"""gelu/gelu_tanh: one torch op (saves its input); gelu_new: transformers' NewGELUActivation, a
chain of elementwise ops (saves x, tanh(.), 0.5 x and 1 + tanh(.)); relu saves its output."""

Relative = Literal["", "deberta", "deberta-v2", "t5"]


@dataclass(frozen=True)
class Traits:
    """The activation-relevant traits of one model (defaults: a Llama-style decoder)."""

    norm: Norm = "rms"
    activation: Activation = "silu"
    gated: bool = True
    """The MLP is act(gate(x)) * up(x) (SwiGLU, GeGLU) rather than act(fc(x))."""
    fused_qkv: bool = False
    """One matmul computes q, k and v (Phi-3, GPT-2, GPT-NeoX, Falcon, DeBERTa v1's in_proj)."""
    hidden_dropout: float = 0.0
    """Dropout on the embeddings, on each sublayer's output (and T5's MLP inner width)."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities (eager attention keeps their mask)."""
    softmax_fp32: bool = True
    """Eager attention's softmax runs in fp32 and is cast back (Llama-style, T5); BERT's runs in the
    compute dtype."""
    qk_norm: bool = False
    """Qwen3: RMSNorm over each head's q and k."""
    rope: bool = True
    rotary_dim: int = 0
    """Channels of each head RoPE rotates (GPT-NeoX's rotary_pct); 0: all of head_dim."""
    parallel: int = 0
    """Attention and MLP read the same block input (GPT-NeoX, Falcon): 0 sequential, 1 through one
    shared norm, 2 through two norms of that one input."""
    pooler: bool = False
    """BERT and RoBERTa's base model ends with a pooler: tanh(dense(first token))."""
    relative: Relative = ""
    rel_span: int = 0
    """DeBERTa: the relative span k (max_relative_positions, or position_buckets in v2); the
    attention uses 2 min(k, s) relative embeddings."""
    c2p: bool = False
    p2c: bool = False
    share_att_key: bool = False
    talking_head: bool = False
    norm_rel_ebd: bool = False
    """DeBERTa v2: a LayerNorm over the relative embeddings."""
    embedding_mask: bool = False
    """DeBERTa: the embeddings are multiplied by the attention mask (saved, one value per token)."""
    shared_expert: int = 0
    """Qwen2-MoE: the width of the always-on shared expert (0: none)."""
    norm_topk: bool = False
    """The top-x routing weights are renormalised to sum to 1 (Mixtral always; Qwen-MoE with
    norm_topk_prob): their fp32 sum and values are saved and the weights stay fp32."""
    token_positions: bool = False
    """RoBERTa: position ids computed per token from the input ids, token type ids per token."""


_ACTIVATIONS: dict[str, Activation] = {
    "silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_new",
    "gelu_new": "gelu_new", "relu": "relu", "gelu_python": "gelu"}


def activation_of(name: object, default: Activation) -> Activation:
    """A config's activation name (hidden_act, activation_function) as the formulas know it; a
    name they do not know counts as gelu_new, the one that saves the most (an upper bound)."""
    if name is None:
        return default
    return _ACTIVATIONS.get(str(name), "gelu_new")
