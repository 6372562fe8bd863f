"""The engine: `initialize(model, config) -> Engine`, ZeRO stage 0 (data parallel, DDP-style).

Usage, in plain PyTorch style::

    engine = initialize(model, EngineConfig(grad_accum=2), lr=3e-3, schedule=WarmupCosine(...))
    for step in range(steps):
        for micro_step in range(engine.grad_accum):
            loss = engine(tokens, targets)      # forward under engine.autocast()
            loss.backward()                     # mean loss of this micro-batch
        engine.step()                           # wait for gradients, clip, lr, optimizer step
        engine.zero_grad()

Stage 0 keeps everything replicated: every rank holds all parameters (fp32), all gradients
(fp32, in flat buckets) and all optimizer states. Only gradients are communicated.

Communication plan (stage 0)
----------------------------
- At `initialize`: `broadcast` of every parameter and buffer from rank 0, so all ranks start from
  identical weights even if their seeds differ (as DDP does).
- During the backward of the *last* micro-step of an optimizer step (the accumulation boundary):
  the gradients live in flat fp32 buckets of at most `bucket_mib` (each `param.grad` is a view
  into its bucket, so no copies are made). A post-accumulate-grad hook counts the parameters of
  each bucket whose gradient is final; when a bucket is complete it is divided by
  `world_size * grad_accum` and an asynchronous `all_reduce(SUM)` is launched on it at once, so
  communication overlaps the rest of the backward. Buckets follow the reverse parameter order
  (roughly the order in which backward produces gradients) and are launched strictly in index
  order, so every rank issues the same collectives in the same order. At the end of the backward
  an autograd callback launches any bucket still incomplete (a parameter that got no gradient
  contributes zeros).
- On the other micro-steps: no communication; autograd accumulates into the bucket views.
- At `step()`: wait for every bucket's all_reduce; then the gradients are the mean over ranks and
  micro-steps of the per-micro-batch mean loss. Clipping and the optimizer need no further
  communication because every rank holds the same full gradient.
- world_size 1 runs exactly this path; only the all_reduce is skipped.

Gradient accumulation: the engine counts backward passes (an autograd end-of-backward callback
counts one per `loss.backward()`). The `grad_accum`-th backward since the last `step()` is the
boundary; `step()` refuses to run after any other number of backward passes, and an extra
backward before `step()` is refused too, so a loop that does not match `grad_accum` fails loudly
instead of silently averaging the wrong gradients. `engine.is_accumulation_boundary` tells
whether the next backward is the boundary.

Later stages (ZeRO 1-3, fp16 loss scaling, offload) replace `BucketedAllReduce` by reducers that
reduce-scatter the same buckets; the Engine around it (optimizer, clipping, schedule, autocast,
accounting) stays.

`zero_stage: auto` runs as stage 0, the only stage of this version.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as tdist
from pydantic import ValidationError
from torch import nn
from torch.autograd import Variable

from dsl.engine import dist
from dsl.engine.config import EngineConfig, unsupported_reason
from dsl.engine.errors import UserError

__all__ = ["initialize", "Engine", "BucketedAllReduce"]

log = logging.getLogger(__name__)

_MIB = 1 << 20


class _Bucket:
    """A flat gradient buffer shared by consecutive parameters (views into it are their .grad)."""

    def __init__(self, index: int, params: list[nn.Parameter]) -> None:
        self.index = index
        self.params = params
        first = params[0]
        self.flat = torch.zeros(
            sum(p.numel() for p in params), dtype=first.dtype, device=first.device
        )
        self.views: list[torch.Tensor] = []
        offset = 0
        for p in params:
            self.views.append(self.flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        self.pending = len(params)
        self.work: Any = None  # torch.distributed Work of the in-flight all_reduce


class BucketedAllReduce:
    """Stage-0 gradient reducer: bucketed, overlapped all_reduce on the accumulation boundary.

    Owns the gradient memory: `param.grad` of every trainable parameter is a view into a bucket.
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        *,
        bucket_bytes: int,
        grad_accum: int,
        world_size: int,
    ) -> None:
        self.grad_accum = grad_accum
        self.world_size = world_size
        self.buckets = self._make_buckets(list(reversed(params)), bucket_bytes)
        self._slot: dict[int, tuple[_Bucket, torch.Tensor]] = {}
        for bucket in self.buckets:
            for p, view in zip(bucket.params, bucket.views):
                self._slot[id(p)] = (bucket, view)
                p.grad = view
        self.micro_step = 0
        """Backward passes since the last `step()`."""
        self.collectives_launched = 0
        """all_reduce calls issued so far (0 forever at world_size 1)."""
        self._in_backward = False
        self._next_launch = 0
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._on_grad_accumulated) for p in params
        ]

    @staticmethod
    def _make_buckets(params: list[nn.Parameter], bucket_bytes: int) -> list[_Bucket]:
        groups: list[list[nn.Parameter]] = []
        size = 0
        for p in params:
            nbytes = p.numel() * p.element_size()
            fits = groups and size + nbytes <= bucket_bytes
            last = groups[-1][0] if groups else None
            same_kind = last is not None and (last.dtype, last.device) == (p.dtype, p.device)
            if fits and same_kind:
                groups[-1].append(p)
                size += nbytes
            else:  # a parameter larger than a bucket gets a bucket of its own
                groups.append([p])
                size = nbytes
        return [_Bucket(i, group) for i, group in enumerate(groups)]

    @property
    def is_boundary(self) -> bool:
        """True while (or before) running the backward that completes the accumulation."""
        return self.micro_step == self.grad_accum - 1

    def _on_grad_accumulated(self, param: torch.Tensor) -> None:
        if not self._in_backward:
            if self.micro_step >= self.grad_accum:
                raise UserError(
                    f"backward pass {self.micro_step + 1} since the last engine.step(), but "
                    f"grad_accum is {self.grad_accum}: call engine.step() and engine.zero_grad() "
                    f"after every {self.grad_accum} backward passes"
                )
            self._in_backward = True
            Variable._execution_engine.queue_callback(self._on_backward_end)
        bucket, view = self._slot[id(param)]
        grad = param.grad
        if grad is None or grad.data_ptr() != view.data_ptr():
            # Someone replaced .grad (optimizer.zero_grad(set_to_none=True), a manual
            # assignment), so autograd stored a fresh tensor: bring it back into the bucket.
            if grad is None:
                view.zero_()
            else:
                view.copy_(grad)
            param.grad = view
        if self.is_boundary:
            bucket.pending -= 1
            if bucket.pending == 0:
                self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next_launch < len(self.buckets):
            bucket = self.buckets[self._next_launch]
            if bucket.pending:
                return
            self._launch(bucket)

    def _launch(self, bucket: _Bucket) -> None:
        divisor = self.world_size * self.grad_accum
        if divisor > 1:
            # Pre-divide: the SUM then yields the mean without a second pass over the buffer.
            bucket.flat.div_(divisor)
        if self.world_size > 1:
            bucket.work = tdist.all_reduce(bucket.flat, op=tdist.ReduceOp.SUM, async_op=True)
            self.collectives_launched += 1
        self._next_launch = bucket.index + 1

    def _on_backward_end(self) -> None:
        boundary = self.is_boundary
        self._in_backward = False
        self.micro_step += 1
        if boundary:
            # Buckets with parameters that received no gradient in this backward.
            for bucket in self.buckets[self._next_launch :]:
                self._launch(bucket)

    def finish(self) -> None:
        """Wait until every bucket holds the averaged gradient; call once per optimizer step."""
        if self.micro_step != self.grad_accum:
            raise UserError(
                f"engine.step() after {self.micro_step} backward passes, but grad_accum is "
                f"{self.grad_accum}: run loss.backward() once per micro-batch, "
                f"{self.grad_accum} times per step"
            )
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
            bucket.work = None
            bucket.pending = len(bucket.params)
        self._next_launch = 0
        self.micro_step = 0

    def zero_(self) -> None:
        for bucket in self.buckets:
            bucket.flat.zero_()
            for p, view in zip(bucket.params, bucket.views):
                if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                    p.grad = view

    def flats(self) -> list[torch.Tensor]:
        return [bucket.flat for bucket in self.buckets]

    def grads_bytes(self) -> int:
        return sum(b.flat.numel() * b.flat.element_size() for b in self.buckets)


