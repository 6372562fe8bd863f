"""What every smoke check uses: the check registry, the per-check context, the model shapes,
data, training loop and loss comparison, and the tolerances (tests/gpu/smoke.py runs the checks).

Importing this module imports no torch: `smoke.py --list` reads the registry on machines where
importing torch (or initialising CUDA) is exactly what must not happen. Functions that need
torch import it when called.

Tolerances (absolute, on per-step mean losses of ~5.5 falling to ~5.0 over a few AdamW steps of
the bundled `tiny` Llama). None is measured on a GPU yet: every comparison writes its
`max_abs_diff` (or `max_rel_diff`) into the check's JSON, so the first GPU runs can tighten them.
"Self-test" figures are `smoke.py --device cpu [--multi]` on this project's 2-core CPU machine.
- FP32_TOL 2e-4: fp32 on the device vs the same case on the CPU; N ranks vs 1 rank (ZeRO 0-3,
  sequence parallel, a user's process group); optimizer offload (the host's C++ Adam) vs the
  update on the device. Only the order of reductions differs (GPU matmul/attention kernels, NCCL
  sums). Self-test: 0 on 1 rank, <= 7.2e-7 on 2 ranks (test_zero_stages.py: <= 6e-7 over 20
  steps). ~300x that, still far below one step's loss change (~0.15).
- LOWP_TOL 5e-2: bf16 / fp16 / low_precision_states on the device vs the same case on the CPU
  (or N ranks vs 1), fp32 with TensorFloat-32 matmuls (the engine's CUDA default) vs IEEE fp32
  on the CPU, and 1-bit Adam device vs CPU. Different 16-bit kernels round differently;
  bf16 vs fp32 on CPU measures 6.9e-3 over 20 steps (test_zero_stages.py allows 2e-2).
  Self-test, 2 ranks vs 1: <= 5.6e-5 bf16, 1.8e-5 fp16, 4.1e-4 low_precision_states.
- SAME_TOL 2e-5: a feature switched on vs off on the same device in fp32 (activation
  checkpointing and offload, tiled loss/MLP, quantize_gradients at 1 rank, where it does nothing):
  the same arithmetic up to summation order (test_compile.py allows 2e-5 for compiled vs eager).
  Self-test: <= 4.8e-7.
- COMPILE_TOL 1e-4: compiled vs eager fp32 on the device (inductor fuses and reorders
  reductions). Self-test: 9.5e-7.
- QUANT_TOL 3e-2: int8-quantized gradient reduce-scatter vs fp32 on N ranks (test_quantized_reduce
  measured <= 0.018 over 20 steps on 2 ranks). Self-test: <= 6.4e-4 over 4 steps.
- ONEBIT_REL_TOL 0.05: 1-bit Adam's last loss vs AdamW's, relative, a few steps past freeze_step
  (its momentum is compressed to signs; test_onebit.py allows 2% on the mean of 10 losses after
  100 steps; a short run gets more room). Self-test: 1.5% (1 rank), 0.7% (2 ranks).
- MEMORY_MARGIN 0.10: measured device memory may exceed engine.memory's prediction by at most
  10% (the planner's own margin; tests/unit/test_memory_measured.py holds each term to 10%).
  Self-test: measured / predicted = 1.000001.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FP32_TOL = 2e-4
LOWP_TOL = 5e-2
SAME_TOL = 2e-5
COMPILE_TOL = 1e-4
QUANT_TOL = 3e-2
ONEBIT_REL_TOL = 0.05
MEMORY_MARGIN = 0.10

TINY = {"preset": "tiny"}
"""engine/presets.py's `tiny`: vocab 256, hidden 64, 2 layers, 4 heads, seq 64, tied head
(117,056 parameters): the model of the engine matrix, offload, checkpoint and 1-bit checks."""
MICRO = 4
STEPS = 4
LR = 3e-3


# The registry -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    name: str
    description: str
    fn: Callable[["Ctx"], None]
    part: str
    """"single" (one process, one GPU) or "multi" (torchrun, N ranks)."""
    timeout_s: float
    launch: str = "python"
    """How the harness starts it: "python" (one process) or "torchrun" (N ranks)."""


CHECKS: dict[str, Check] = {}


def check(name: str, description: str, *, part: str, timeout_s: float, launch: str = "python"):
    """Register `fn(ctx)` as the check `name`. Raise Skip to skip it; any other exception fails it;
    otherwise its status follows its cases (`ctx.case`)."""

    def register(fn: Callable[["Ctx"], None]) -> Callable[["Ctx"], None]:
        if name in CHECKS:
            raise ValueError(f"check {name!r} registered twice")
        CHECKS[name] = Check(name, description, fn, part, timeout_s, launch)
        return fn

    return register


HELPERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}
"""Programs a check runs in a process of their own (`smoke.py --helper NAME --args JSON`), e.g.
a checkpoint reload with fewer visible GPUs: `fn(args) -> JSON-able result`."""


def helper(name: str):
    def register(fn: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[[dict[str, Any]], dict[str, Any]]:
        HELPERS[name] = fn
        return fn

    return register


class Skip(Exception):
    """The check cannot apply here; the message says why."""


# The context a check runs in ----------------------------------------------------------------


@dataclass
class Ctx:
    """One check's view of its process: which device, which rank, where to write, and what it
    found so far (`details`, `cases`)."""

    name: str
    mode: str
    """"cuda" or "cpu" (the self-test: GPUs hidden, gloo instead of NCCL)."""
    tmp: Path
    """A folder of this check's own (deleted afterwards)."""
    details: dict[str, Any] = field(default_factory=dict)
    cases: list[dict[str, Any]] = field(default_factory=list)
    dist: Any = None

    @property
    def rank(self) -> int:
        return int(os.environ.get("RANK", "0"))

    @property
    def world(self) -> int:
        return int(os.environ.get("WORLD_SIZE", "1"))

    @property
    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def device(self):
        """cuda:LOCAL_RANK, or cpu in the self-test."""
        import torch

        if self.mode == "cuda":
            torch.cuda.set_device(self.local_rank)  # Triton launches on the current device
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def group(self):
        """Create the process group from the environment the harness (or torchrun) set
        (dsl.engine.dist.setup: nccl with CUDA, else gloo); once per check."""
        if self.dist is None:
            from dsl.engine import dist

            self.dist = dist.setup()
            self.details["process_group"] = {"backend": self.dist.backend, "world_size": self.dist.world_size,
                                             "device": str(self.dist.device)}
        return self.dist

    def case(self, name: str, ok: bool | None, reason: str = "", **data: Any) -> bool:
        """Record one case: ok True (pass), False (fail) or None (skip, `reason` says why)."""
        status = "skip" if ok is None else "pass" if ok else "fail"
        self.cases.append({"name": name, "status": status, **({"reason": reason} if reason else {}), **data})
        return bool(ok)

    def attempt(self, name: str, fn: Callable[[], bool | None], **data: Any) -> None:
        """Run one case; an exception fails this case only (its traceback goes into the JSON)."""
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - every failure is recorded, the next case still runs
            self.case(name, False, reason=first_line(exc), traceback=traceback.format_exc(), **data)

    def verdict(self) -> tuple[str, str]:
        if not self.cases:
            return "fail", "the check recorded no case (a check that cannot fail is a defect)"
        failed = [c["name"] for c in self.cases if c["status"] == "fail"]
        if failed:
            return "fail", f"{len(failed)} of {len(self.cases)} case(s) failed: {', '.join(failed)}"
        if self.cases and all(c["status"] == "skip" for c in self.cases):
            return "skip", "; ".join(sorted({c.get("reason", "") for c in self.cases}))
        skipped = sum(c["status"] == "skip" for c in self.cases)
        return "pass", f"{len(self.cases) - skipped} case(s) passed" + (f", {skipped} skipped" if skipped else "")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


