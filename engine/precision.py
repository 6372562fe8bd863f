"""Mixed precision: autocast, fp16 dynamic loss scaling, and the dtypes of each state.

Policy (`EngineConfig.precision`, `low_precision_states`):

| precision | low_precision_states | master weights | parameters the model computes with | gradient buffers | optimizer states | forward |
|---|---|---|---|---|---|---|
| fp32 | false | fp32 (= the parameters) | fp32 | fp32 | fp32 | fp32 |
| bf16 | false | fp32 | stages 0-2: the fp32 master; stage 3: a bf16 copy | fp32 | fp32 | `torch.autocast(bfloat16)` |
| fp16 | false | fp32 | stages 0-2: the fp32 master; stage 3: an fp16 copy | fp32 (scaled) | fp32 | `torch.autocast(float16)` + loss scaling |
| bf16 | true | none | bf16 | bf16 | bf16 | `torch.autocast(bfloat16)` |

Stages 0-2 are autocast-style: the parameters the module holds are the fp32 master weights and
no low-precision copy of them is kept; autocast casts each weight to bf16/fp16 when an op uses it
(the cast is cached for the rest of that forward, and autograd keeps it for backward). There the
master weights need no extra bytes on top of the parameters; the price is a cast of every weight
in every forward, and stages 1-2 all-gather the updated partitions in fp32 (once per step).

Stage 3 gathers every unit's parameters twice per micro-step (forward and backward), so it keeps
a compute-dtype working copy of each rank's partition next to the fp32 master partition
(`work_dtype`, zero/stage3.py: +2 bytes per parameter / world size): the all-gathers move half the
bytes of fp32 (as DeepSpeed, whose model is converted to bf16/fp16, does) and autocast finds the
weights in its dtype already, so it casts (and saves) none. The copy is cast from the master
after every update and checkpoint load. The model's gradients then arrive in bf16/fp16 (a
matmul weight's already did through autocast's cast; norm gains and embeddings now do too) and
the stage copies them into fp32 buffers at once: without low_precision_states, gradients are
reduced, accumulated over micro-steps, clipped and applied in fp32 at every stage. Ops autocast keeps in fp32 (softmax, norms, the loss)
stay fp32. Ops that take their dtype from a parameter (an embedding lookup, a bias added by hand)
run in bf16/fp16 at stage 3, as under DeepSpeed; the bundled Llama casts its embedding output to
fp32 there (`Llama.residual_dtype`, set by the engine), so its residual stream stays fp32 at
every stage.

fp16 on CPU: torch 2.13's CPU autocast runs fp16 matmuls (measured), so fp16 is real fp16
compute. DeepSpeed refuses fp16 on CPU. fp16's 5-bit exponent underflows small activation
gradients, hence the loss scale: the engine multiplies the gradient flowing into the module's
outputs by `scale` (a `_ScaleGrad` node added by a forward hook on the module, equivalent to
`(loss * scale).backward()` while `loss` keeps its true value for logging). The gradient buffers
are fp32 and scaled (a stage-3 fp16 gradient that overflowed is inf there too); `engine.step()`
checks them for inf/nan (any rank; see core.py for the one collective), skips the step on
overflow, and otherwise unscales them in the same pass as clipping.

`LossScaler` follows DeepSpeed's dynamic loss scaler (`loss_scale_window` = growth_interval,
`delayed_shift` = hysteresis, consecutive_hysteresis false):
- start at 2**initial_scale_power;
- on an overflow the step is skipped; if fewer than `hysteresis` overflows remain tolerated the
  scale is halved (never below `min_scale`), else the tolerance counter decreases;
- a clean step that follows a positive multiple of `growth_interval` clean steps since the last
  overflow (or the start) doubles the scale and resets the tolerance: DeepSpeed's count
  (`stable_interval % scale_window == 0`), so the first doubling comes after growth_interval + 1
  clean steps and the next ones every growth_interval steps;
- `static`: a fixed scale; overflowing steps are still skipped.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.utils._pytree import tree_map

from dsl.engine.config import EngineConfig, LossScaleConfig, mixed_layout

__all__ = ["param_dtype", "compute_dtype", "work_dtype", "stage_param_dtype", "autocast", "LossScaler", "scale_outputs", "apply_tf32"]


def param_dtype(config: EngineConfig) -> torch.dtype:
    """dtype of parameters, gradients and optimizer states."""
    return torch.bfloat16 if config.low_precision_states else torch.float32


def compute_dtype(config: EngineConfig) -> torch.dtype | None:
    """autocast dtype of the forward, None for fp32."""
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.precision]


def stage_param_dtype(config: EngineConfig, stage: int) -> torch.dtype | None:
    """dtype stages 0-2 hold the model's parameters in under the master-weights layout (the
    compute dtype, next to an fp32 master partition: zero/master.py); None where the parameters
    are the master weights (fp32, low_precision_states, the autocast layout) and at stage 3
    (which has its own working copy, `work_dtype`)."""
    if stage >= 3 or mixed_layout(config, stage) != "master":
        return None
    return compute_dtype(config)


def work_dtype(config: EngineConfig) -> torch.dtype | None:
    """dtype of stage 3's working copy of the parameters (the compute dtype under bf16/fp16 with
    fp32 master weights); None where the parameters are the master weights."""
    return None if config.low_precision_states else compute_dtype(config)


def apply_tf32(config: EngineConfig, device: torch.device) -> bool:
    """Set this process's CUDA fp32 matmul/convolution mode from `config.tf32` (a CUDA device
    only; returns whether it did). torch 2.9+ has one setting per backend (`fp32_precision`:
    "tf32" | "ieee"); mixing it with the legacy `allow_tf32` flags is an error there, so the
    new one is used where it exists."""
    if device.type != "cuda":
        return False
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        mode = "tf32" if config.tf32 else "ieee"
        matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
    else:
        matmul.allow_tf32 = config.tf32
        torch.backends.cudnn.allow_tf32 = config.tf32
    return True


def autocast(config: EngineConfig, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    dtype = compute_dtype(config)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class LossScaler:
    """Dynamic (or static) fp16 loss scale; see the module docstring for the rules."""

    def __init__(self, cfg: LossScaleConfig) -> None:
        self.cfg = cfg
        self.scale = float(cfg.static) if cfg.static is not None else float(2**cfg.initial_scale_power)
        self.hysteresis_left = cfg.hysteresis
        self.clean_steps = 0
        """Steps without overflow since the last overflow (or the start)."""
        self.overflows = 0
        """Skipped steps so far."""

    def update(self, overflow: bool) -> None:
        """Record one step's outcome (call on every rank with the same `overflow`)."""
        if overflow:
            self.overflows += 1
            self.clean_steps = 0
            if self.cfg.static is not None:
                return
            if self.hysteresis_left <= 1:
                self.scale = max(self.scale / 2, self.cfg.min_scale)
            else:
                self.hysteresis_left -= 1
            return
        if self.cfg.static is None and self.clean_steps > 0 and self.clean_steps % self.cfg.growth_interval == 0:
            self.scale *= 2
            self.hysteresis_left = self.cfg.hysteresis
        self.clean_steps += 1

    def state_dict(self) -> dict[str, float | int]:
        return {"scale": self.scale, "hysteresis_left": self.hysteresis_left,
                "clean_steps": self.clean_steps, "overflows": self.overflows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.hysteresis_left = int(state["hysteresis_left"])
        self.clean_steps = int(state["clean_steps"])
        self.overflows = int(state["overflows"])


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by `scale`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def scale_outputs(output: Any, scale: float) -> Any:
    """`output` (any pytree) with every floating tensor that requires grad routed through
    `_ScaleGrad`: values unchanged, gradients flowing back into the module times `scale`."""

    def wrap(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.requires_grad and x.is_floating_point():
            return _ScaleGrad.apply(x, scale)
        return x

    return tree_map(wrap, output)