def _make_optimizer(
    cfg: EngineConfig, params: list[nn.Parameter], *, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    # Decay matrices (linear weights, embeddings), not biases and norm gains (as GPT-2/nanoGPT).
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        g
        for g in (
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        )
        if g["params"]
    ]
    if cfg.optimizer.type == "adamw":
        # fused=True: one kernel over all tensors; works on CPU and CUDA (FACTS.md: ~6x faster
        # than the per-tensor loop on CPU).
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.optimizer.betas, eps=cfg.optimizer.eps, fused=True)
    # Plain SGD barely moves a transformer at these learning rates; momentum 0.9 is the usual.
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.optimizer.momentum)


class Engine:
    """A model, its optimizer and the stage-0 gradient reducer. Build it with `initialize`."""

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
        self.grad_accum = config.grad_accum
        self.base_lr = lr
        self.schedule = schedule
        self.global_step = 0
        """Optimizer steps taken."""
        self.module = model.to(self.device)
        params = [p for p in self.module.parameters() if p.requires_grad]
        if not params:
            raise UserError("the model has no trainable parameters")
        not_float = sorted({str(p.dtype) for p in params if not p.is_floating_point()})
        if not_float:
            raise UserError(f"trainable parameters must be floating point, found {not_float}")
        if self.world_size > 1:
            self._broadcast_from_rank0()
        self.reducer = BucketedAllReduce(
            params,
            bucket_bytes=max(1, int(config.bucket_mib * _MIB)),
            grad_accum=config.grad_accum,
            world_size=self.world_size,
        )
        self.optimizer = _make_optimizer(config, params, lr=lr, weight_decay=weight_decay)
        model._dsl_engine_attached = True
        self._last_grad_norm: torch.Tensor | None = None
        self._lr = schedule(1) if schedule is not None else lr

    def _broadcast_from_rank0(self) -> None:
        with torch.no_grad():
            for tensor in [*self.module.parameters(), *self.module.buffers()]:
                tdist.broadcast(tensor.data, src=0)

    # Forward -----------------------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16: autocast the forward (params and grads stay fp32). fp32: no-op."""
        if self.config.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """`module(*args, **kwargs)` under `autocast()`."""
        with self.autocast():
            return self.module(*args, **kwargs)

    # Step --------------------------------------------------------------------------------

    @property
    def is_accumulation_boundary(self) -> bool:
        """True when the next `loss.backward()` is the last micro-step (it communicates)."""
        return self.reducer.is_boundary

    @property
    def micro_step(self) -> int:
        """Backward passes since the last `step()`."""
        return self.reducer.micro_step

    def step(self) -> None:
        """Wait for the averaged gradients, clip them, set the lr and step the optimizer."""
        self.reducer.finish()
        self._last_grad_norm = self._clip_grads()
        step = self.global_step + 1
        self._lr = self.schedule(step) if self.schedule is not None else self.base_lr
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr
        self.optimizer.step()
        self.global_step = step

    def _clip_grads(self) -> torch.Tensor:
        """Global L2 norm of the gradients before clipping; scales them to `grad_clip` if above.

        Same rule as torch.nn.utils.clip_grad_norm_ (coefficient max_norm / (norm + 1e-6)), computed
        on the flat buckets: a handful of reductions instead of one per parameter.
        """
        flats = self.reducer.flats()
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(f) for f in flats]))
        if self.config.grad_clip is not None:
            coef = torch.clamp(self.config.grad_clip / (norm + 1e-6), max=1.0)
            for f in flats:
                f.mul_(coef)
        return norm

    def zero_grad(self) -> None:
        """Zero the gradient buckets in place (gradients stay views of them)."""
        self.reducer.zero_()

    @property
    def last_grad_norm(self) -> float | None:
        """Global gradient norm (before clipping) of the last `step()`."""
        return None if self._last_grad_norm is None else float(self._last_grad_norm)

    @property
    def lr(self) -> float:
        """Learning rate of the last step (of the first step before any)."""
        return self._lr

    # Accounting --------------------------------------------------------------------------

    def state_summary(self) -> dict[str, int]:
        """Bytes this rank holds for parameters, gradients and optimizer states.

        Optimizer states count once they exist (AdamW creates them at the first step).
        """
        params_bytes = sum(p.numel() * p.element_size() for p in self.module.parameters())
        states_bytes = sum(
            t.numel() * t.element_size()
            for state in self.optimizer.state.values()
            for t in state.values()
            if isinstance(t, torch.Tensor)
        )
        grads_bytes = self.reducer.grads_bytes()
        return {
            "params_bytes": params_bytes,
            "grads_bytes": grads_bytes,
            "optimizer_states_bytes": states_bytes,
            "total_bytes": params_bytes + grads_bytes + states_bytes,
        }