# Model, data, training ----------------------------------------------------------------------


def model_config(model: dict[str, Any]):
    from dsl.engine.train_config import ModelConfig

    return ModelConfig(**model)


def build(cfg: dict[str, Any], device, model: dict[str, Any] = TINY):
    """The bundled Llama (seed 0, so every build has the same weights) wrapped by the engine on
    `device` (a constant lr: no schedule). fp32 means IEEE fp32 here (`tf32: false`, the engine's
    default being TensorFloat-32 matmuls on CUDA) unless `cfg` says otherwise: the checks compare
    the engine's paths, and FP32_TOL is for reduction order, not 10-bit matmul inputs."""
    import torch

    from dsl.engine import initialize
    from dsl.engine.model import Llama

    torch.manual_seed(0)
    return initialize(Llama(model_config(model)), {"micro_batch": MICRO, "tf32": False, **cfg}, lr=LR,
                      device=device)


def batch(model: dict[str, Any], step: int, *, rank: int = 0, micro_batch: int = MICRO):
    """(tokens, targets) [micro_batch, seq_len] int64 on the CPU for data-parallel rank `rank` at
    `step`; targets follow a fixed rule, so the loss falls within a few steps."""
    import torch

    cfg = model_config(model)
    g = torch.Generator().manual_seed(1_000_003 * rank + 1009 * step)
    tokens = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.seq_len), generator=g)
    return tokens, (tokens * 7 + 3) % cfg.vocab_size


