"""Long-context training: Ulysses sequence parallelism and the memory tricks for long sequences.

One module per feature (each opens with what it communicates or recomputes):

- `degrees`: torch-free checks of a sequence-parallel degree against a model (heads, kv heads,
  sequence length); the launcher (`dsl validate`, `dsl plan`) and the engine share them.
- `groups`: sequence-parallel and data-parallel process groups formed from the world together.
- `ulysses`: the autograd-aware all-to-all and the attention core it wraps.
- `tiled_loss`: cross entropy over token chunks that never holds the full tokens x vocab logits.
- `tiled_mlp`: the SwiGLU MLP over token chunks, recomputed per chunk in backward.
- `act_offload`: activation checkpoints (each layer's saved input) moved to host memory.
- `setup`: applies an `EngineConfig`'s long-context settings to a dsl `Llama` (used by the engine).

Importing this package does not import torch (the launcher imports `degrees`).
"""
