"""Backends: one object per backend owns everything dsl does differently for it.

A backend (torchx's scheduler interface is the model: each scheduler owns its dry run and its run)
answers, for a spec and then for its rendered plan:

- `resolve_hosts(spec_file)`: the hosts and slots the job runs on, and whether dsl writes
  CUDA_VISIBLE_DEVICES (hostfile, this machine's devices, a Slurm allocation, ...);
- `master_port(spec_file, hold)`: the rendezvous port as render sees it (a number, held until
  the ranks start when `hold`; or the expression the nodes compute);
- `render(job, hosts) -> LaunchPlan`: pure, the dry run and the run share it;
- `preflight_runner(plan)` / `probe_runner(plan)`: how a command reaches each host before the
  job starts (a subprocess, ssh, `srun -w HOST`);
- `describe(plan)`: the plan as people read it (`dsl launch --dry-run`);
- `lock_name(plan)`: the run-folder lock a launch holds (one per node for pernode);
- `start(plan, sink) -> [HostProcess]`; a HostProcess is stopped by `terminate()` (the guard's
  orderly stop) and `kill()` (the last resort), which `launcher/supervise.py` escalates.

Everything else (supervision, output, the run folder) is backend-independent. A backend is
registered here by name and its module imported only when used; adding one is one file plus a
line in `_BACKENDS`. Nothing outside this folder branches on a backend's name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

from dsl.engine.errors import UserError

if TYPE_CHECKING:
    from dsl.launcher.hosts import Host
    from dsl.launcher.plan import HostLaunch, Job, LaunchPlan, RenderInputs
    from dsl.launcher.ports import PortReservation
    from dsl.launcher.spec import Resources, SpecFile

# (host, stream, line): stream is "stdout" or "stderr"; line has no trailing newline.
Sink = Callable[[str, str, str], None]
# (host, argv) -> (exit code, stdout, stderr): runs one short command on a host before the job.
Runner = Callable[[str, list], tuple]


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


class Backend:
    """The defaults every backend shares; each subclass overrides what differs."""

    name = ""
    runs_here = False
    """The ranks run on this machine (the local backend): it is probed and is the master."""
    forwards_env_prefixes = True
    """env.forward_prefixes are copied from dsl's environment (Slurm's sbatch passes all of it)."""
    preflight_before_start = False
    """`dsl launch` checks the hosts first (`--preflight`, on by default)."""
    time_limit_hint: str | None = "run it with backend local or ssh"
    """None: `dsl launch --time-limit` applies; else what to do instead."""

    # -- before render ---------------------------------------------------------------------------
    def check_spec(self, spec_file: "SpecFile") -> None:
        """Rules of this backend checked when the spec is loaded (UserError, located)."""

    def spec_world(self, res: "Resources") -> tuple[int, int] | None:
        """(ranks, ranks per host) when the spec alone fixes them, else None."""
        return None

    def resolve_hosts(self, spec_file: "SpecFile") -> "tuple[list[Host], bool]":
        """The hosts of a spec and whether CUDA_VISIBLE_DEVICES should pin their devices."""
        from dsl.launcher import spechosts

        return spechosts.hostfile_hosts(spec_file, self.name, required=True)

    def unknown_hosts(self, spec_file: "SpecFile") -> str | None:
        """Why the hosts cannot be reached before the job starts (a located message), else None."""
        return None

    def hosts_known(self, inputs: "RenderInputs") -> bool:
        """Whether the rendered hosts exist yet (Slurm's do only inside an allocation)."""
        return True

    def master_port(self, spec_file: "SpecFile", hold: bool) -> "tuple[int | str, PortReservation | None]":
        """The rendezvous port: `auto` picks a free one here (held while `hold`), a number stays."""
        from dsl.launcher.ports import reserve_port

        port = spec_file.spec.resources.master_port
        if port != "auto":
            return port, None
        reservation = reserve_port()
        if not hold:
            reservation.release()
            return reservation.port, None
        return reservation.port, reservation

    def port_note(self, spec_file: "SpecFile") -> str | None:
        """A line for the dry run about the port, when the real run will pick another one."""
        if spec_file.spec.resources.master_port == "auto":
            return ("# master_port is auto: this port was free just now; "
                    "`dsl launch` picks (and holds) a free port again when it starts.")
        return None

    # -- render and describe ---------------------------------------------------------------------
    def render(self, job: "Job", hosts: "list[Host]") -> "LaunchPlan":
        raise NotImplementedError

    def describe(self, plan: "LaunchPlan") -> str:
        """One copy-pasteable shell line per host (secrets redacted)."""
        from dsl.launcher.describe import describe

        return describe(plan, self.host_command)

    def host_command(self, plan: "LaunchPlan", launch: "HostLaunch") -> list[str]:
        """The lines that show how `launch` is started (after its `[host] ...` header)."""
        from dsl.launcher.describe import env_words
        from dsl.launcher import shell

        return [f"cd {shell.quote(launch.cwd)} && env {env_words(plan, launch.env)} {shell.join(launch.argv)}"]

    def lock_name(self, plan: "LaunchPlan") -> str:
        """The run-folder lock's file name (launcher/runlock.py): one launch per run folder."""
        from dsl.launcher.runlock import LOCK_NAME

        return LOCK_NAME

    def where(self, plan: "LaunchPlan") -> str:
        """The hosts, for the `dsl: launching ...` line."""
        return ", ".join(h.host for h in plan.hosts)

    # -- reaching the hosts before the job -------------------------------------------------------
    def preflight_runner(self, plan: "LaunchPlan") -> Runner:
        from dsl.launcher.preflight import local_runner

        return local_runner

    def probe_runner(self, plan: "LaunchPlan") -> Runner:
        return self.preflight_runner(plan)

    # -- the run ---------------------------------------------------------------------------------
    def start(self, plan: "LaunchPlan", sink: Sink) -> Sequence[HostProcess]:
        raise NotImplementedError


_BACKENDS = {
    "local": "dsl.launcher.backends.local:LocalBackend",
    "ssh": "dsl.launcher.backends.ssh:SshBackend",
    "slurm": "dsl.launcher.backends.slurm:SlurmBackend",
    "mpi": "dsl.launcher.backends.mpi:MpiBackend",
    "pernode": "dsl.launcher.backends.pernode:PerNodeBackend",
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


def time_limit_backends() -> list[str]:
    """The backends `dsl launch --time-limit` applies to."""
    return [name for name in _BACKENDS if get_backend(name).time_limit_hint is None]


def backend_of(spec_file: "SpecFile") -> Backend:
    """The backend a spec names (resources.backend)."""
    return get_backend(spec_file.spec.resources.backend)