def initialize(
    model: nn.Module,
    config: EngineConfig | Mapping[str, Any] | None = None,
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    schedule: Callable[[int], float] | None = None,
    device: torch.device | str | None = None,
) -> Engine:
    """Wrap `model` for training with `config` (an EngineConfig or the `engine:` mapping).

    `schedule(step) -> lr` for 1-based steps (e.g. `schedule.WarmupCosine`); None keeps `lr`.
    Uses the process group that exists (see `dist.setup`); without one it runs a single process.
    The device defaults to the rank's device (cuda:LOCAL_RANK with nccl, else cpu).
    Raises UserError for a config this version cannot run.
    """
    if config is None:
        config = EngineConfig()
    elif not isinstance(config, EngineConfig):
        try:
            config = EngineConfig.model_validate(dict(config))
        except ValidationError as err:
            lines = [
                f"engine.{'.'.join(str(part) for part in e['loc'])}: {e['msg']}"
                for e in err.errors()
            ]
            raise UserError("invalid engine config:\n  " + "\n  ".join(lines)) from None
    reason = unsupported_reason(config)
    if reason is not None:
        raise UserError(reason)
    return Engine(
        model,
        config,
        lr=lr,
        weight_decay=weight_decay,
        schedule=schedule,
        device=torch.device(device) if device is not None else None,
    )