def global_batch(model: dict[str, Any], step: int, ranks: int, micro_batch: int = MICRO):
    """The batches of `ranks` data-parallel ranks at `step`, concatenated (a 1-rank reference)."""
    import torch

    parts = [batch(model, step, rank=r, micro_batch=micro_batch) for r in range(ranks)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def train(engine, model: dict[str, Any] = TINY, *, steps: int = STEPS, rank: int = 0, ranks: int = 1,
          micro_batch: int = MICRO, first_step: int = 1) -> list[float]:
    """Per-step losses of `steps` steps on `engine`'s device. ranks > 1: one process trains the
    concatenated batch of that many ranks (the reference of an N-rank run)."""
    from tests.integration.test_zero_stages import train as train_steps

    device = engine.device

    def data(step: int, _micro: int):
        if ranks > 1:
            tokens, targets = global_batch(model, step, ranks, micro_batch)
        else:
            tokens, targets = batch(model, step, rank=rank, micro_batch=micro_batch)
        return tokens.to(device), targets.to(device)

    return train_steps(engine, range(first_step, first_step + steps), data)


def compare(ctx: Ctx, name: str, got: list[float], want: list[float], tol: float, *, relative: bool = False,
            **data: Any) -> bool:
    """A case: every loss finite and within `tol` of the reference (absolute, or relative to it)."""
    import math

    finite = all(math.isfinite(x) for x in got)
    diffs = [abs(a - b) / (abs(b) if relative else 1.0) for a, b in zip(got, want)]
    diff = max(diffs) if diffs else math.inf
    ok = finite and len(got) == len(want) and diff <= tol
    reason = "" if ok else ("non-finite loss" if not finite else
                            f"max {'relative ' if relative else ''}difference {diff:.3g} > {tol:g}")
    return ctx.case(name, ok, reason, max_abs_diff=diff if not relative else None,
                    max_rel_diff=diff if relative else None, tol=tol, losses=got, reference=want, **data)


def refused(exc: BaseException) -> bool:
    """The engine refused the configuration (a UserError), as opposed to failing while running it."""
    from dsl.engine.errors import UserError

    return isinstance(exc, UserError)


def engine_case(ctx: Ctx, name: str, run: Callable[[], list[float]], want: list[float] | None, tol: float,
                **data: Any) -> list[float] | None:
    """Run a training case and compare it; a refusal by the engine is a skip naming the reason
    (fp16 on a device that cannot do it), any other exception fails this case only."""
    started = time.monotonic()
    try:
        got = run()
    except Exception as exc:  # noqa: BLE001 - recorded; the next case runs
        if refused(exc):
            ctx.case(name, None, reason=f"refused by the engine: {first_line(exc)}", **data)
        else:
            ctx.case(name, False, reason=first_line(exc), traceback=traceback.format_exc(), **data)
        return None
    if want is None:
        ctx.case(name, None, reason="no reference: the reference run failed or was refused", losses=got, **data)
        return got
    compare(ctx, name, got, want, tol, duration_s=round(time.monotonic() - started, 3), **data)
    return got


def reference(ctx: Ctx, key: str, run: Callable[[], list[float]]) -> list[float] | None:
    """A reference run's losses; its failure is recorded in details (the cases it serves skip)."""
    try:
        return run()
    except Exception as exc:  # noqa: BLE001
        ctx.details.setdefault("reference_errors", {})[key] = first_line(exc)
        return None


def release(*engines: Any) -> None:
    """Close engines (hooks, offload files) and give their device memory back."""
    import gc

    import torch

    for e in engines:
        if e is not None:
            e.close()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
