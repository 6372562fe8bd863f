"""How the bundled engine trains: the `engine:` section of a spec (and `StrictModel`).

Plain pydantic v2 data, no torch, so the launcher can validate and plan on a login node. The
launcher's `Spec` composes these models with `train_config.TrainConfig` (what is trained); the
engine re-validates the same sections on every rank from the resolved spec the launcher wrote,
so both sides read one schema. The rules that combine fields (offload needs ZeRO 1-3, 1-bit Adam's
stages, train_batch arithmetic, ...) are in engine/validity.py, which every entry point calls.

Every field carries a docstring: it is the field's description in `dsl schema`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StrictModel(BaseModel):
    """Base of every spec model: unknown keys are errors; the docstring under a field is its
    description (read lazily by engine/fielddocs.py for `dsl schema` and error hints)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class OptimizerConfig(StrictModel):
    """The optimizer and its hyper-parameters (DeepSpeed's `optimizer` block)."""

    type: Literal["adamw", "sgd", "onebit_adam"] = "adamw"
    """adamw (decoupled weight decay), sgd (with momentum), or onebit_adam (1-bit Adam: AdamW
    for freeze_step steps, then frozen variance and a 1-bit compressed momentum all-reduce
    instead of the gradient all-reduce; zero_stage 0 only, see engine/onebit.py)."""
    lr: float = Field(3e-3, gt=0)
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's moment decay rates."""
    eps: float = Field(1e-8, gt=0)
    """Adam's epsilon."""
    weight_decay: float = Field(0.0, ge=0)
    """Decoupled weight decay, applied to matrices and embeddings only."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """SGD momentum."""
    freeze_step: int = Field(100, ge=1)
    """onebit_adam only: steps of full AdamW with the fp32 gradient all-reduce (the warm-up that
    estimates the variance) before the variance is frozen and momentum is exchanged in 1 bit
    (DeepSpeed's freeze_step)."""


class CommConfig(StrictModel):
    """Compressed gradient communication (`engine.comm`)."""

    quantize_gradients: bool = False
    """ZeRO stages 2-3: reduce-scatter gradients as int8 with one fp32 scale per block (ZeRO++
    qgZ: quantize, all-to-all, dequantize and sum locally; ~1/4 of the fp32 bytes). Adds a
    rounding error of at most max|block| / 254 per element and rank (ops/comm/qreduce.py)."""
    quantize_block_numel: int = Field(512, ge=8)
    """Elements per int8 quantization block (each block sends one fp32 scale, so the bytes are
    1 + 4 / block per element); smaller blocks track outliers more closely."""
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """The dtype gradients cross the wire in when ranks reduce them (every stage; DeepSpeed's
    communication_data_type): fp32, or bf16 for half the bytes, each rank's contribution and the
    sum rounded to bf16 (8 significant bits; the sum is taken in bf16). The result is cast back
    into the fp32 gradient buffer or partition. Not with quantize_gradients (int8 already)."""


class SchedulerConfig(StrictModel):
    """Learning-rate schedule: linear warm-up, then a decay to min_lr_ratio x lr; or one of
    DeepSpeed's schedulers with DeepSpeed's exact formulas (engine/schedule.py)."""

    type: Literal["cosine", "linear", "constant", "WarmupLR", "WarmupDecayLR", "WarmupCosineLR"] = "cosine"
    """Shape of the decay after warm-up. WarmupLR, WarmupDecayLR and WarmupCosineLR are
    DeepSpeed 0.19.8's schedulers, step for step (its warm-up starts one step later than dsl's
    own, its lr follows the applied updates: an fp16 step skipped for overflow does not advance
    it); engine.deepspeed_config sets them."""
    warmup_steps: int = Field(20, ge=0)
    """Steps of linear warm-up from 0 to lr (the DeepSpeed types: warmup_num_steps)."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Learning rate at the last step, as a fraction of lr (WarmupCosineLR: cos_min_ratio;
    unused by WarmupLR and WarmupDecayLR)."""
    warmup_type: Literal["log", "linear"] = "log"
    """The DeepSpeed types only: how the warm-up rises, DeepSpeed's warmup_type (default log)."""
    warmup_min_lr: float = Field(0.0, ge=0)
    """WarmupLR and WarmupDecayLR only: the lr the warm-up starts from (DeepSpeed's warmup_min_lr;
    the peak is optimizer.lr). WarmupDecayLR decays back to it."""
    warmup_min_ratio: float = Field(0.0, ge=0)
    """WarmupCosineLR only: the warm-up starts at this fraction of lr (DeepSpeed's warmup_min_ratio)."""
    total_steps: int | None = Field(None, ge=1)
    """WarmupDecayLR and WarmupCosineLR only: the step the decay ends at (DeepSpeed's
    total_num_steps); null: the run's last step (run.train.steps)."""


class OffloadConfig(StrictModel):
    """What leaves the accelerator (DeepSpeed's offload_optimizer / offload_param)."""

    optimizer: Literal["none", "cpu", "nvme", "auto"] = "none"
    """Where optimizer states (and the fp32 master weights) live and are updated."""
    nvme_path: str | None = None
    """Folder for the offload files of optimizer: nvme and params: nvme (a fast local disk)."""
    sub_group_mib: float = Field(256.0, gt=0)
    """NVMe offload swaps optimizer state in sub-groups of this size, overlapping I/O and compute."""
    params: Literal["none", "cpu", "nvme"] = "none"
    """Stage 3 with optimizer offload (ZeRO-Infinity's offload_param): keep the partitioned
    parameters off the device; each unit is copied up and gathered ahead of use and released
    after it (engine/zero/stage3.py), so the device holds the gathered units only. cpu: the fp32
    master and the 16-bit working copy in CPU memory. nvme: the working copy (what a gather
    reads) in a file under nvme_path, read per unit at each gather and rewritten after each
    update (engine/zero/param_files.py); the fp32 master stays with the optimizer."""
    ratio: float = Field(1.0, ge=0.0, le=1.0)
    """With optimizer: cpu, the fraction of the optimizer state and update that runs on the host
    (ZeRO-Offload++ / SuperOffload's partial offload): the first `ratio` of this rank's shard
    space is updated by the CPU optimizer, the rest on the device with its moments there. 1.0
    offloads everything; 0.0 is no offload."""
    pin_memory: bool = True
    """With a CUDA device: page-lock the host memory of offloaded master weights, optimizer
    states and transfer buffers, so copies to and from the GPU run asynchronously and overlap
    the CPU update (DeepSpeed's offload_optimizer.pin_memory). Costs locked host RAM. No effect
    on a CPU device (the engine prints a note when it is set explicitly there)."""


class Stage3Config(StrictModel):
    """How ZeRO stage 3 gathers parameters (engine/zero/stage3.py, engine/zero/units.py)."""

    gather: Literal["layer", "module"] = "layer"
    """What is gathered, released and reduce-scattered together: layer, each repeated block of
    the model (a decoder layer: fewest collectives); module, each submodule owning parameters (a
    Linear, a norm: DeepSpeed's granularity, the least gathered at once)."""
    max_live_params: int | None = Field(None, ge=0)
    """The most parameter elements gathered on a rank at once (DeepSpeed's
    stage3_max_live_parameters): a prefetch that would pass it waits until the unit is needed.
    Refused at start when below what the model needs at once. null: no cap."""
    prefetch_params: int | None = Field(None, ge=0)
    """The most elements of units gathered ahead of use (DeepSpeed's stage3_prefetch_bucket_size).
    null: exactly the next unit; 0: no prefetch."""


class LossScaleConfig(StrictModel):
    """Dynamic loss scaling for fp16 (DeepSpeed's fp16 block)."""

    initial_scale_power: int = Field(16, ge=0, le=64)
    """The scale starts at 2**initial_scale_power."""
    growth_interval: int = Field(1000, ge=1)
    """Double the scale every this many steps without overflow (DeepSpeed's loss_scale_window, counted
    as DeepSpeed counts: the first doubling after growth_interval + 1 clean steps)."""
    hysteresis: int = Field(2, ge=1)
    """Overflows tolerated before the scale is halved."""
    min_scale: float = Field(1.0, gt=0)
    """The scale never goes below this."""
    static: float | None = Field(None, gt=0)
    """A fixed loss scale instead of a dynamic one."""


class TiledConfig(StrictModel):
    """Run a computation over chunks of tokens, recomputing each chunk in backward (engine/long/)."""

    enabled: bool = False
    """Tile this computation."""
    chunk_tokens: int = Field(4096, ge=1)
    """Tokens (micro_batch x sequence positions of this rank) per chunk."""


class EngineConfig(StrictModel):
    """How the engine trains: parallelism, precision, optimizer and batch (`engine:` in the spec)."""

    zero_stage: Literal[0, 1, 2, 3, "auto"] = 0
    """ZeRO stage: 0 replicates everything, 1 shards optimizer states, 2 also gradients,
    3 also parameters. `auto` lets the planner choose."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Compute precision. bf16/fp16 keep fp32 master weights (see low_precision_states)."""
    low_precision_states: bool = False
    """Keep parameters and optimizer states in bf16 with no fp32 master copy: about half the
    memory of model states, at the cost of update precision (engine/optim.py: stochastic
    rounding keeps small updates in expectation). Needs precision: bf16."""
    precision_layout: Literal["master", "autocast"] | None = None
    """bf16/fp16 with fp32 master weights: where each state lives (engine/precision.py).
    master (the default): the model's parameters are held in the compute dtype (replicated at
    stages 0-2) and the fp32 master weights are a separate copy, partitioned like the optimizer
    states at stages 1-3, in host memory under CPU offload (DeepSpeed's layout; 2 B/param +
    16 B/param / N at stage 2; no weight cast in any forward). autocast: the parameters are the
    fp32 master weights and autocast casts them in every forward (4 B/param replicated at stages
    0-2, no separate master: 2 B/param fewer at stage 0, 2 B/param - 4 B/param / N more at stages
    1-2). At stage 3 both are the same: an fp32 master partition plus its compute-dtype copy.
    null means master; `dsl launch` writes the layout that ran into resolved.yaml. Only for
    precision bf16/fp16 without low_precision_states."""
    micro_batch: int = Field(8, ge=1)
    """Sequences per rank per forward/backward pass."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step; gradients are exchanged on the last one."""
    train_batch: int | None = Field(None, ge=1)
    """Sequences per optimizer step over all ranks; must equal micro_batch x grad_accum x
    data-parallel size when set (checked at launch)."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value; null disables clipping."""
    optimizer: OptimizerConfig = OptimizerConfig()
    """Optimizer and hyper-parameters."""
    scheduler: SchedulerConfig = SchedulerConfig()
    """Learning-rate schedule."""
    offload: OffloadConfig = OffloadConfig()
    """CPU/NVMe offload of optimizer states (and of parameters at stage 3)."""
    loss_scale: LossScaleConfig = LossScaleConfig()
    """fp16 loss scaling."""
    stage3: Stage3Config = Stage3Config()
    """How ZeRO stage 3 gathers parameters: granularity, live cap, prefetch."""
    activation_checkpointing: bool | Literal["auto"] = False
    """Recompute each layer's activations in backward instead of keeping them. On a model other
    than the bundled Llama the layers are the children of its repeated block list (an
    nn.ModuleList of modules of one class), or the modules checkpoint_module names."""
    checkpoint_module: str | None = Field(None, min_length=1)
    """The class name of the blocks activation checkpointing recomputes (e.g. LlamaDecoderLayer,
    GPT2Block), for a model whose blocks are not found automatically (engine/long/blocks.py).
    Needs activation_checkpointing: true (or auto). Default: the repeated block list."""
    sequence_parallel: int | Literal["auto"] = 1
    """Ulysses sequence-parallel degree: ranks that split one sequence (each holds seq_len / sp
    tokens; attention all-to-alls to heads / sp full-sequence heads). Must divide the world, the
    query heads and seq_len, and divide or be a multiple of the kv heads; `auto` lets the planner
    choose. ZeRO shards over all ranks (data-parallel x sequence-parallel)."""
    tiled_loss: TiledConfig = TiledConfig()
    """Cross entropy over chunks of chunk_tokens tokens, recomputed per chunk in backward: never
    materialises the full tokens x vocab logits (the `logits` memory term shrinks to one chunk)."""
    tiled_mlp: TiledConfig = TiledConfig()
    """The SwiGLU MLP over chunks of chunk_tokens tokens, recomputed per chunk in backward: its
    tokens x ffn_size intermediates exist for one chunk at a time."""
    activation_offload: bool = False
    """With activation_checkpointing, keep each layer's checkpointed input in host memory instead
    of on the device (copied out during forward and back before the layer is recomputed,
    overlapped with compute on CUDA). Needs activation_checkpointing: true (or auto)."""
    compile: bool | Literal["auto"] = False
    """Compile each block of the model (the children of its outermost ModuleList: the bundled
    Llama's decoder layers) with torch.compile; the engine's hooks stay outside the compiled code.
    Off by default: on this project's 2-core CPU machine a compiled forward+backward alone is
    1.26x (fp32) / 1.5x (bf16) faster, and 2-rank training steps 1.07-1.08x (fp32) / 1.08-1.13x
    (bf16) faster than eager at ZeRO 0-3 (paired runs, docs/benchmarks.md), for a first step that
    compiles (tens of seconds, cached afterwards under /tmp/torchinductor_$USER) and 0.1-0.2 GiB
    more resident memory.
    true: compile (an error with sequence_parallel > 1, tiled_mlp or activation_offload, whose
    layers run their own autograd, or on a CPU host without a C++ compiler); auto: compile the
    bundled Llama where nothing above stands in the way, else stay eager; false: eager.
    TORCHDYNAMO_DISABLE=1 (torch's switch) turns it off whatever this says."""
    tf32: bool = True
    """On CUDA (Ampere and later), run fp32 matmuls and convolutions in TensorFloat-32 (10-bit
    mantissa inputs, fp32 accumulation): several times faster than full fp32 for a precision
    loss that training tolerates (torch's default leaves it off). Only fp32 work is affected;
    bf16/fp16 autocast matmuls are 16-bit already. Set false for bit-exact fp32 comparisons.
    No effect on a CPU device."""
    cpu_allocator: Literal["auto", "jemalloc", "reuse", "system", "return"] = "auto"
    """When the engine trains on the CPU, what the rank's malloc does with freed memory
    (engine/cpu_alloc.py). "jemalloc": the bundled trainer starts with jemalloc preloaded (as
    torch's `run_cpu --enable_jemalloc` does), freed pages kept per size class: as fast as
    "reuse" and its peak resident set predictable (the memory model counts its retention;
    docs/benchmarks.md "Peak memory"); the rank stops if libjemalloc.so.2 is missing. "auto"
    (default): jemalloc where the host has it, else "reuse" with a printed note. "reuse": glibc
    keeps freed large blocks for the next step (mallopt): fast, but the heap's holes put the peak
    10-100% above the model's. "system": glibc's defaults. "return": every block of 1 MiB or more
    is unmapped when freed, so the resident set follows the live bytes, at 1.3-1.7x the CPU time
    per step. No effect on GPUs or results."""
    bucket_mib: float = Field(25.0, gt=0)
    """Size of a gradient communication bucket in MiB."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON config to take the settings above from (relative to the spec file), read
    with DeepSpeed 0.19.8's semantics and Hugging Face's `auto`; settings written next to it
    override it. docs/deepspeed.md lists what dsl does with every key."""
    comm: CommConfig = CommConfig()
    """Compressed gradient communication (int8 reduce-scatter at stages 2-3)."""


def mixed_layout(engine: EngineConfig, stage: int | None = None) -> Literal["fp32", "low_precision", "master", "autocast"]:
    """How the engine holds its training state (engine/precision.py's table): `fp32`,
    `low_precision` (bf16 states, no master), or for bf16/fp16 with fp32 master weights the
    `precision_layout` (null: master, at every stage; `stage` is kept for callers that ask per
    stage)."""
    if engine.precision == "fp32":
        return "fp32"
    if engine.low_precision_states:
        return "low_precision"
    return engine.precision_layout or "master"


def check_batch(engine: EngineConfig, dp: int) -> str | None:
    """The reason train_batch disagrees with micro_batch x grad_accum x dp, or None
    (engine/validity.py's rule)."""
    from dsl.engine.validity import batch_reason

    return batch_reason(engine, dp)


def unsupported_reason(engine: EngineConfig) -> str | None:
    """Why the bundled engine cannot run `engine` (`engine.<field>: <message>` of the first rule
    it breaks, engine/validity.py), or None when it can. Rules that need the world size or the
    model are not checked here; the planner calls this on every candidate it considers."""
    from dsl.engine.validity import problems

    found = problems(engine)
    return str(found[0]) if found else None
