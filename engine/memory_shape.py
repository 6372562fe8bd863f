"""The vocabulary of the memory model (engine/memory.py): the model's shape, bytes per state
element, one breakdown line (`Term`), term names and units. Torch-free; `engine.memory` re-exports
every name, so callers import them from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from dsl.engine.train_config import ModelConfig
    from dsl.topology.model import ProcessBaseline

GB = 10**9
GiB = 1 << 30
MiB = 1 << 20

Layout = Literal["autocast", "master", "paper"]
"""How bf16/fp16 training state is held (the table in engine/memory.py's docstring):
- "autocast": the bundled engine's `precision_layout: autocast`: fp32 parameters (which are the
  master weights) and fp32 gradients, 16-bit compute under autocast; at stage 3 plus a 16-bit
  working copy of the parameter shard, which is what it gathers;
- "master": the bundled engine's `precision_layout: master`: at stages 0-2 16-bit parameters,
  fp32 gradients (full at stages 0-1, partitioned at stage 2) and a separate fp32 master copy
  partitioned like the optimizer states (engine/zero/master.py); at stage 3 the same as autocast;
- "paper": the ZeRO paper's and DeepSpeed's accounting (16-bit parameters and gradients, fp32
  master copy in the optimizer).
None: the engine's default (engine/config.py mixed_layout): master."""


def engine_layout(layout: Layout | None, stage: int | None) -> Layout:
    """`layout`, or the bundled engine's default (master; `stage` unused, kept for callers)."""
    return layout if layout is not None else "master"

GPU_RUNTIME_BYTES = 1 * GiB
"""A GPU rank's device bytes outside torch's allocator (CUDA context 300-600 MiB with the
kernels loaded, cuBLAS workspaces, NCCL's buffers: a documented rough figure), unless the host's
measured baseline has its own (`gpu_runtime_bytes`)."""
CPU_RUNTIME_BYTES = 162 * MiB
"""A CPU rank's process baseline on dsl's reference machine: Python, torch, gloo and the trainer, as
the trainer measured it on the tiny preset (peak resident set less its file-backed pages, minus
the step's live bytes; 161-162 MiB under every cpu_allocator, torch 2.13 CPU wheel, AMD EPYC;
engine/baseline.py, docs/benchmarks.md "Peak memory"). The runtime term of a host whose own
baseline `dsl probe --measure-baseline` stored is that figure instead (`cpu_runtime_bytes`).
The file-backed pages (the libraries' mapped code, 80-140 MiB more) are left out on both sides:
engine/peak.py `host_peak_anon_bytes`."""
CPU_CHECKPOINT_RUNTIME_BYTES = 77 * MiB
"""What activation checkpointing adds to it: torch.utils.checkpoint imports torch._dynamo."""
ALLOCATOR_RETENTION = {"jemalloc": 0.15, "return": 0.0}
"""On a CPU rank, what malloc keeps beyond the live bytes, as a share of the step's live peak
(baseline excluded), per effective allocator (engine/cpu_alloc.py). jemalloc: its size classes
round each block up and its arenas keep freed extents; measured 5-18% of the live peak (median
14%) over 21 configurations, both ranks within a few MiB (tests/bench/peak.py). return: the
blocks go back to the OS. glibc keeping freed blocks ("reuse", "system") leaves holes that depend
on the order of allocations and differ between the ranks of one run: not modelled (GLIBC_EXCESS)."""
GLIBC_EXCESS = "10-100%"
"""How far above the plan (which does not count glibc's heap holes) a CPU rank's peak resident set
goes under glibc keeping freed blocks: over the peak bench's 4-step cases `reuse` 1.16-1.73x and
`system` 1.11-1.32x the plan (two runs), and the heap keeps growing with the steps (`reuse` 1.19x,
`system` 1.02x more from step 4 to step 32; docs/benchmarks.md "Peak memory"). Quoted by the
plan's notes."""


