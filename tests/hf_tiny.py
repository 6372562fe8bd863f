"""Tiny Hugging Face config.json files the tests write themselves (no network): hidden 32,
2 layers, vocab 128, no dropout, so a distributed run can match a single-process one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VOCAB = 128
_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)

FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", **_DECODER, tie_word_embeddings=False),
    "mistral": dict(model_type="mistral", **_DECODER),
    "qwen2": dict(model_type="qwen2", **_DECODER),
    "qwen3": dict(model_type="qwen3", **_DECODER, head_dim=8, tie_word_embeddings=True),
    "qwen3_moe": dict(model_type="qwen3_moe", **_DECODER, head_dim=8, moe_intermediate_size=16, num_experts=4,
                      num_experts_per_tok=2, decoder_sparse_step=1),
    "mixtral": dict(model_type="mixtral", **_DECODER, num_local_experts=4, num_experts_per_tok=2),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64, hidden_dropout=0.0,
                     attention_dropout=0.0),
}
"""model_type -> a tiny config.json of that family."""


def write_model(folder: Path, family: str, **overrides: Any) -> Path:
    """`folder`/config.json of a tiny `family` model; returns `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**FAMILIES[family], **overrides}))
    return folder
