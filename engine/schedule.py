"""Learning-rate schedules: linear warm-up, then a cosine, linear or no decay to `min_lr_ratio * lr`.

Steps are counted from 1 (the first optimizer step is step 1, as in the progress lines):
- step <= warmup_steps: lr * step / warmup_steps (reaches the peak exactly at step warmup_steps),
- after that: cosine (or linear) from lr down to min_lr_ratio * lr, reached exactly at step
  total_steps; `constant` stays at lr,
- past total_steps: stays at min_lr_ratio * lr.
`from_config(SchedulerConfig, lr, total_steps)` builds the one the `engine.scheduler` block names.
Pure Python (no torch), so it is cheap to call every step and easy to test.

DeepSpeed's schedulers (types WarmupLR, WarmupDecayLR, WarmupCosineLR; what engine.deepspeed_config
maps a DeepSpeed `scheduler` block to) follow deepspeed/runtime/lr_schedules.py of DeepSpeed 0.19.8
expression for expression, including its step timing: the scheduler starts at
`last_batch_iteration = -1`, sets the lr of the first optimizer step from that, and is stepped
after each applied update, so update k (1-based) runs with the lr of iteration k - 2 (the first
two updates both run at warmup_min_lr, or at 0 for WarmupCosineLR). An fp16 step skipped for
overflow does not step DeepSpeed's scheduler; these schedules say so with `follows_updates`, and
the engine then asks for the lr of (applied updates + 1) instead of the step count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dsl.engine.config import SchedulerConfig

__all__ = ["WarmupCosine", "WarmupLinear", "WarmupConstant", "DeepSpeedWarmupLR", "DeepSpeedWarmupDecayLR",
           "DeepSpeedWarmupCosineLR", "DEEPSPEED_TYPES", "from_config"]


@dataclass(frozen=True)
class WarmupCosine:
    """`schedule(step) -> lr` for 1-based optimizer steps."""

    lr: float
    """Peak learning rate."""
    warmup_steps: int
    """Steps of linear warm-up."""
    total_steps: int
    """Step at which the decay reaches min_lr_ratio * lr."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr."""

    def _decay(self, progress: float) -> float:
        """Fraction of (lr - min_lr) left at `progress` in [0, 1] of the decay."""
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def __call__(self, step: int) -> float:
        if step < 1:
            raise ValueError(f"steps count from 1, got step {step}")
        if step <= self.warmup_steps:
            return self.lr * step / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps
        if decay_steps <= 0:
            return self.lr
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        min_lr = self.min_lr_ratio * self.lr
        return min_lr + (self.lr - min_lr) * self._decay(progress)


@dataclass(frozen=True)
class WarmupLinear(WarmupCosine):
    """Linear warm-up, then a straight line down to min_lr_ratio * lr at total_steps."""

    def _decay(self, progress: float) -> float:
        return 1.0 - progress


@dataclass(frozen=True)
class WarmupConstant(WarmupCosine):
    """Linear warm-up, then lr for ever (min_lr_ratio is unused)."""

    def _decay(self, progress: float) -> float:
        return 1.0


@dataclass(frozen=True)
class DeepSpeedWarmupLR:
    """DeepSpeed's WarmupLR: from warmup_min_lr to lr over warmup_num_steps (log or linear), then lr."""

    lr: float
    """warmup_max_lr (the peak)."""
    warmup_num_steps: int
    warmup_min_lr: float = 0.0
    warmup_type: str = "log"
    total_num_steps: int = 0
    """WarmupDecayLR only."""

    follows_updates = True
    """The engine passes (applied updates + 1), not the step count: DeepSpeed steps its scheduler
    only after an update that was applied."""

    def _warmup(self) -> int:
        return max(2, self.warmup_num_steps)

    def _gamma(self, it: int) -> float:
        warmup = self._warmup()
        if it < warmup:
            if self.warmup_type == "log":
                return (1.0 / math.log(warmup)) * math.log(it + 1)
            return it / warmup
        return 1.0

    def __call__(self, step: int) -> float:
        if step < 1:
            raise ValueError(f"steps count from 1, got step {step}")
        it = step - 2  # DeepSpeed's last_batch_iteration when update `step` runs
        if it < 0:
            return self.warmup_min_lr
        return self.warmup_min_lr + ((self.lr - self.warmup_min_lr) * self._gamma(it))


