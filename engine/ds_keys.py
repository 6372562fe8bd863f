"""Every DeepSpeed config key dsl knows, and what dsl does with it (the importer's table).

One `Key` per DeepSpeed 0.19.8 key (deepspeed/runtime/config.py, constants.py, zero/config.py,
zero/offload_config.py, precision_config.py, lr_schedules.py, the optimizers' constructors),
with DeepSpeed's default and dsl's treatment:

- `mapped`: becomes an engine setting (`to`); the importer (engine/dsconfig.py) does the mapping;
- `default`: accepted silently at DeepSpeed's default value (or when the section it belongs to
  is disabled); any other value changes the result and is refused, with `why`;
- `note`: accepted whatever its value, with a note of what dsl does instead (tuning, logging,
  checkpoint-format and memory-placement keys that do not change the numbers trained);
- `legacy`: an old spelling DeepSpeed still reads, treated as the key it stands for (`to`);
- `refused`: dsl cannot honour it (`why` says what to do instead); a block whose `enabled` is
  false is accepted (it does nothing).

A key under a section DeepSpeed validates strictly (its pydantic models forbid unknown fields:
zero_optimization, fp16, bf16, the offload blocks, ...) and absent from this table is refused,
as DeepSpeed refuses it, with the closest known key; an unknown top-level key is ignored by
DeepSpeed (it reads the keys it knows) and by dsl, with a note. `docs/deepspeed.md` is
generated from this table (`python -m dsl.engine.ds_docs`), so the documentation cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Key", "KEYS", "STRICT_SECTIONS", "OPTIMIZER_PARAMS", "SCHEDULER_PARAMS", "find", "NO_DEFAULT"]


class _NoDefault:
    def __repr__(self) -> str:
        return "-"


NO_DEFAULT: Any = _NoDefault()


@dataclass(frozen=True)
class Key:
    path: str
    """Dotted key path, e.g. `zero_optimization.stage`."""
    use: str
    """mapped | default | note | legacy | refused."""
    default: Any = NO_DEFAULT
    """DeepSpeed 0.19.8's value when the key is left out."""
    to: str = ""
    """mapped/legacy: the engine setting (or DeepSpeed key) it becomes."""
    why: str = ""
    """note: what dsl does instead; default/refused: why another value is refused, what to do."""
    block: bool = False
    """The rule covers the whole section under `path` (its sub-keys are not listed)."""

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.path.split("."))


def _k(path: str, use: str, default: Any = NO_DEFAULT, to: str = "", why: str = "", block: bool = False) -> Key:
    return Key(path, use, default, to, why, block)


_Z = "zero_optimization"
_OO = "zero_optimization.offload_optimizer"
_OP = "zero_optimization.offload_param"
_NOT_TUNING = "dsl's ZeRO stages bucket, prefetch and keep parameters by their own rules (engine/zero/)"
_LOGS = "dsl prints a progress line every run.train.log_every steps and writes metrics.jsonl"

