"""Learning-rate schedules: linear warm-up, then a cosine, linear or no decay to `min_lr_ratio * lr`.

Steps are counted from 1 (the first optimizer step is step 1, as in the progress lines):
- step <= warmup_steps: lr * step / warmup_steps (reaches the peak exactly at step warmup_steps),
- after that: cosine (or linear) from lr down to min_lr_ratio * lr, reached exactly at step
  total_steps; `constant` stays at lr,
- past total_steps: stays at min_lr_ratio * lr.
`from_config(SchedulerConfig, lr, total_steps)` builds the one the `engine.scheduler` block names.
Pure Python (no torch), so it is cheap to call every step and easy to test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dsl.engine.config import SchedulerConfig

__all__ = ["WarmupCosine", "WarmupLinear", "WarmupConstant", "from_config"]


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


def from_config(cfg: SchedulerConfig, lr: float, total_steps: int) -> WarmupCosine:
    """The schedule of an `engine.scheduler` block for a run of `total_steps` optimizer steps."""
    kind = {"cosine": WarmupCosine, "linear": WarmupLinear, "constant": WarmupConstant}[cfg.type]
    return kind(lr=lr, warmup_steps=cfg.warmup_steps, total_steps=total_steps, min_lr_ratio=cfg.min_lr_ratio)
