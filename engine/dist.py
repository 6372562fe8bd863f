"""Process-group setup and teardown for the engine's ranks.

`setup()` reads what torchrun (or the launcher) exports: RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT (LOCAL_WORLD_SIZE optional). With none of them set it returns a
single-process context and creates no process group, so the engine also runs as a plain
`python script.py`. With WORLD_SIZE=1 it does create a (one-rank) group: that is what the
launcher asked for and it exercises the same path as a larger run.

The backend is chosen at run time: nccl when CUDA is available, else gloo (this torch build may
not contain NCCL at all; `init_process_group("nccl")` then fails). The device is
cuda:LOCAL_RANK with nccl, cpu with gloo. Whichever created the group (`setup()` or the user's
own `init_process_group`), the rank's GPU is made the current CUDA device: NCCL's object
collectives, `torch.cuda.*` calls without a device and Triton launches all go to the current
device, which is cuda:0 on every rank otherwise.

A single process (no torchrun environment, no group) on a machine with CUDA trains on the
current CUDA device (the engine says so in its log, engine/core.py); `initialize(...,
device="cpu")` keeps it on the CPU.

`teardown()` is deliberate: barrier, then destroy_process_group. A gloo rank that exits with its
group alive sometimes aborts in a destructor (`terminate called without an active exception`,
SIGABRT) after its work is done, and the launcher then reports a finished run as failed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as tdist

from dsl.engine.wire import collective_timeout_s
from dsl.engine.errors import UserError

__all__ = ["DistContext", "setup", "teardown", "current", "backend_for_machine", "single_process_device",
           "use_device"]

log = logging.getLogger(__name__)

_REQUIRED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str | None
    """`gloo` or `nccl`; None when no process group exists (single process)."""
    device: torch.device
    created_group: bool = False
    """True when `setup()` created the process group (and `teardown()` should destroy it)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def backend_for_machine() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _device_for(backend: str | None, local_rank: int) -> torch.device:
    if backend == "nccl":
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def single_process_device() -> torch.device:
    """The device of a process without a group: the current CUDA device when CUDA is available
    (so a GPU machine never trains on the CPU unasked), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def use_device(device: torch.device) -> None:
    """Make `device` this process's current CUDA device (nothing for other devices)."""
    if device.type == "cuda" and device.index is not None and torch.cuda.current_device() != device.index:
        torch.cuda.set_device(device)


def current() -> DistContext:
    """Describe the process group that already exists (or the single process when none does),
    and make the rank's GPU the current CUDA device (a group the user created did not)."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return DistContext(0, 1, 0, 1, None, single_process_device())
    backend = str(tdist.get_backend())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device_for(backend, local_rank)
    use_device(device)
    return DistContext(
        rank=tdist.get_rank(),
        world_size=tdist.get_world_size(),
        local_rank=local_rank,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        backend=backend,
        device=device,
    )


def setup(timeout_min: float = 10.0) -> DistContext:
    """Create the process group from torchrun's environment (or nothing without one)."""
    if tdist.is_available() and tdist.is_initialized():
        return current()
    present = [name for name in _REQUIRED_ENV if name in os.environ]
    if not present:
        return DistContext(0, 1, 0, 1, None, single_process_device())
    missing = [name for name in _REQUIRED_ENV if name not in os.environ]
    if missing:
        raise UserError(
            f"distributed environment is incomplete: {', '.join(present)} set but "
            f"{', '.join(missing)} missing; start the engine with torchrun or `dsl launch`"
        )
    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if not 0 <= rank < world_size:
        raise UserError(f"RANK ({rank}) must lie in [0, WORLD_SIZE ({world_size}))")
    backend = backend_for_machine()
    device = _device_for(backend, local_rank)
    # Before the group exists, so NCCL binds this rank's communicator to its own GPU.
    use_device(device)
    tdist.init_process_group(
        backend,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        # dsl sets a shorter one with `watchdog_s` (engine/wire.py): a rank stuck in a
        # collective raises instead of waiting torch's default 10 minutes.
        timeout=timedelta(seconds=collective_timeout_s(timeout_min * 60)),
    )
    log.debug("rank %d/%d: %s process group on %s", rank, world_size, backend, device)
    return DistContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size))),
        backend=backend,
        device=device,
        created_group=True,
    )


def teardown(ctx: DistContext) -> None:
    """Barrier, then destroy the group `setup()` created. Call only on the success path: after
    a failure on one rank the barrier would wait for it forever."""
    if not ctx.created_group or not tdist.is_initialized():
        return
    if ctx.backend == "nccl":
        tdist.barrier(device_ids=[ctx.local_rank])
    else:
        tdist.barrier()
    tdist.destroy_process_group()