KEYS: list[Key] = [
    # -- batch ---------------------------------------------------------------------------------
    _k("train_batch_size", "mapped", None, "engine.train_batch",
       "DeepSpeed's rule: train_batch_size = micro x accumulation x data-parallel size; any two derive the third"),
    _k("train_micro_batch_size_per_gpu", "mapped", None, "engine.micro_batch"),
    _k("gradient_accumulation_steps", "mapped", None, "engine.grad_accum"),
    _k("managed_gradient_accumulation", "default", True, why="false lets the script decide where an "
       "accumulation boundary is; dsl's engine refuses a step after a number of backward passes other than "
       "grad_accum: leave it true"),
    # -- precision -----------------------------------------------------------------------------
    _k("fp16.enabled", "mapped", False, "engine.precision: fp16"),
    _k("fp16.loss_scale", "mapped", 0, "engine.loss_scale.static (0: dynamic)"),
    _k("fp16.initial_scale_power", "mapped", 16, "engine.loss_scale.initial_scale_power"),
    _k("fp16.loss_scale_window", "mapped", 1000, "engine.loss_scale.growth_interval"),
    _k("fp16.hysteresis", "mapped", 2, "engine.loss_scale.hysteresis"),
    _k("fp16.min_loss_scale", "mapped", 1, "engine.loss_scale.min_scale"),
    _k("fp16.consecutive_hysteresis", "default", False, why="dsl refills the hysteresis only when the scale "
       "grows (DeepSpeed's default); refilling it after every clean step is not implemented"),
    _k("fp16.auto_cast", "default", False, why="dsl does not cast the model's floating-point inputs to fp16"),
    _k("fp16.fp16_master_weights_and_grads", "default", False, why="dsl keeps fp32 master weights and "
       "gradients; fp16 ones change every update"),
    _k("bf16.enabled", "mapped", False, "engine.precision: bf16"),
    _k("bf16.immediate_grad_update", "note", False, why="dsl accumulates 16-bit gradients into fp32 as "
       "each backward produces them"),
    _k("bf16.check_grad_overflow", "note", True, why="dsl skips a step only for fp16 overflow; a bf16 step "
       "with inf/nan gradients is applied (DeepSpeed skips it), which only matters once training has diverged"),
    _k("bf16.bf16_master_weights_and_grads", "default", False, why="bf16 master weights without a fp32 copy "
       "change every update; dsl's nearest setting is engine.low_precision_states: true (stochastic rounding)"),
    _k("bf16.bf16_optimizer_states", "default", False, why="see bf16.bf16_master_weights_and_grads"),
    _k("bfloat16", "legacy", NO_DEFAULT, "bf16", "DeepSpeed's old name of the bf16 section", block=True),
    _k("torch_autocast.enabled", "default", False, why="DeepSpeed's torch.autocast mode (with "
       "lower_precision_safe_modules) is not mapped; use bf16: {enabled: true}, or dsl's "
       "engine.precision_layout: autocast in the spec"),
    _k("torch_autocast.dtype", "note", None, why="used only with torch_autocast.enabled"),
    _k("torch_autocast.lower_precision_safe_modules", "note", None, why="used only with torch_autocast.enabled"),
    _k("amp", "refused", NO_DEFAULT, why="NVIDIA Apex AMP (removed in DeepSpeed 0.19.8, which refuses the key): "
       "use fp16 or bf16; a disabled amp block is accepted", block=True),
    _k("data_types.grad_accum_dtype", "note", None, why="dsl accumulates 16-bit gradients in fp32"),
    _k("data_types.param_dtype", "default", None, why="dsl holds parameters in engine.precision's dtype"),
    _k("data_types.buffer_dtype", "note", None, why="dsl leaves module buffers in the dtype they have"),
    _k("data_types.keep_in_fp32_modules", "note", "auto", why="dsl leaves module buffers in the dtype they have"),
    _k("communication_data_type", "mapped", None, "engine.comm.reduce_dtype",
       "left out: the training dtype, as DeepSpeed (bf16 training reduces in bf16); fp16 becomes fp32 "
       "(dsl reduces in fp32 or bf16), with a note"),
    _k("seq_parallel_communication_data_type", "note", "fp32", why="dsl's Ulysses all-to-alls move "
       "activations in the compute dtype"),
    # -- gradients -----------------------------------------------------------------------------
    _k("gradient_clipping", "mapped", 1.0, "engine.grad_clip (0: off)",
       "DeepSpeed 0.19.8 clips at 1.0 when the key is left out (since 0.19.3; older versions did not clip)"),
    _k("prescale_gradients", "note", False, why="dsl divides each gradient bucket by the data-parallel size "
       "before its reduction"),
    _k("gradient_predivide_factor", "note", 1.0, why="dsl divides each gradient bucket by the data-parallel "
       "size before its reduction"),
    _k("gradient_allreduce_op", "default", "mean", why="sums the ranks' gradients instead of averaging them "
       "(a data-parallel-size times larger step); dsl averages"),
    _k("disable_allgather", "note", False, why="dsl's stages all-gather updated parameters by their own rules"),
    # -- optimizer and scheduler ---------------------------------------------------------------
    _k("optimizer.type", "mapped", None, "engine.optimizer.type",
       "Adam, AdamW -> adamw; SGD -> sgd; OneBitAdam -> onebit_adam. Left out: DeepSpeed uses the "
       "script's optimizer; dsl uses engine.optimizer"),
    _k("optimizer.params", "mapped", NO_DEFAULT, "engine.optimizer", "see the optimizer parameters below"),
    _k("optimizer.legacy_fusion", "note", False, why="dsl picks its fused optimizer kernel itself"),
    _k("scheduler.type", "mapped", None, "engine.scheduler.type",
       "WarmupLR, WarmupDecayLR, WarmupCosineLR, with DeepSpeed's formulas; left out: a constant lr, as DeepSpeed"),
    _k("scheduler.params", "mapped", NO_DEFAULT, "engine.scheduler", "see the scheduler parameters below"),
    _k("zero_allow_untested_optimizer", "legacy", False, "-", "no effect in dsl: its optimizers are its own "
       "and all run with every ZeRO stage they support"),
    _k("zero_force_ds_cpu_optimizer", "note", True, why="dsl's CPU offload always runs its own CPU Adam"),
    # -- ZeRO ----------------------------------------------------------------------------------
    _k(f"{_Z}.stage", "mapped", 0, "engine.zero_stage"),
    _k(_Z, "legacy", NO_DEFAULT, f"{_Z}.stage", "true/false: DeepSpeed's old form, stage 1 / 0"),
    _k(f"{_Z}.reduce_bucket_size", "mapped", 500000000, "engine.bucket_mib (elements x 4 bytes)"),
    _k(f"{_Z}.sub_group_size", "mapped", 1000000000, "engine.offload.sub_group_mib (elements x 4 bytes; 0 keeps dsl's)"),
    _k(f"{_Z}.zero_quantized_gradients", "mapped", False, "engine.comm.quantize_gradients"),
    _k(f"{_Z}.contiguous_gradients", "note", True, why="dsl's gradient buckets are contiguous"),
    _k(f"{_Z}.reduce_scatter", "note", True, why="stages 1-3 reduce-scatter or all-reduce by their own rules; "
       "either averages the same gradients"),
    _k(f"{_Z}.use_multi_rank_bucket_allreduce", "note", True, why=_NOT_TUNING),
    _k(f"{_Z}.allgather_partitions", "note", True, why="dsl all-gathers updated partitions"),
    _k(f"{_Z}.allgather_bucket_size", "note", 500000000, why="dsl all-gathers per gradient bucket (engine.bucket_mib)"),
    _k(f"{_Z}.overlap_comm", "note", None, why="dsl always overlaps gradient communication with the backward"),
    _k(f"{_Z}.compute_grad_norm", "note", True, why="dsl always computes the global gradient norm"),
    _k(f"{_Z}.load_from_fp32_weights", "note", True, why="dsl's checkpoints resume from their fp32 master weights"),
    _k(f"{_Z}.elastic_checkpoint", "note", False, why="dsl's checkpoints load on any number of ranks"),
    _k(f"{_Z}.cpu_offload", "legacy", None, f"{_OO}.device: cpu", "DeepSpeed's old name"),
    _k(f"{_Z}.cpu_offload_param", "legacy", None, f"{_OP}.device: cpu", "DeepSpeed's old name"),
    _k(f"{_Z}.cpu_offload_use_pin_memory", "legacy", None, "-", "no effect in DeepSpeed 0.19.8 (it sets no new key); none in dsl"),
    _k(f"{_Z}.stage3_prefetch_bucket_size", "mapped", 50000000, "engine.stage3.prefetch_params (with stage3.gather: module)"),
    _k(f"{_Z}.prefetch_bucket_size", "mapped", 50000000, "engine.stage3.prefetch_params (DeepSpeed's alias of stage3_prefetch_bucket_size)"),
    _k(f"{_Z}.stage3_param_persistence_threshold", "note", 100000, why=_NOT_TUNING),
    _k(f"{_Z}.param_persistence_threshold", "note", 100000, why=_NOT_TUNING),
    _k(f"{_Z}.stage3_model_persistence_threshold", "note", NO_DEFAULT, why=_NOT_TUNING),
    _k(f"{_Z}.model_persistence_threshold", "note", NO_DEFAULT, why=_NOT_TUNING),
    _k(f"{_Z}.stage3_max_live_parameters", "mapped", 1000000000, "engine.stage3.max_live_params (with stage3.gather: module)"),
    _k(f"{_Z}.max_live_parameters", "mapped", 1000000000, "engine.stage3.max_live_params (DeepSpeed's alias of stage3_max_live_parameters)"),
    _k(f"{_Z}.stage3_max_reuse_distance", "note", 1000000000, why=_NOT_TUNING),
    _k(f"{_Z}.max_reuse_distance", "note", 1000000000, why=_NOT_TUNING),
    _k(f"{_Z}.stage3_gather_16bit_weights_on_model_save", "note", False, why="a save format: dsl's checkpoints "
       "hold the full fp32 weights in its own rank-count-independent format"),
    _k(f"{_Z}.gather_16bit_weights_on_model_save", "note", False, why="a save format: dsl's checkpoints hold "
       "the full fp32 weights in its own rank-count-independent format"),
    _k(f"{_Z}.stage3_gather_fp16_weights_on_model_save", "legacy", False,
       f"{_Z}.stage3_gather_16bit_weights_on_model_save", "DeepSpeed's old name"),
    _k(f"{_Z}.stage3_module_granularity_threshold", "note", 0, why=_NOT_TUNING),
    _k(f"{_Z}.module_granularity_threshold", "note", 0, why=_NOT_TUNING),
    _k(f"{_Z}.stage3_use_all_reduce_for_fetch_params", "note", False, why=_NOT_TUNING),
    _k(f"{_Z}.use_all_reduce_for_fetch_params", "note", False, why=_NOT_TUNING),
    _k(f"{_Z}.stage3_allgather_sequential", "note", False, why=_NOT_TUNING),
    _k(f"{_Z}.allgather_sequential", "note", False, why=_NOT_TUNING),
    _k(f"{_Z}.ignore_unused_parameters", "note", True, why="dsl reduces a missing gradient as zeros"),
    _k(f"{_Z}.legacy_stage1", "note", False, why="dsl has one stage-1 implementation"),
    _k(f"{_Z}.round_robin_gradients", "note", False, why=_NOT_TUNING),
    _k(f"{_Z}.parameter_alignment", "note", False, why="dsl pads its flat buffers by its own rules"),
    _k(f"{_Z}.zero_hpz_partition_size", "note", 1, why="hierarchical partitioning (ZeRO++ hpZ) is not "
       "implemented; parameters are gathered over all ranks, which gives the same values"),
    _k(f"{_Z}.zero_quantized_weights", "default", False, why="ZeRO++ qwZ (int8 weight all-gather) is not "
       "implemented and would change the weights each forward sees; leave it false"),
    _k(f"{_Z}.zero_quantized_nontrainable_weights", "default", False, why="quantized frozen weights are not "
       "implemented; leave it false"),
    _k(f"{_Z}.memory_efficient_linear", "note", True, why=_NOT_TUNING),
    _k(f"{_Z}.pipeline_loading_checkpoint", "note", False, why="dsl has no pipeline engine"),
    _k(f"{_Z}.override_module_apply", "note", True, why=_NOT_TUNING),
    _k(f"{_Z}.log_trace_cache_warnings", "note", False, why=_LOGS),
    _k(f"{_Z}.enable_sanity_checks", "note", False, why="no effect in dsl"),
    _k(f"{_Z}.save_muon_momentum_buffer_in_memory", "note", False, why="dsl has no Muon optimizer"),
    _k(f"{_Z}.leaf_module", "note", NO_DEFAULT, why=_NOT_TUNING, block=True),
    _k(f"{_Z}.zenflow", "refused", None, why="ZenFlow (asynchronous, partly stale updates) is not implemented; "
       "remove it", block=True),
    _k(f"{_Z}.mics_shard_size", "refused", NO_DEFAULT, why="MiCS was removed in DeepSpeed 0.19.8, which refuses "
       "the key; remove it"),
    _k(f"{_Z}.mics_hierarchical_params_gather", "refused", NO_DEFAULT, why="MiCS was removed in DeepSpeed "
       "0.19.8, which refuses the key; remove it"),
    _k(f"{_Z}.zeropp_loco_param", "refused", NO_DEFAULT, why="LoCo-ZeRO++ was removed in DeepSpeed 0.19.8, "
       "which refuses the key; remove it"),
    # -- offload -------------------------------------------------------------------------------
    _k(f"{_OO}.device", "mapped", "none", "engine.offload.optimizer"),
    _k(f"{_OO}.nvme_path", "mapped", None, "engine.offload.nvme_path"),
    _k(f"{_OO}.pin_memory", "mapped", True, "engine.offload.pin_memory"),
    _k(f"{_OO}.ratio", "mapped", 1.0, "engine.offload.ratio"),
    _k(f"{_OO}.buffer_count", "note", 4, why="dsl's NVMe offload swaps engine.offload.sub_group_mib at a time"),
    _k(f"{_OO}.pipeline_read", "note", False, why="dsl's NVMe offload overlaps reads and writes with compute"),
    _k(f"{_OO}.pipeline_write", "note", False, why="dsl's NVMe offload overlaps reads and writes with compute"),
    _k(f"{_OO}.fast_init", "note", False, why="no effect in dsl"),
    _k(f"{_OO}.super_offload", "note", False, why="dsl's CPU offload runs its own CPU Adam on every host"),
    _k(f"{_OO}.cpuadam_cores_perc", "note", 0.8, why="dsl's CPU Adam uses the threads of OMP_NUM_THREADS"),
    _k(f"{_OP}.device", "mapped", "none", "engine.offload.params",
       "cpu and nvme need optimizer offload (cpu or nvme) in dsl (the offloaded optimizer updates the "
       "offloaded partitions); without it the parameters stay on the device, with a note"),
    _k(f"{_OP}.pin_memory", "note", True, why="dsl page-locks offloaded memory on GPU hosts (engine.offload.pin_memory)"),
    _k(f"{_OP}.nvme_path", "mapped", None, "engine.offload.nvme_path (one folder for parameter and optimizer files)"),
    _k(f"{_OP}.buffer_count", "note", 5, why="dsl reads each unit's partition from its file when the unit is gathered "
                                             "(engine/zero/param_files.py)"),
    _k(f"{_OP}.buffer_size", "note", 100000000, why="dsl reads each unit's partition from its file when the unit is "
                                                   "gathered (engine/zero/param_files.py)"),
    _k(f"{_OP}.max_in_cpu", "note", 1000000000, why="dsl keeps no parameter partition in CPU memory with device nvme"),
    _k("aio", "note", NO_DEFAULT, why="dsl's NVMe offload does its own I/O", block=True),
    # -- parallelism ---------------------------------------------------------------------------
    _k("sequence_parallel_size", "mapped", 1, "engine.sequence_parallel (Ulysses)"),
    _k("tensor_parallel", "refused", NO_DEFAULT, why="tensor parallelism (AutoTP) is not implemented; dsl "
       "parallelizes with ZeRO and Ulysses sequence parallelism (engine.sequence_parallel)", block=True),
    _k("expert_parallel", "refused", NO_DEFAULT, why="expert parallelism is not implemented (the engine trains "
       "dense models)", block=True),
    _k("pipeline", "note", NO_DEFAULT, why="used only by deepspeed.pipe.PipelineModule models; dsl has no "
       "pipeline parallelism", block=True),
    _k("use_data_before_expert_parallelism", "note", False, why="dsl has no expert parallelism"),
    _k("hybrid_engine", "refused", NO_DEFAULT, why="the RLHF hybrid engine is not implemented; a disabled "
       "block is accepted", block=True),
    # -- features that change what is trained --------------------------------------------------
    _k("data_efficiency", "refused", NO_DEFAULT, why="curriculum learning and random-LTD change which data and "
       "tokens are trained; dsl reads its data by global sample index (engine/data.py); a disabled block is "
       "accepted", block=True),
    _k("curriculum_learning", "refused", NO_DEFAULT, why="curriculum learning (removed from DeepSpeed 0.19.8, "
       "which refuses the key) changes the sequences trained; a disabled block is accepted", block=True),
    _k("sparse_attention", "refused", NO_DEFAULT, why="DeepSpeed sparse attention (removed in 0.19.8, which "
       "refuses the key) is not implemented: dsl's attention is dense; remove the block", block=True),
    _k("progressive_layer_drop", "refused", NO_DEFAULT, why="progressive layer dropping (removed in DeepSpeed "
       "0.19.8) is not implemented; a disabled block is accepted", block=True),
    _k("elasticity", "refused", NO_DEFAULT, why="DeepSpeed elasticity (removed in 0.19.8) is not implemented; "
       "set the batch keys directly; a disabled block is accepted", block=True),
    _k("eigenvalue", "refused", NO_DEFAULT, why="removed in DeepSpeed 0.19.8; a disabled block is accepted", block=True),
    _k("quantize_training", "refused", NO_DEFAULT, why="MoQ (removed in DeepSpeed 0.19.8) is not implemented; "
       "a disabled block is accepted", block=True),
    _k("compression_training", "refused", NO_DEFAULT, why="the compression library (removed in DeepSpeed 0.19.8) "
       "is not implemented; remove the block", block=True),
    _k("weight_quantization", "refused", NO_DEFAULT, why="weight quantization is not implemented", block=True),
    _k("sparse_gradients", "default", False, why="removed in DeepSpeed 0.19.8; dsl reduces dense gradients"),
    _k("graph_harvesting", "default", False, why="removed in DeepSpeed 0.19.8; no effect in dsl"),
    _k("nebula", "note", NO_DEFAULT, why="Nebula checkpointing (removed in DeepSpeed 0.19.8); dsl writes its "
       "own checkpoints", block=True),
    # -- compile, checkpoints, logging ---------------------------------------------------------
    _k("compile", "note", NO_DEFAULT, why="dsl compiles with engine.compile in the spec (DeepCompile is not "
       "implemented; this block does not turn dsl's compile on)", block=True),
    _k("activation_checkpointing", "note", NO_DEFAULT, why="configures deepspeed.checkpointing for models that "
       "call it; dsl recomputes activations with engine.activation_checkpointing, which this block does not "
       "turn on", block=True),
    _k("checkpoint", "note", NO_DEFAULT, why="dsl's checkpoints are its own format (engine/checkpoint.py), "
       "written every run.train.checkpoint_every steps", block=True),
    _k("datastates", "note", NO_DEFAULT, why="dsl's checkpoints are its own format", block=True),
    _k("dataloader_drop_last", "note", False, why="used by DeepSpeed's own data loader; dsl reads its data by "
       "global sample index"),
    _k("steps_per_print", "note", None, why=_LOGS),
    _k("wall_clock_breakdown", "note", False, why=_LOGS + " (tokens/s per interval)"),
    _k("memory_breakdown", "note", False, why="metrics.jsonl has each rank's peak memory"),
    _k("dump_state", "note", False, why="no effect in dsl"),
    _k("disable_python_gc", "note", False, why="no effect in dsl"),
    _k("log_level", "note", None, why="DSL_DEBUG=1 turns on dsl's debug logs"),
    _k("timers", "note", NO_DEFAULT, why=_LOGS, block=True),
    _k("comms_logger", "note", NO_DEFAULT, why=_LOGS, block=True),
    _k("flops_profiler", "note", NO_DEFAULT, why="no flops profiler in dsl; " + _LOGS, block=True),
    _k("autotuning", "note", NO_DEFAULT, why="`dsl plan` chooses ZeRO stage, offload and batch split instead", block=True),
    _k("tensorboard", "note", NO_DEFAULT, why=_LOGS, block=True),
    _k("wandb", "note", NO_DEFAULT, why=_LOGS, block=True),
    _k("csv_monitor", "note", NO_DEFAULT, why=_LOGS, block=True),
    _k("comet", "note", NO_DEFAULT, why=_LOGS, block=True),
    _k("vocabulary_size", "note", None, why="DeepSpeed only warns about alignment with it"),
]

