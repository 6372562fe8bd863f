"""The local backend: runs each host command of a plan as a child process of `dsl launch`.

The child (the guard) starts in a session of its own, so a Ctrl-C in the terminal reaches only
`dsl launch`, which then stops the job in order (SIGTERM to the guard, which cleans up the whole
tree). Two reader threads per child pass its stdout and stderr lines to the sink as they come.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from typing import Callable, Mapping, Sequence

from dsl.engine.wire import DUMP_SIGNAL
from dsl.engine.errors import RunError, UserError
from dsl.launcher.backends import Backend, Sink
from dsl.launcher.hostcmd import render_per_host
from dsl.launcher.plan import HostLaunch, Job, LaunchPlan

Popen = Callable[..., subprocess.Popen]


class LocalProcess:
    def __init__(self, launch: HostLaunch, sink: Sink, popen: Popen = subprocess.Popen,
                 base_env: Mapping[str, str] | None = None):
        self.host = launch.host
        env = dict(os.environ if base_env is None else base_env)
        env.update(launch.env)
        try:
            self._proc = popen(
                list(launch.argv), env=env, cwd=launch.cwd, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
            )
        except OSError as exc:
            raise RunError(f"{launch.host}: cannot start {launch.argv[0]!r}: {exc}") from None
        self._readers = [
            threading.Thread(target=_pump, args=(stream, name, self.host, sink), daemon=True)
            for stream, name in ((self._proc.stdout, "stdout"), (self._proc.stderr, "stderr"))
        ]
        for reader in self._readers:
            reader.start()

    def poll(self) -> int | None:
        code = self._proc.poll()
        return None if code is None else (128 - code if code < 0 else code)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def warn(self, sig: int) -> None:
        """Pass a time-limit warning (SIGUSR1/SIGUSR2) to the guard, which passes it to every rank."""
        self._signal(sig)

    def dump_stacks(self) -> None:
        """Ask the guard for every rank's Python stack (engine/wire.py DUMP_SIGNAL)."""
        if DUMP_SIGNAL is not None:
            self._signal(DUMP_SIGNAL)

    def kill(self) -> None:
        # The guard's session: the guard and anything of the job still in its process group.
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait_output(self, timeout_s: float) -> None:
        for reader in self._readers:
            reader.join(timeout_s)

    def _signal(self, sig: int) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.send_signal(sig)
            except ProcessLookupError:
                pass


def _pump(stream, name: str, host: str, sink: Sink) -> None:
    with stream:
        for raw in iter(stream.readline, b""):
            sink(host, name, raw.decode("utf-8", errors="replace").rstrip("\r\n"))


class LocalBackend(Backend):
    """This machine: its devices (or a hostfile naming one host), the master at 127.0.0.1."""

    name = "local"
    runs_here = True
    time_limit_hint = None

    def __init__(self, popen: Popen = subprocess.Popen):
        self._popen = popen

    def spec_world(self, res):
        ppn = res.procs_per_node
        return (ppn, ppn) if isinstance(ppn, int) and not res.hostfile and (res.nodes or 1) == 1 else None

    def resolve_hosts(self, spec_file):
        from dsl.launcher import spechosts

        hosts, pin = spechosts.hostfile_hosts(spec_file, self.name, required=False)
        if len(hosts) > 1:
            raise UserError(
                f"{spec_file.where('resources', 'backend')}: the local backend runs on this machine "
                f"only, but {len(hosts)} hosts are selected; use backend ssh, slurm or mpi")
        return hosts, pin

    def master_port(self, spec_file, hold):
        """A fixed port is held too while `hold`: a second job on this machine is refused at once."""
        from dsl.launcher.ports import hold_port

        port = spec_file.spec.resources.master_port
        if port == "auto" or not hold:
            return super().master_port(spec_file, hold)
        try:
            return port, hold_port(port)
        except UserError as exc:
            raise UserError(f"{spec_file.where('resources', 'master_port')}: {exc}") from None

    def render(self, job: Job, hosts) -> LaunchPlan:
        return render_per_host(job, hosts, backend=self.name,
                               master_addr=job.spec.resources.master_addr or "127.0.0.1")

    def start(self, plan: LaunchPlan, sink: Sink) -> Sequence[LocalProcess]:
        return [LocalProcess(launch, sink, self._popen) for launch in plan.hosts]
