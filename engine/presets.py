"""Model presets by name: HF-style dimensions of well-known decoders (torch-free).

Tiny presets train on CPU in tests; the large ones are for planning (`dsl plan`) and for GPUs.
Dimensions follow each model's published Hugging Face `config.json`.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests and the demo.
    "tiny": dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, intermediate_size=176, seq_len=64),
    # The shape of the peer baseline of docs/benchmarks.md ("Engine step"): 7.36M parameters, which counts
    # the output head apart from the embedding (HF LlamaConfig's default; tied it would be 5.26M).
    "bench": dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, intermediate_size=688, seq_len=256,
                  tie_word_embeddings=False),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=8192, seq_len=4096, tie_word_embeddings=True,
                     rope_theta=500000.0),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, intermediate_size=11008, seq_len=4096,
                      tie_word_embeddings=False),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, intermediate_size=14336, seq_len=8192,
                      tie_word_embeddings=False, rope_theta=500000.0),
    "llama2-13b": dict(vocab_size=32000, hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, intermediate_size=13824, seq_len=4096,
                       tie_word_embeddings=False),
    "llama2-70b": dict(vocab_size=32000, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, intermediate_size=28672, seq_len=4096,
                       tie_word_embeddings=False),
    "llama3-70b": dict(vocab_size=128256, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, intermediate_size=28672, seq_len=8192,
                       tie_word_embeddings=False, rope_theta=500000.0),
}
