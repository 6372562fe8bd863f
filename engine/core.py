"""The engine: `initialize(model, config) -> Engine`; the step around the ZeRO stages.

Usage, in plain PyTorch style::

    engine = initialize(model, {"zero_stage": 2, "grad_accum": 2}, total_steps=1000)
    for step in range(1, 1001):
        for micro_step in range(engine.grad_accum):
            loss = engine(tokens, targets)      # = engine.module(...) under engine.autocast()
            loss.backward()                     # mean loss of this micro-batch
        engine.step()                           # = engine.optimizer.step()
        engine.zero_grad()
        if step % 100 == 0:
            engine.save_checkpoint(out / "checkpoints", step=step, keep=3)

What the engine owns (one module each):
- zero/stage{0,1,2,3}.py: where parameters, gradients and optimizer states live and the
  gradient/parameter collectives (each docstring states its communication plan);
- offload.py: where optimizer states live and the update runs (device, CPU, NVMe);
- optim.py: the AdamW / SGD update on flat pieces; precision.py: autocast, loss scaling;
- checkpoint.py: the rank-count- and stage-independent checkpoint format; schedule.py: lr.

`engine.step()`:
1. the stage waits for this step's gradient communication (`finish`); it refuses a number of
   backward passes other than `grad_accum`;
2. the global gradient norm: each rank's sum of squares of its gradient partition; at stages 1-3
   one `all_reduce(SUM)` of [sum of squares, overflow flag] (the flag: this rank's partition
   holds inf/nan); stage 0 needs none (every rank holds the same full gradient, so inf/nan
   reached every rank through the all_reduce);
3. fp16 with an overflow: the step is skipped on every rank (parameters and optimizer states
   unchanged, `last_step_skipped` True), gradients are zeroed, the loss scale updated;
4. otherwise one pass multiplies the gradients by (1 / loss scale) x clip coefficient
   (`grad_clip / (norm + 1e-6)`, capped at 1, as `torch.nn.utils.clip_grad_norm_`), the lr is
   set from the schedule, the optimizer updates this rank's partition, and the stage makes the
   parameters current on every rank (`after_update`).

`global_step` counts `step()` calls (skipped ones too; the schedule follows it, as the trainer's
step counter does); `optimizer_steps` counts applied updates (Adam's bias correction follows it,
and DeepSpeed's schedulers, which DeepSpeed steps only after an applied update: a schedule with
`follows_updates`, engine/schedule.py, gets applied updates + 1).

Gradient accumulation: stages 0 and 1 communicate only during the last micro-step's backward;
stages 2 and 3 reduce-scatter during every backward into the partitioned accumulator (keeping
no full gradient is their purpose). `engine.is_accumulation_boundary` tells whether the next
backward is the last of the step.

`zero_stage: auto` and `offload.optimizer: auto` reaching the engine (the planner did not
resolve them) run as stage 0 and no offload.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from dsl.engine import checkpoint, core_state, cpu_alloc, dist, precision, transfer
from dsl.engine.config import EngineConfig
from dsl.engine.core_config import _deepspeed, _hidden_size, _validate, device_notes  # noqa: F401 (re-exported)
from dsl.engine.errors import UserError
from dsl.engine.compile import apply as compile_blocks
from dsl.engine.long import setup as long_setup
from dsl.engine.offload import build_states
from dsl.engine.optim import Hyper
from dsl.engine.zero import build_stage
from dsl.engine.zero.base import named_trainable

__all__ = ["initialize", "Engine", "EngineOptimizer", "seed_everything"]

log = logging.getLogger(__name__)

_MIB = 1 << 20


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python's `random` and numpy (when installed) with `seed`."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(seed % (1 << 32))


def local_grad_stats(grads: torch.Tensor) -> torch.Tensor:
    """[sum of squares, 0.0] of this rank's gradient `grads` (any float dtype, 1-D), fp32 on
    grads' device: the buffer the engine all-reduces (the 0 is the inf/nan flag's slot)."""
    if grads.numel():
        local = torch.linalg.vector_norm(grads, dtype=torch.float32)
    else:
        local = torch.zeros((), dtype=torch.float32, device=grads.device)
    return torch.stack([local * local, torch.zeros_like(local)])


def mark_nonfinite(stats: torch.Tensor, grads: torch.Tensor) -> None:
    """Set the flag slot of `stats` (from local_grad_stats) to 1.0 when `grads` holds inf/nan."""
    stats[1] = (~torch.isfinite(grads)).any().to(stats.dtype)


class EngineOptimizer:
    """`engine.optimizer`: a torch-optimizer-shaped handle whose `step()` is the whole engine
    step (gradient wait, clipping, loss scale, update, parameter all_gather) and whose
    `zero_grad()` is `engine.zero_grad()`. `param_groups` show the lr and weight decay in use
    (decay: matrices and embeddings; no decay: gains and biases)."""

    def __init__(self, engine: "Engine", params: list[nn.Parameter], lr: float, weight_decay: float) -> None:
        self._engine = engine
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        self.param_groups = [
            g
            for g in (
                {"params": decay, "lr": lr, "weight_decay": weight_decay},
                {"params": no_decay, "lr": lr, "weight_decay": 0.0},
            )
            if g["params"]
        ]

    def step(self, closure: Callable[[], Any] | None = None) -> None:
        if closure is not None:
            raise UserError("engine.optimizer.step() takes no closure")
        self._engine.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._engine.zero_grad()

    def _set_lr(self, lr: float) -> None:
        for g in self.param_groups:
            g["lr"] = lr


class Engine:
    """A model, its ZeRO stage, optimizer states and precision policy. Build it with `initialize`."""

    def __init__(
        self,
        model: nn.Module,
        config: EngineConfig,
        *,
        lr: float,
        weight_decay: float,
        schedule: Callable[[int], float] | None,
        device: torch.device | None = None,
    ) -> None:
        if getattr(model, "_dsl_engine_attached", False):
            # Its gradient hooks would fire for both engines and count every backward twice.
            raise UserError("this model is already wrapped by an engine; build a new model")
        ctx = dist.current()
        self.config = config
        self.rank = ctx.rank
        self.world_size = ctx.world_size
        self.device = device if device is not None else ctx.device
        dist.use_device(self.device)
        precision.apply_tf32(config, self.device)
        if device is None and ctx.backend is None:
            log.info("single process (no RANK/WORLD_SIZE from torchrun or dsl launch): training on %s%s",
                     self.device, "" if self.device.type == "cuda" else " (torch sees no CUDA device)")
        self.grad_accum = config.grad_accum
        self.base_lr = lr
        self.schedule = schedule
        self.global_step = 0
        """`step()` calls so far (skipped fp16 steps included)."""
        self.optimizer_steps = 0
        self._deepspeed_loop = False
        """Set by `backward()`: the script calls DeepSpeed's API, so `step()` follows DeepSpeed's
        semantics (a no-op before the accumulation boundary, gradients zeroed after)."""
        """Updates applied so far."""
        self.skipped_steps = 0
        """fp16 steps skipped because of an overflow."""
        self.last_step_skipped = False
        self.cpu_allocator, alloc_notes = cpu_alloc.effective(config.cpu_allocator, self.device.type == "cpu")
        """What this process's malloc does on a CPU device: jemalloc, reuse, system, return
        (engine/cpu_alloc.py); "none" on a GPU."""
        self.cpu_allocator_reuse = self.cpu_allocator == "reuse"
        """True when this process's malloc keeps freed blocks (glibc, engine/cpu_alloc.py)."""
        self.cpu_allocator_return = self.cpu_allocator == "return"
        """True when this process's malloc returns every freed block of 1 MiB or more."""
        self.module = model.to(self.device)
        named = named_trainable(self.module)
        if not named:
            raise UserError("the model has no trainable parameters")
        not_float = sorted({str(p.dtype) for _, p in named if not p.is_floating_point()})
        if not_float:
            raise UserError(f"trainable parameters must be floating point, found {not_float}")
        dtype = precision.param_dtype(config)
        stage = 0 if config.zero_stage == "auto" else int(config.zero_stage)
        if self.world_size > 1:
            with torch.no_grad():
                for name, t in [*self.module.named_parameters(), *self.module.named_buffers()]:
                    if not (isinstance(t, nn.Parameter) and t.requires_grad):
                        tdist.broadcast(t.data, src=0)
        # Long context (engine/long/): SP/DP groups (collective), tiled loss/MLP, checkpoint offload.
        self.groups = long_setup.apply(self.module, config, world_size=self.world_size, rank=self.rank)
        """This rank's place in the dp x sp grid; ZeRO below shards over all dp x sp ranks."""
        self.compiled = compile_blocks(self.module, config, self.device)
        """Names of the blocks whose forward runs under torch.compile (engine/compile.py)."""
        work_dtype = precision.work_dtype(config) if stage == 3 else None
        stage_dtype = precision.stage_param_dtype(config, stage)
        offload = "none" if config.offload.optimizer == "auto" else config.offload.optimizer
        pinned = config.offload.pin_memory and transfer.use_pinned(self.device)
        if (work_dtype is not None or stage_dtype is not None) and hasattr(self.module, "residual_dtype"):
            # 16-bit parameters (stage 3's working copy, or the master layout's parameters at
            # stages 0-2): keep the embedding's output, the residual stream, fp32 (precision.py).
            self.module.residual_dtype = torch.float32
        self.stage = build_stage(
            stage,
            self.module,
            named,
            bucket_bytes=max(1, int(config.bucket_mib * _MIB)),
            grad_accum=config.grad_accum,
            world_size=self.world_size,
            rank=self.rank,
            dtype=dtype,
            device=self.device,
            work_dtype=work_dtype,
            compute_dtype=stage_dtype,
            # Optimizer offload: the master partition and (stages 2-3) the gradient partition live
            # in host memory, where the CPU optimizer reads them, or through which the NVMe one
            # streams them (zero/base.py); the device keeps only what the model computes with.
            host_states=offload in ("cpu", "nvme") and config.offload.ratio >= 1.0,
            pinned=pinned,
            stage3=dict(params_offload=config.offload.params, nvme_path=config.offload.nvme_path,
                        gather=config.stage3.gather, max_live_params=config.stage3.max_live_params,
                        prefetch_params=config.stage3.prefetch_params,
                        chunk_numel=max(1, int(config.offload.sub_group_mib * _MIB) // 4)),
        )
        self.reducer = self.stage
        """The same object as `stage` (the first engine's name for it)."""
        if config.comm.quantize_gradients and stage in (2, 3):  # int8 reduce-scatter (ZeRO++ qgZ)
            self.stage.quantize_block_numel = config.comm.quantize_block_numel
        if config.comm.reduce_dtype == "bf16":  # gradients cross the wire in bf16 (zero/base.py wire)
            self.stage.reduce_dtype = torch.bfloat16
        opt = config.optimizer
        self.hyper = Hyper(opt.type, tuple(opt.betas), opt.eps, weight_decay, opt.momentum)
        if opt.type == "onebit_adam":  # 1-bit Adam (engine/onebit.py), stage 0 only
            from dsl.engine.onebit import OnebitAdamStates

            self.states = OnebitAdamStates(self.stage, self.hyper, freeze_step=opt.freeze_step,
                                           applied_steps=lambda: self.optimizer_steps, device=self.device)
        else:
            self.states = build_states(
                self.stage, self.hyper, offload=offload, dtype=dtype, device=self.device,
                sub_group_mib=config.offload.sub_group_mib, nvme_path=config.offload.nvme_path,
                pin_memory=config.offload.pin_memory, ratio=config.offload.ratio,
            )  # fmt: skip
            if offload == "nvme" and hasattr(self.stage, "drop_master"):
                # ZeRO-Infinity: the optimizer's files are the only fp32 master (zero/stage3.py).
                self.stage.drop_master(self.states)
        for note in device_notes(config, self.device) + alloc_notes + getattr(self.stage, "notes", []):
            log.warning("%s", note)
        self.scaler = precision.LossScaler(config.loss_scale) if config.precision == "fp16" else None
        self.optimizer = EngineOptimizer(self, [p for _, p in named], lr, weight_decay)
        self._last_grad_norm: float | None = None
        self._lr = lr
        self._refresh_lr()
        # Activation accounting and fp16 loss scaling at the module boundary, so that both
        # engine(...) and engine.module(...) are covered.
        self.measure_activations = False
        """Count the bytes autograd saves during each forward (for `state_summary()`). Off by
        default: it runs a Python hook on every saved tensor of every forward. `state_summary()`
        turns it on, so forwards after the first summary are measured."""
        self._activation_bytes = 0
        self._act_ctx: Any = None
        self._act_seen: dict[int, int] = {}
        self._param_storages = self._collect_param_storages()
        self._module_hooks = [
            self.module.register_forward_pre_hook(self._before_forward),
            self.module.register_forward_hook(self._after_forward, always_call=True),
        ]
        model._dsl_engine_attached = True

    def _collect_param_storages(self) -> set[int]:
        ids = {p.untyped_storage()._cdata for p in self.module.parameters()}
        ids |= {b.untyped_storage()._cdata for b in self.module.buffers()}
        extra = getattr(self.stage, "param_storages", None)
        return ids | (extra() if extra is not None else set())

    # Forward -----------------------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16/fp16: autocast the forward (parameters and gradients keep their dtype). fp32: no-op."""
        return precision.autocast(self.config, self.device)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """`module(*args, **kwargs)` under `autocast()`."""
        with self.autocast():
            return self.module(*args, **kwargs)

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        if not self.measure_activations or self._act_ctx is not None:  # off, or a nested call
            return
        seen: dict[int, int] = {}
        params = self._param_storages

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            key = storage._cdata
            if key not in params and key not in seen:
                seen[key] = storage.nbytes()
            return t

        self._act_seen = seen
        self._act_ctx = saved_tensors_hooks(pack, lambda t: t)
        self._act_ctx.__enter__()

    def _after_forward(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self._act_ctx is not None:
            self._act_ctx.__exit__(None, None, None)
            self._act_ctx = None
            self._activation_bytes = sum(self._act_seen.values())
        if self.scaler is not None and output is not None and torch.is_grad_enabled():
            return precision.scale_outputs(output, self.scaler.scale)
        return output

    # Step --------------------------------------------------------------------------------

    @property
    def is_accumulation_boundary(self) -> bool:
        """True when the next `loss.backward()` is the last micro-step of the step."""
        return self.stage.is_boundary

    @property
    def micro_step(self) -> int:
        """Backward passes since the last `step()`."""
        return self.stage.micro_step

    def _refresh_lr(self) -> None:
        """lr of step `global_step` (of step 1 before any step); a DeepSpeed schedule
        (`follows_updates`) gets the number of the update about to run instead."""
        if self.schedule is not None:
            if getattr(self.schedule, "follows_updates", False):
                self._lr = self.schedule(self.optimizer_steps + 1)
            else:
                self._lr = self.schedule(max(1, self.global_step))
        else:
            self._lr = self.base_lr
        self.optimizer._set_lr(self._lr)

    def _grad_stats(self, grads: torch.Tensor) -> tuple[float, bool]:
        """(global sum of squares, any rank has inf/nan) of the gradient (scaled at fp16).

        The same tensor math at every world size (the all_reduce alone is skipped where it is not
        needed), so a device mix-up shows in a one-process test too (tests/unit/test_meta_device.py).
        """
        stats = local_grad_stats(grads)
        if not math.isfinite(transfer.host_floats(stats[0])[0]):
            # A non-finite norm can also come from huge finite values; the flag is for inf/nan.
            mark_nonfinite(stats, grads)
        if self.stage.partitioned and self.world_size > 1:
            tdist.all_reduce(stats, op=tdist.ReduceOp.SUM)
        sumsq, flag = transfer.host_floats(stats)
        return sumsq, flag > 0

    def backward(self, loss: torch.Tensor, **_ignored: Any) -> torch.Tensor:
        """DeepSpeed's `engine.backward(loss)`: `loss.backward()`. The engine already averages
        gradients over grad_accum and the ranks (DeepSpeed scales the loss by 1/grad_accum for
        the same effect). A script that calls it gets DeepSpeed's `step()` as well: called after
        every micro-batch, it updates only at the accumulation boundary and zeroes the gradients
        itself, so a DeepSpeed training loop runs unchanged."""
        self._deepspeed_loop = True
        loss.backward()
        return loss

    def is_gradient_accumulation_boundary(self) -> bool:
        """DeepSpeed's name for `is_accumulation_boundary`."""
        return self.is_accumulation_boundary

    def step(self) -> None:
        """Wait for the averaged gradients, check overflow, clip and unscale, set the lr, update
        this rank's partition and bring every rank's parameters up to date. After `backward()`
        (DeepSpeed's API) it is DeepSpeed's step: nothing before the accumulation boundary, and
        the gradients are zeroed after the update."""
        if self._deepspeed_loop:
            if self.stage.micro_step < self.grad_accum:
                return
            self._step()
            self.stage.zero_grad()
            return
        self._step()

    def _step(self) -> None:
        self.stage.finish()
        grads = self.stage.grad_flat
        sumsq, overflow = self._grad_stats(grads)
        self.global_step += 1
        self._refresh_lr()
        scale = self.scaler.scale if self.scaler is not None else 1.0
        if self.scaler is not None and overflow:
            self.scaler.update(True)
            self.skipped_steps += 1
            self.last_step_skipped = True
            self._last_grad_norm = math.inf
            self.stage.zero_grad()
            log.info("step %d skipped: fp16 gradient overflow; loss scale now %g",
                     self.global_step, self.scaler.scale)
            return
        norm = math.sqrt(sumsq) / scale
        self._last_grad_norm = norm
        coef = 1.0 / scale
        if self.config.grad_clip is not None:
            coef *= min(1.0, self.config.grad_clip / (norm + 1e-6))
        if coef != 1.0:
            grads.mul_(coef)
        self.optimizer_steps += 1
        # One seed on every rank: at stage 0 each rank updates the same replicated values, and
        # stochastic rounding (low_precision_states) must round them identically.
        self.states.step(grads, step=self.optimizer_steps, lr=self._lr, seed=0)
        self.stage.after_update()
        self.last_step_skipped = False
        if self.scaler is not None:
            self.scaler.update(False)

    def zero_grad(self) -> None:
        """Zero the gradients in place (stages 0-1: gradients stay views of the buckets)."""
        self.stage.zero_grad()

    @property
    def last_grad_norm(self) -> float | None:
        """Global gradient norm (unscaled, before clipping) of the last `step()`; inf when it
        was skipped for an fp16 overflow."""
        return self._last_grad_norm

    @property
    def lr(self) -> float:
        """Learning rate of the last step (of the first step before any)."""
        return self._lr

    @property
    def loss_scale(self) -> float:
        """The fp16 loss scale in use (1.0 without fp16)."""
        return self.scaler.scale if self.scaler is not None else 1.0

    # Checkpoints -------------------------------------------------------------------------

    def save_checkpoint(
        self, directory: str | Path, *, step: int, extra: dict[str, Any] | None = None, keep: int | None = None
    ) -> Path:
        """Write `directory/step-NNNNNN/` atomically and point `directory/latest` at it; keep the
        newest `keep` checkpoints. Collective: call on every rank. See checkpoint.py."""
        return checkpoint.save(self, directory, step=step, extra=extra, keep=keep)

    def load_checkpoint(self, directory: str | Path) -> dict[str, Any]:
        """Restore the checkpoint `directory/latest` names (any world size or stage); returns its
        `extra` plus "step". Collective."""
        return checkpoint.load(self, directory)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full trainable parameters by name on every rank (gathers at stages 1-3). Collective."""
        return checkpoint.gather_full(self, optimizer=False)[0]

    # Accounting --------------------------------------------------------------------------

    state_summary = core_state.state_summary

    def close(self) -> None:
        """Remove the engine's hooks and delete offload files. The engine is unusable after."""
        for h in self._module_hooks:
            h.remove()
        self._module_hooks.clear()
        self.stage.close()
        self.states.close()


def initialize(
    model: nn.Module,
    config: EngineConfig | Mapping[str, Any] | None = None,
    *,
    lr: float | None = None,
    weight_decay: float | None = None,
    schedule: Callable[[int], float] | None = None,
    total_steps: int | None = None,
    device: torch.device | str | None = None,
) -> Engine:
    """Wrap `model` for training with `config` (an EngineConfig or the `engine:` mapping).

    A DeepSpeed config works too, as in a spec: `{"deepspeed_config": "ds.json"}` (a path or a
    dict, with engine settings next to it that override it), or the DeepSpeed dict itself
    (`config=ds_config`); see engine/dsconfig.py. Its `auto` values take dsl's defaults (or the
    settings next to it), total_num_steps: auto takes `total_steps`, and DeepSpeed's batch
    arithmetic runs on this process group's data-parallel size.

    lr and weight_decay default to `config.optimizer`. The lr schedule: `schedule(step) -> lr`
    for 1-based steps when given; else, with `total_steps`, the `config.scheduler` block
    (warm-up + cosine/linear/constant, schedule.from_config); a DeepSpeed scheduler
    (WarmupLR, or WarmupDecayLR / WarmupCosineLR with their total_num_steps) also without
    total_steps, as DeepSpeed runs it; else a constant lr.
    Uses the process group that exists (see `dist.setup`); without one it runs a single process.
    The device defaults to the rank's device (cuda:LOCAL_RANK with nccl, else cpu).
    Raises UserError for a config this version cannot run.
    """
    config = _validate(_deepspeed(config, model, total_steps), model)
    lr = config.optimizer.lr if lr is None else lr
    weight_decay = config.optimizer.weight_decay if weight_decay is None else weight_decay
    from dsl.engine.schedule import DEEPSPEED_TYPES, from_config

    deepspeed_schedule = config.scheduler.type in DEEPSPEED_TYPES and (
        config.scheduler.type == "WarmupLR" or config.scheduler.total_steps is not None)
    if schedule is None and (total_steps is not None or deepspeed_schedule):
        schedule = from_config(config.scheduler, lr, total_steps)
    return Engine(
        model,
        config,
        lr=lr,
        weight_decay=weight_decay,
        schedule=schedule,
        device=torch.device(device) if device is not None else None,
    )
