"""The ssh backend: one guard per host, started over fabric/paramiko sessions in parallel.

Per host: open a connection (host keys checked, see `sshconn`), open a session, run
`cd CWD && exec GUARD --env-stdin --watch-stdin -- STARTER...` (one shell-quoted string from
`shell.remote_command`), send the job's environment as one JSON line on the session's stdin,
and stream the session's stdout/stderr lines to the sink.

Lost hosts: every `resources.ssh.keepalive_interval_s` a keepalive request goes to each host's
sshd and a `ping` line to its guard. A host whose sshd answers nothing for interval x
`keepalive_count_max` seconds is lost: `poll()` reports 255 (OpenSSH's code for a failed
connection) and `lost` says why, so the job is stopped and the host named within seconds (TCP
alone takes ~15 minutes to give up on a peer whose packets are dropped). On the host, the guard
hears no ping for as long and stops its ranks itself (`--launcher-timeout-s`), so a partitioned
host leaves nothing running either.

Stopping: closing our end of the session's stdin (or losing the connection, or `dsl launch`
dying) gives the guard end-of-file, and the guard SIGTERMs, then SIGKILLs, every process of the
job on that host, only those. No `pkill`, no second connection needed. A time-limit warning
(`dsl launch --time-limit`) is a `signal USR1` line on the same stdin, which the guard turns into
SIGUSR1 for every rank (sshd's own "signal" channel requests are not available everywhere).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

from dsl.engine import wire
from dsl.engine.errors import DslError, RunError
from dsl.launcher import shell
from dsl.launcher.backends import Backend, Sink
from dsl.launcher.hostcmd import render_per_host, ssh_target
from dsl.launcher.plan import HostLaunch, Job, LaunchPlan, SshTarget

log = logging.getLogger(__name__)
Connect = Callable[[str, SshTarget], object]
_LOST = 255  # what OpenSSH's client returns when the connection fails


class SshProcess:
    def __init__(self, launch: HostLaunch, target: SshTarget, sink: Sink, connect: Connect):
        self.host = launch.host
        self._conn = connect(launch.host, target)
        self._channel = self._conn.create_session()
        self._channel.exec_command(shell.remote_command(launch.cwd, launch.argv))
        self._channel.sendall(wire.env_line(launch.env))
        self._code: int | None = None
        self.lost: str | None = None
        """Why the host counts as lost (no keepalive answer, connection closed), else None."""
        self._interval_s = target.keepalive_interval_s
        self.dead_after_s = target.dead_after_s
        self._answered = time.monotonic()  # when sshd last answered a keepalive
        self._stopping = threading.Event()
        self._probe = threading.Event()
        threading.Thread(target=self._keepalive, name=f"dsl-keepalive-{self.host}", daemon=True).start()
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

    def _keepalive(self) -> None:
        """Every interval: a `ping` line for the guard (it stops the host's ranks when the pings
        stop, --launcher-timeout-s) and an OpenSSH keepalive request, whose answer proves the
        host is reachable. paramiko's own `set_keepalive` sends requests without asking for an
        answer, which keeps NAT state alive but notices nothing; TCP alone takes ~15 minutes
        to give up on a peer whose packets are dropped."""
        transport = self._channel.get_transport()
        while not self._stopping.is_set():
            self._probe.wait(self._interval_s)
            self._probe.clear()
            if self._stopping.is_set():
                return
            try:
                self._channel.sendall(f"{wire.GUARD_PING}\n".encode())
                # Blocks until sshd answers (its "request failure" is an answer) or the transport
                # is closed; poll() measures the wait.
                transport.global_request("keepalive@openssh.com", wait=True)
            except (OSError, EOFError, _ssh_exception()):
                return
            if not transport.is_active():
                return
            self._answered = time.monotonic()

    def probe(self) -> float:
        """Send a keepalive now (another host failed: is this one still there?); returns the
        time to compare `answered_since` with."""
        now = time.monotonic()
        self._probe.set()
        return now

    def answered_since(self, when: float) -> bool:
        return self._answered >= when

    def poll(self) -> int | None:
        if self._code is None:
            if self._channel.exit_status_ready():
                status = self._channel.recv_exit_status()
                self._code = _LOST if status < 0 else status
            elif self._channel.closed or not self._conn.is_connected:
                self._code = _LOST
                self.lost = "the ssh connection closed"
            elif self._stopping.is_set():
                pass  # being stopped: its silence is no longer news
            elif time.monotonic() - self._answered > self.dead_after_s:
                self._code = _LOST
                self.lost = f"no answer to ssh keepalives for {self.dead_after_s:g} s"
                log.error("%s: %s; counting it as lost", self.host, self.lost)
        return self._code

    def terminate(self) -> None:
        self._stopping.set()
        self._probe.set()
        try:
            self._channel.shutdown_write()  # end of stdin: the guard stops every rank
        except (OSError, EOFError):
            pass

    def warn(self, sig: int) -> None:
        """Ask the guard to pass SIGUSR1/SIGUSR2 to every rank (a control line on its stdin)."""
        name = signal.Signals(sig).name.removeprefix("SIG")
        try:
            self._channel.sendall(f"{wire.guard_signal_line(name)}\n".encode())
        except (OSError, EOFError):
            pass  # the session is gone: poll() reports it

    def dump_stacks(self) -> None:
        """Ask the guard for every rank's Python stack (a `dump` line on its stdin)."""
        try:
            self._channel.sendall(f"{wire.GUARD_DUMP}\n".encode())
        except (OSError, EOFError):
            pass

    def kill(self) -> None:
        self._stopping.set()
        self._probe.set()
        self._channel.close()
        self._conn.close()

    def wait_output(self, timeout_s: float) -> None:
        if self.lost:  # nothing more will come: don't wait for readers blocked on a dead link
            self.kill()
        for reader in self._readers:
            reader.join(timeout_s)
        self._conn.close()


def _ssh_exception() -> type:
    import paramiko  # imported when a host is running, not when a spec names the backend

    return paramiko.SSHException


class SshBackend(Backend):
    """A hostfile's hosts, each reached over ssh; the master is the first host."""

    name = "ssh"
    preflight_before_start = True
    time_limit_hint = None

    def render(self, job: Job, hosts) -> LaunchPlan:
        return render_per_host(job, hosts, backend=self.name, target=ssh_target(job.spec_file),
                               master_addr=job.spec.resources.master_addr or hosts[0].name)

    def host_command(self, plan, launch):
        from dsl.launcher.describe import env_words

        return [f"{plan.ssh.describe(launch.host)} {shell.quote(shell.remote_command(launch.cwd, launch.argv))}",
                f"  environment (sent on stdin): {env_words(plan, launch.env)}"]

    def preflight_runner(self, plan):
        from dsl.launcher.preflight import ssh_runner

        return ssh_runner(plan)

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
