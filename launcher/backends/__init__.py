"""Backends start the per-host commands of a LaunchPlan and report lines and exit codes.

Every backend has the same shape (`start(plan, sink) -> list[HostProcess]`), is registered here by
name and imported only when used. Supervision (prefixes, logs, fail-fast, signals, restarts) is
backend-independent and lives in `dsl.launcher.supervise`.
"""

from __future__ import annotations

import importlib
from typing import Callable, Protocol

from dsl.engine.errors import UserError
from dsl.launcher.plan import LaunchPlan

# (host, stream, line): stream is "stdout" or "stderr"; line has no trailing newline.
Sink = Callable[[str, str, str], None]


class HostProcess(Protocol):
    """The running command of one host."""

    host: str

    def poll(self) -> int | None:
        """Exit code once the host's command ended (128+N for signal N), else None."""

    def terminate(self) -> None:
        """Ask the host's guard to stop every rank (SIGTERM); returns at once."""

    def kill(self) -> None:
        """Last resort when terminate() did not end it in time."""

    def wait_output(self, timeout_s: float) -> None:
        """Wait until every line the host printed has been passed to the sink."""


class Backend(Protocol):
    name: str

    def start(self, plan: LaunchPlan, sink: Sink) -> list[HostProcess]: ...


_BACKENDS = {
    "local": "dsl.launcher.backends.local:LocalBackend",
    "ssh": "dsl.launcher.backends.ssh:SshBackend",
    "slurm": "dsl.launcher.backends.slurm:SlurmBackend",
    "mpi": "dsl.launcher.backends.mpi:MpiBackend",
}


def get_backend(name: str) -> Backend:
    target = _BACKENDS.get(name)
    if target is None:
        raise UserError(
            f"backend '{name}' is not available in this version of dsl "
            f"(available: {', '.join(sorted(_BACKENDS))}); `dsl launch --dry-run` shows its plan"
        )
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)()
