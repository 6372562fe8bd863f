"""Learning-rate schedule: linear warm-up, then cosine decay to `min_lr_ratio * lr`.

Steps are counted from 1 (the first optimizer step is step 1, as in the progress lines):
- step <= warmup_steps: lr * step / warmup_steps (reaches the peak exactly at step warmup_steps),
- after that: cosine from lr down to min_lr_ratio * lr, reached exactly at step total_steps,
- past total_steps: stays at min_lr_ratio * lr.
Pure Python (no torch), so it is cheap to call every step and easy to test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["WarmupCosine"]


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
        return min_lr + (self.lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