def cpu_runtime_bytes(checkpointing: bool, baseline: ProcessBaseline | None = None) -> int:
    """The `runtime` term of a CPU rank: the host's measured baseline (topology/baseline.py) when
    there is one, else CPU_RUNTIME_BYTES (+ CPU_CHECKPOINT_RUNTIME_BYTES with checkpointing)."""
    if baseline is not None:
        return baseline.checkpointing_bytes if checkpointing else baseline.bytes
    return CPU_RUNTIME_BYTES + (CPU_CHECKPOINT_RUNTIME_BYTES if checkpointing else 0)


def gpu_runtime_bytes(baseline: ProcessBaseline | None = None) -> int:
    """The `runtime` term of a GPU rank: the host's measured figure (engine/baseline.py, NVML)
    when there is one, else GPU_RUNTIME_BYTES."""
    if baseline is not None and baseline.cuda_runtime_bytes is not None:
        return baseline.cuda_runtime_bytes
    return GPU_RUNTIME_BYTES


def gpu_runtime_formula(baseline: ProcessBaseline | None = None) -> str:
    what = "CUDA context, cuBLAS workspaces, NCCL"
    if baseline is not None and baseline.cuda_runtime_bytes is not None:
        return f"{what}: measured on this host {baseline.measured_at[:10]} (NVML, one rank)"
    return f"{what}: a documented figure (dsl probe --measure-baseline measures this host's)"


def cpu_runtime_formula(checkpointing: bool, baseline: ProcessBaseline | None = None) -> str:
    """Where the CPU `runtime` term comes from, for the plan's table."""
    what = "Python, torch, gloo" + (" + torch._dynamo (checkpointing)" if checkpointing else "")
    if baseline is not None:
        return (f"{what}: measured on this host {baseline.measured_at[:10]} (torch {baseline.torch}, "
                f"{baseline.allocator})")
    return f"{what}: as measured on dsl's reference machine (dsl probe --measure-baseline: this host's)"


def planned_allocator(setting: str, jemalloc_on_host: bool = True) -> str:
    """The allocator a CPU rank will run with under `engine.cpu_allocator` (engine/cpu_alloc.py):
    auto is jemalloc, which the trainer preloads, where the host has it (as the probe found,
    HostTopology.jemalloc), else glibc keeping freed blocks (reuse)."""
    if setting == "auto" and not jemalloc_on_host:
        return "reuse"
    return "jemalloc" if setting in ("auto", "jemalloc") else setting


NVME_SWAP_BUFFERS = 3