# Optimizer parameters by dsl optimizer type: (DeepSpeed's default, treatment, text).
OPTIMIZER_PARAMS: dict[str, list[Key]] = {
    "adamw": [
        _k("lr", "mapped", 0.001, "engine.optimizer.lr"),
        _k("betas", "mapped", [0.9, 0.999], "engine.optimizer.betas"),
        _k("eps", "mapped", 1e-8, "engine.optimizer.eps"),
        _k("weight_decay", "mapped", 0.0, "engine.optimizer.weight_decay",
           "decoupled (AdamW); dsl decays matrices and embeddings, not gains and biases, as Megatron-DeepSpeed, "
           "DeepSpeed-Chat and Hugging Face's Trainer group parameters (DeepSpeed decays what the script passes it)"),
        _k("adam_w_mode", "default", True, why="false is Adam with L2 weight decay in the gradient; dsl's Adam "
           "decouples weight decay (AdamW)"),
        _k("bias_correction", "default", True, why="dsl's Adam always corrects the moment estimates' bias"),
        _k("amsgrad", "default", False, why="AMSGrad is not implemented (DeepSpeed's fused Adam refuses it too)"),
        _k("torch_adam", "note", False, why="dsl picks its fused Adam itself (torch's AdamW without "
           "weight_decay defaults it to 0.01; dsl follows that)"),
        _k("foreach", "note", None, why="dsl picks its fused Adam itself"),
        _k("fp32_optimizer_states", "default", True, why="dsl keeps fp32 optimizer states (bf16 ones: "
           "engine.low_precision_states)"),
        _k("max_grad_norm", "refused", NO_DEFAULT, why="DeepSpeed refuses it too: \"'max_grad_norm' is not "
           "supported as an optimizer parameter, please switch to using the deepspeed parameter "
           "'gradient_clipping'\""),
        _k("set_grad_none", "note", True, why="dsl zeroes its gradient buffers"),
    ],
    "sgd": [
        _k("lr", "mapped", 0.001, "engine.optimizer.lr", "torch.optim.SGD's default"),
        _k("momentum", "mapped", 0, "engine.optimizer.momentum"),
        _k("weight_decay", "default", 0, why="torch's SGD adds weight decay to the gradient (L2); dsl's SGD "
           "decouples it: use weight_decay 0, or an AdamW"),
        _k("dampening", "default", 0, why="dsl's SGD has no dampening"),
        _k("nesterov", "default", False, why="dsl's SGD has no Nesterov momentum"),
        _k("maximize", "default", False, why="dsl minimizes the loss"),
        _k("foreach", "note", None, why="dsl updates flat buffers"),
        _k("differentiable", "default", False, why="no effect in training"),
        _k("fused", "note", None, why="dsl updates flat buffers"),
    ],
    "onebit_adam": [
        _k("lr", "mapped", 0.001, "engine.optimizer.lr"),
        _k("betas", "mapped", [0.9, 0.999], "engine.optimizer.betas"),
        _k("eps", "mapped", 1e-8, "engine.optimizer.eps"),
        _k("weight_decay", "mapped", 0.0, "engine.optimizer.weight_decay"),
        _k("freeze_step", "mapped", 100000, "engine.optimizer.freeze_step"),
        _k("bias_correction", "default", True, why="dsl's 1-bit Adam always corrects the moment estimates' bias"),
        _k("amsgrad", "default", False, why="AMSGrad is not implemented"),
        _k("cuda_aware", "note", False, why="dsl's 1-bit all-reduce runs over the job's process group"),
        _k("comm_backend_name", "note", "nccl", why="dsl's 1-bit all-reduce runs over the job's process group"),
        _k("max_grad_norm", "refused", NO_DEFAULT, why="use gradient_clipping"),
    ],
}

