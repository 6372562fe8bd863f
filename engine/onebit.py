"""1-bit Adam (Tang et al. 2021, DeepSpeed's OnebitAdam): the optimizer states and update of
`optimizer.type: onebit_adam`, at ZeRO stage 0 (engine/onebit_config.py says why only there).

Algorithm, with t the optimizer step (1-based) and F = `freeze_step`:

- warm-up, t <= F: plain AdamW (engine/optim.py's update, bias-corrected) on the gradient stage
  0 all-reduced in fp32 during backward: m <- b1 m + (1 - b1) g, v <- b2 v + (1 - b2) g^2.
  After step F every rank holds the same m and v.
- compression, t > F: the variance is frozen (v_hat = v / (1 - b2^F) from step F on) and stage 0
  no longer all-reduces gradients (`Stage0.grad_comm_off`): each rank's gradient g_r is its own
  (averaged over micro-steps only). Each rank sets m_r <- b1 m + (1 - b1) g_r, and
  m <- CompressedAllReduce(m_r) (ops/comm/allreduce.py: 1-bit signs with worker and server error
  feedback), which is ~ b1 m + (1 - b1) mean_r g_r, the momentum of the averaged gradient; the
  result is identical on every rank. Then p <- p (1 - lr wd) - lr (m / (1 - b1^t)) / (sqrt(v_hat) + eps).
  Bias correction is kept (DeepSpeed's OnebitAdam drops it) so the first compressed step
  continues AdamW's trajectory without a jump of sqrt(1 - b2^F).

Communication per step after warm-up: one compressed all-reduce of the momentum (N fp32 values,
padded to Np, blocks of B = 256 with one fp32 scale each): 2 (w - 1) (Np / w) (1/8 + 4/B) bytes
sent per rank, (Np / N) (1/32 + 1/B) = ~1/28.4 of the 2 (w - 1) / w 4N bytes of stage 0's fp32
ring all-reduce (1/28.4 for the tiny preset, whose 117,056 parameters pad to 117,248).
`comm_stats()` reports both counts (bytes sent by this rank, payload only) for warm-up and
compressed steps; the trainer writes them to metrics.jsonl.

Gradient clipping after warm-up uses this rank's local gradient norm (the global norm of the
averaged gradient would need the full-precision all-reduce that 1-bit Adam removes), so
`engine.last_grad_norm` is rank-local then. Checkpoints hold exp_avg and exp_avg_sq like AdamW
(same names); the error-feedback buffers start from zero after a load.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsl.engine.optim import Hyper, update
from dsl.engine.zero.base import ZeroStage, nbytes
from dsl.ops.comm.allreduce import CompressedAllReduce, fp32_allreduce_bytes, padded_numel

__all__ = ["OnebitAdamStates"]


class OnebitAdamStates:
    """exp_avg / exp_avg_sq over stage 0's flat parameters, with the 1-bit Adam update.

    Same interface as engine/offload.py's DeviceStates (`step`, `read`, `write`,
    `sync_from_params`, `memory`, `close`). `applied_steps()` returns the engine's count of
    applied updates; stage 0 asks it, through `grad_comm_off`, whether the next backward still
    all-reduces gradients (so a run resumed after freeze_step skips it from its first step).
    """

    kind = "none"
    names = ("exp_avg", "exp_avg_sq")

    def __init__(self, stage: ZeroStage, hyper: Hyper, *, freeze_step: int, applied_steps: Callable[[], int],
                 device: torch.device) -> None:
        if stage.stage != 0:
            raise ValueError(f"1-bit Adam runs at ZeRO stage 0, not {stage.stage}")
        self.stage = stage
        self.adam = Hyper("adamw", hyper.betas, hyper.eps, hyper.weight_decay, hyper.momentum)
        self.freeze_step = freeze_step
        self.params = stage.params_flat
        n = self.params.numel()
        if stage.layout.shard_numel != n:
            raise ValueError("stage 0's shard space must be its whole parameter buffer")
        self.allreduce = CompressedAllReduce()
        # exp_avg lives at the front of a buffer padded the way the all-reduce pads, so the
        # all-reduce compresses it in place without a padded copy; the tail is kept zero.
        padded = padded_numel(n, stage.world_size, self.allreduce.block)
        self._momentum = torch.zeros(padded, dtype=torch.float32, device=device)
        self.flats = {"exp_avg": self._momentum[:n],
                      "exp_avg_sq": torch.zeros(n, dtype=torch.float32, device=device)}
        segs = stage.layout.segments
        self._decay = [s.decay for s in segs]
        self._params = [stage.param_piece(s) for s in segs]
        self._states = {k: [f[s.shard_lo : s.shard_lo + s.numel] for s in segs] for k, f in self.flats.items()}
        self._decay_pieces = [p for p, d in zip(self._params, self._decay) if d]
        self._denom: torch.Tensor | None = None
        self.warmup_wire_bytes = 0
        """Bytes stage 0's fp32 gradient all-reduce sent during warm-up (ring count)."""
        self.compressed_steps = 0
        stage.grad_comm_off = lambda: applied_steps() >= freeze_step

    # The update ------------------------------------------------------------------------------

    def step(self, grad_flat: torch.Tensor, *, step: int, lr: float, seed: int = 0) -> None:
        """One update from grad_flat ([N]: all-reduced mean during warm-up, this rank's own after)."""
        if step <= self.freeze_step:
            grads = [grad_flat[s.full_lo : s.full_lo + s.numel] for s in self.stage.layout.segments]
            update(self.adam, self._params, grads, self._states, self._decay, step=step, lr=lr, seed=seed)
            self.warmup_wire_bytes += fp32_allreduce_bytes(grad_flat.numel(), self.stage.world_size)
            return
        b1, b2 = self.adam.betas
        m = self.flats["exp_avg"]
        m.lerp_(grad_flat, 1 - b1)  # this rank's momentum: b1 m + (1 - b1) g
        self.allreduce(self._momentum)  # ~ the momentum of the averaged gradient, on every rank
        self._momentum[m.numel() :].zero_()
        if self._denom is None:  # v frozen at step freeze_step
            v_hat = self.flats["exp_avg_sq"] / (1 - b2**self.freeze_step)
            self._denom = v_hat.sqrt_().add_(self.adam.eps)
        wd = self.adam.weight_decay
        with torch.no_grad():
            if wd:
                torch._foreach_mul_(self._decay_pieces, 1 - lr * wd)
            self.params.addcdiv_(m, self._denom, value=-lr / (1 - b1**step))
        self.compressed_steps += 1

    def comm_stats(self) -> dict[str, float]:
        """Bytes this rank sent for gradient/momentum exchange (payload; see the module docstring)."""
        ar = self.allreduce
        n, w = self.params.numel(), self.stage.world_size
        fp32 = fp32_allreduce_bytes(n, w)
        return {
            "onebit_warmup_bytes": self.warmup_wire_bytes,
            "onebit_compressed_bytes": ar.wire_bytes,
            "onebit_bytes_per_step": ar.last_wire_bytes if self.compressed_steps else fp32,
            "fp32_allreduce_bytes_per_step": fp32,
            "onebit_ratio": (ar.last_wire_bytes / fp32) if (self.compressed_steps and fp32) else 1.0,
        }

    # States for checkpoints ------------------------------------------------------------------

    def read(self, name: str) -> torch.Tensor:
        return self.flats[name]

    def write(self, name: str, flat: torch.Tensor) -> None:
        self.flats[name].copy_(flat)
        self._denom = None
        self.allreduce.reset()

    def sync_from_params(self) -> None:
        """Nothing: the parameters are the master weights."""

    def memory(self) -> dict[str, int]:
        states = nbytes(self._momentum) + nbytes(self.flats["exp_avg_sq"]) + nbytes(self._denom)
        states += self.allreduce.buffer_bytes()
        return {"optimizer_states_bytes": states, "offload_cpu_bytes": 0, "offload_nvme_bytes": 0}

    def close(self) -> None:
        self.stage.grad_comm_off = lambda: False