@dataclass(frozen=True)
class DeepSpeedWarmupDecayLR(DeepSpeedWarmupLR):
    """DeepSpeed's WarmupDecayLR: WarmupLR's warm-up, then linear from lr down to warmup_min_lr
    at total_num_steps."""

    def _gamma(self, it: int) -> float:
        warmup = self._warmup()
        if it < warmup:
            return super()._gamma(it)
        return max(0.0, float(self.total_num_steps - it) / float(max(1.0, self.total_num_steps - warmup)))


@dataclass(frozen=True)
class DeepSpeedWarmupCosineLR:
    """DeepSpeed's WarmupCosineLR: from warmup_min_ratio x lr to lr over warmup_num_steps, then a
    cosine down to cos_min_ratio x lr at total_num_steps (lr is the optimizer's)."""

    lr: float
    warmup_num_steps: int
    total_num_steps: int
    warmup_min_ratio: float = 0.0
    cos_min_ratio: float = 0.0001
    warmup_type: str = "log"

    follows_updates = True

    def ratio(self, it: int) -> float:
        warmup = max(2, self.warmup_num_steps)
        if it < warmup:
            if self.warmup_type == "log":
                ratio = (1.0 / math.log(warmup)) * math.log(it + 1)
            else:
                ratio = it / warmup
            return self.warmup_min_ratio + ratio * (1. - self.warmup_min_ratio)
        real_last_step = it - warmup + 1
        real_total_steps = max(1, self.total_num_steps - warmup)
        cosine_progress = min(1.0, real_last_step / real_total_steps)
        ratio = (1 + math.cos(math.pi * cosine_progress)) / 2
        return max(0.0, self.cos_min_ratio + (1. - self.cos_min_ratio) * ratio)

    def __call__(self, step: int) -> float:
        if step < 1:
            raise ValueError(f"steps count from 1, got step {step}")
        it = step - 2
        if it < 0:
            return 0.0
        return self.lr * self.ratio(it)


DEEPSPEED_TYPES = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")
"""SchedulerConfig types that are DeepSpeed's schedulers."""


def from_config(cfg: SchedulerConfig, lr: float, total_steps: int | None) -> WarmupCosine | DeepSpeedWarmupLR | DeepSpeedWarmupCosineLR:
    """The schedule of an `engine.scheduler` block for a run of `total_steps` optimizer steps (the
    DeepSpeed types take their own total_steps when set; WarmupLR needs none)."""
    if cfg.type in DEEPSPEED_TYPES:
        total = cfg.total_steps if cfg.total_steps is not None else total_steps
        if total is None and cfg.type != "WarmupLR":
            raise ValueError(f"scheduler {cfg.type} needs total_steps (DeepSpeed's total_num_steps) or the run's length")
        if cfg.type == "WarmupCosineLR":
            return DeepSpeedWarmupCosineLR(lr=lr, warmup_num_steps=cfg.warmup_steps, total_num_steps=int(total or 0),
                                           warmup_min_ratio=cfg.warmup_min_ratio, cos_min_ratio=cfg.min_lr_ratio,
                                           warmup_type=cfg.warmup_type)
        kind = DeepSpeedWarmupDecayLR if cfg.type == "WarmupDecayLR" else DeepSpeedWarmupLR
        return kind(lr=lr, warmup_num_steps=cfg.warmup_steps, warmup_min_lr=cfg.warmup_min_lr,
                    warmup_type=cfg.warmup_type, total_num_steps=int(total or 0))
    if total_steps is None:
        raise ValueError(f"scheduler {cfg.type} needs the run's total_steps")
    kind = {"cosine": WarmupCosine, "linear": WarmupLinear, "constant": WarmupConstant}[cfg.type]
    return kind(lr=lr, warmup_steps=cfg.warmup_steps, total_steps=total_steps, min_lr_ratio=cfg.min_lr_ratio)