# Term names (stable: they are JSON keys and table rows).
PARAMETERS = "parameters"
GRADIENTS = "gradients"
MASTER = "master weights"
OPTIMIZER = "optimizer states"
ACTIVATIONS = "activations"
WEIGHT_COPIES = "autocast weight copies"
RECOMPUTE = "recomputation peak"
LOGITS = "logits"
BUCKETS = "communication buckets"
GATHERED = "gathered parameters"
OFFLOAD_BUFFERS = "offload buffers"
RUNTIME = "runtime"
MODEL_INIT = "model construction"
ALLOCATOR = "allocator retention"
OFFLOADED_ACTIVATIONS = "offloaded activations"


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# The model ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that decide memory: a Llama-style decoder (engine/model.py)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    seq_len: int
    tied: bool
    experts: int = 0
    experts_per_tok: int = 2

    @classmethod
    def of(cls, model: "ModelConfig | ModelShape | str") -> "ModelShape":
        """From a ModelConfig, a preset name, or itself."""
        if isinstance(model, ModelShape):
            return model
        if isinstance(model, str):
            from dsl.engine.train_config import ModelConfig

            model = ModelConfig(preset=model)
        if model.form != "llama":  # its dimensions are in config.json or its counts, not these fields
            raise ValueError(f"run.train.model is given by {model.form_field}: plan it through "
                             "dsl.engine.modeldesc.shape.shape_of, not ModelShape.of")
        return cls(layers=model.num_hidden_layers, hidden=model.hidden_size,
                   heads=model.num_attention_heads, kv_heads=model.kv_heads, ffn=model.ffn_size,
                   vocab=model.vocab_size, seq_len=model.seq_len, tied=model.tie_word_embeddings,
                   experts=model.num_experts, experts_per_tok=model.num_experts_per_tok)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def attention_params(self) -> int:
        """q, k, v, o projections, no biases."""
        d = self.head_dim
        return self.hidden * self.heads * d * 2 + self.hidden * self.kv_heads * d * 2

    @property
    def mlp_params(self) -> int:
        """SwiGLU gate/up/down (per expert), plus the router for MoE."""
        per_expert = 3 * self.hidden * self.ffn
        if self.experts:
            return per_expert * self.experts + self.hidden * self.experts
        return per_expert

    @property
    def layer_params(self) -> int:
        return self.attention_params + self.mlp_params + 2 * self.hidden  # + two RMSNorm gains

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def params(self) -> int:
        """All parameters (a tied embedding counts once)."""
        return self.layers * self.layer_params + self.embedding_params + self.head_params + self.hidden

    @property
    def matmul_params(self) -> int:
        """Parameters used as matmul weights in one forward (autocast casts each of them)."""
        experts_used = min(self.experts, self.experts_per_tok) if self.experts else 1
        return self.layers * (self.attention_params + 3 * self.hidden * self.ffn * experts_used) \
            + self.vocab * self.hidden

    @property
    def flop_params(self) -> int:
        """Parameters a token multiplies through (MoE: only its experts; the lookup is free)."""
        return self.matmul_params

    @property
    def largest_unit_params(self) -> int:
        """The largest unit ZeRO-3 gathers at once: one decoder layer, or the embedding/head."""
        return max(self.layer_params, self.embedding_params, self.head_params)

    def with_seq_len(self, seq_len: int) -> "ModelShape":
        from dataclasses import replace

        return replace(self, seq_len=seq_len)


# Model states -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter of each model-state term, and per element of activations."""

    param: int
    grad: int
    master: int
    optimizer: int
    compute: int
    """Activation element size: 2 under bf16/fp16, 4 in fp32."""
    residual: int
    """Element size of the residual stream and RMSNorm (4 under the engine's autocast)."""
    autocast: bool
    """16-bit compute on fp32 parameters: every matmul casts (and saves) its input, and at stages
    0-2 its weight."""
    work: int = 0
    """Stage 3's compute-dtype working copy of the parameters, which it gathers instead of them
    (2 under the engine's bf16/fp16 mixed precision, else 0: the parameters are gathered)."""
    weights16: bool = False
    """The module's parameters are in the compute dtype (the master layout at stages 0-2): its
    matmuls cast (and save) no weight."""


def state_bytes(precision: str = "bf16", low_precision_states: bool = False, optimizer: str = "adamw",
                layout: Layout | None = None, stage: int | None = None) -> StateBytes:
    moments = 1 if optimizer == "sgd" else 2  # Adam, 1-bit Adam: momentum + variance; SGD: momentum
    if precision == "fp32":
        return StateBytes(4, 4, 0, 4 * moments, 4, 4, False)
    if low_precision_states:
        return StateBytes(2, 2, 0, 2 * moments, 2, 2, False)
    layout = engine_layout(layout, stage)
    if layout == "paper":
        return StateBytes(2, 2, 4, 4 * moments, 2, 2, False)
    if layout == "master" and (stage is None or stage < 3):
        return StateBytes(2, 4, 4, 4 * moments, 2, 4, True, weights16=True)
    return StateBytes(4, 4, 0, 4 * moments, 2, 4, True, work=2)


@dataclass(frozen=True)
class Term:
    """One line of a memory breakdown, per rank."""

    name: str
    device_bytes: int = 0
    host_bytes: int = 0
    nvme_bytes: int = 0
    formula: str = ""
    transient: bool = False
    """Only for a moment (model construction), not at the same time as the training state."""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "device_bytes": self.device_bytes, "host_bytes": self.host_bytes,
                "nvme_bytes": self.nvme_bytes, "formula": self.formula, "transient": self.transient}