OPTIMIZER_TYPES = {"adam": "adamw", "adamw": "adamw", "sgd": "sgd", "onebitadam": "onebit_adam"}
"""DeepSpeed optimizer type (lower case) -> dsl's. Others (Lamb, OneBitLamb, ZeroOneAdam, Adagrad,
Lion, Muon, MuAdam, any torch.optim name) are refused."""

_WARMUP_TYPE = "log or linear (DeepSpeed's default: log)"
SCHEDULER_PARAMS: dict[str, list[Key]] = {
    "WarmupLR": [
        _k("warmup_min_lr", "mapped", 0.0, "engine.scheduler.warmup_min_lr"),
        _k("warmup_max_lr", "mapped", None, "engine.optimizer.lr", "left out: the optimizer's lr"),
        _k("warmup_num_steps", "mapped", 1000, "engine.scheduler.warmup_steps"),
        _k("warmup_type", "mapped", "log", "engine.scheduler.warmup_type", _WARMUP_TYPE),
        _k("last_batch_iteration", "default", -1, why="resuming a schedule mid-way: dsl resumes it from its "
           "checkpoints"),
    ],
    "WarmupDecayLR": [
        _k("total_num_steps", "mapped", NO_DEFAULT, "engine.scheduler.total_steps", "required by DeepSpeed"),
        _k("warmup_min_lr", "mapped", 0.0, "engine.scheduler.warmup_min_lr"),
        _k("warmup_max_lr", "mapped", 0.001, "engine.optimizer.lr", "left out: 0.001 (not the optimizer's lr)"),
        _k("warmup_num_steps", "mapped", 1000, "engine.scheduler.warmup_steps"),
        _k("warmup_type", "mapped", "log", "engine.scheduler.warmup_type", _WARMUP_TYPE),
        _k("last_batch_iteration", "default", -1, why="resuming a schedule mid-way: dsl resumes it from its "
           "checkpoints"),
    ],
    "WarmupCosineLR": [
        _k("total_num_steps", "mapped", NO_DEFAULT, "engine.scheduler.total_steps", "required by DeepSpeed"),
        _k("warmup_min_ratio", "mapped", 0.0, "engine.scheduler.warmup_min_ratio"),
        _k("warmup_num_steps", "mapped", 1000, "engine.scheduler.warmup_steps"),
        _k("cos_min_ratio", "mapped", 0.0001, "engine.scheduler.min_lr_ratio"),
        _k("warmup_type", "mapped", "log", "engine.scheduler.warmup_type", _WARMUP_TYPE),
        _k("last_batch_iteration", "default", -1, why="resuming a schedule mid-way: dsl resumes it from its "
           "checkpoints"),
    ],
}
"""DeepSpeed's scheduler parameters (lr_schedules.py constructors); any other key is refused, as
DeepSpeed's constructor refuses it (a TypeError there)."""

SCHEDULER_REFUSED = {
    "OneCycle": "OneCycle (cyclic lr and momentum) is not implemented; use WarmupCosineLR or WarmupDecayLR",
    "LRRangeTest": "LRRangeTest (an lr search) is not implemented; run `dsl launch` with a few lr values instead",
}

STRICT_SECTIONS = ("zero_optimization", "fp16", "bf16", "bfloat16", "zero_optimization.offload_optimizer",
                   "zero_optimization.offload_param", "torch_autocast", "data_types")
"""Sections whose unknown keys DeepSpeed 0.19.8 refuses (pydantic models with extra='forbid', or
read key by key and passed on as keyword arguments)."""

_BY_PATH = {key.parts: key for key in KEYS}


def find(parts: tuple[str, ...]) -> Key | None:
    """The table entry for a key path, or for the block that covers it."""
    if parts and parts[0] == "bfloat16":
        parts = ("bf16",) + parts[1:]
    for n in range(len(parts), 0, -1):
        key = _BY_PATH.get(parts[:n])
        if key is not None and (n == len(parts) or key.block):
            return key
    return None
