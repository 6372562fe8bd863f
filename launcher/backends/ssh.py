"""The ssh backend: one guard per host, started over fabric/paramiko sessions in parallel.

Per host: open a connection (host keys checked, see `sshconn`), open a session, run
`cd CWD && exec GUARD --env-stdin --watch-stdin -- STARTER...` (one shell-quoted string from
`shell.remote_command`), send the job's environment as one JSON line on the session's stdin,
and stream the session's stdout/stderr lines to the sink.

Stopping: closing our end of the session's stdin (or losing the connection, or `dsl launch`
dying) gives the guard end-of-file, and the guard SIGTERMs, then SIGKILLs, every process of the
job on that host, only those. No `pkill`, no second connection needed. A time-limit warning
(`dsl launch --time-limit`) is a `signal USR1` line on the same stdin, which the guard turns into
SIGUSR1 for every rank (sshd's own "signal" channel requests are not available everywhere).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

from dsl.engine.errors import DslError, RunError
from dsl.launcher import shell
from dsl.launcher.backends import Sink
from dsl.launcher.plan import HostLaunch, LaunchPlan, SshTarget

log = logging.getLogger(__name__)
Connect = Callable[[str, SshTarget], object]
_LOST = 255  # what OpenSSH's client returns when the connection fails


class SshProcess:
    def __init__(self, launch: HostLaunch, target: SshTarget, sink: Sink, connect: Connect):
        self.host = launch.host
        self._conn = connect(launch.host, target)
        self._channel = self._conn.create_session()
        self._channel.exec_command(shell.remote_command(launch.cwd, launch.argv))
        self._channel.sendall((json.dumps(dict(launch.env)) + "\n").encode())
        self._code: int | None = None
        self._readers = [
            threading.Thread(target=self._pump, args=(recv, name, sink), daemon=True)
            for recv, name in ((self._channel.recv, "stdout"), (self._channel.recv_stderr, "stderr"))
        ]
        for reader in self._readers:
            reader.start()

    def _pump(self, recv: Callable[[int], bytes], name: str, sink: Sink) -> None:
        pending = b""
        while True:
            try:
                chunk = recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                sink(self.host, name, line.decode("utf-8", errors="replace").rstrip("\r"))
        if pending:
            sink(self.host, name, pending.decode("utf-8", errors="replace"))

    def poll(self) -> int | None:
        if self._code is None:
            if self._channel.exit_status_ready():
                status = self._channel.recv_exit_status()
                self._code = _LOST if status < 0 else status
            elif self._channel.closed or not self._conn.is_connected:
                self._code = _LOST
        return self._code

    def terminate(self) -> None:
        try:
            self._channel.shutdown_write()  # end of stdin: the guard stops every rank
        except (OSError, EOFError):
            pass

    def warn(self, sig: int) -> None:
        """Ask the guard to pass SIGUSR1/SIGUSR2 to every rank (a control line on its stdin)."""
        name = signal.Signals(sig).name.removeprefix("SIG")
        try:
            self._channel.sendall(f"signal {name}\n".encode())
        except (OSError, EOFError):
            pass  # the session is gone: poll() reports it

    def kill(self) -> None:
        self._channel.close()
        self._conn.close()

    def wait_output(self, timeout_s: float) -> None:
        for reader in self._readers:
            reader.join(timeout_s)
        self._conn.close()


class SshBackend:
    name = "ssh"

    def __init__(self, connect: Connect | None = None):
        if connect is None:
            from dsl.launcher.sshconn import connect as real_connect

            connect = real_connect
        self._connect = connect

    def start(self, plan: LaunchPlan, sink: Sink) -> Sequence[SshProcess]:
        if plan.ssh is None:
            raise RunError("ssh backend needs resources.ssh settings in the plan")
        with ThreadPoolExecutor(max_workers=min(32, len(plan.hosts))) as pool:
            futures = [pool.submit(SshProcess, launch, plan.ssh, sink, self._connect)
                       for launch in plan.hosts]
        started, errors = [], []
        for future in futures:
            try:
                started.append(future.result())
            except DslError as exc:
                errors.append(exc)
        if errors:
            for proc in started:  # never leave half a job running
                proc.terminate()
                proc.kill()
            raise errors[0]
        return started
