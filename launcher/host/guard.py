"""The process guard that owns every process a job starts on one host.

`python -m dsl.launcher.host.guard [--grace-s S] [--watch-stdin] -- COMMAND...` runs COMMAND (the rank
starter) and makes sure that when the job ends, for whatever reason, nothing it started is left:

- It marks itself a child subreaper (Linux prctl), so rank processes that torchrun starts in
  sessions of their own, and anything they leave orphaned, stay its descendants.
- On SIGTERM, SIGINT or SIGHUP (and, with --watch-stdin, when its stdin closes, i.e. the SSH
  connection to the launcher is gone) it sends SIGTERM to every descendant at once, waits up to
  `--grace-s` seconds, then SIGKILLs whatever is left.
- With --env-stdin, the first line of stdin is a JSON object of environment variables for
  COMMAND: remote backends pass the job's environment (secrets included) this way, so no value
  appears on a command line that `ps` on the host would show.
- Stack dumps for the hang watchdog: DUMP_SIGNAL (engine/wire.py), or a stdin line `dump`, makes
  the guard send DUMP_SIGNAL to every descendant that catches it (a rank that registered
  faulthandler for it prints its threads' stacks); processes that do not catch it never get it.
- With --launcher-timeout-s S (the ssh backend: its keepalive interval x count), S seconds
  without a byte on stdin also stop the job: the launcher writes a `ping` line every keepalive
  interval, and a connection cut without a close (a partitioned host) never ends stdin.
- SIGUSR1/SIGUSR2 (the warning before a time limit, "checkpoint now": Slurm's `--signal`, or
  `dsl launch --time-limit`) are passed to COMMAND, and the guard keeps running. With
  --watch-stdin, a stdin line `signal USR1` (or `signal USR2`) does the same: that is how the ssh
  backend signals a remote guard. The handlers are installed first thing and only set a
  preallocated flag (no import, I/O or allocation inside a handler: it runs between two bytecodes
  of whatever the main thread does); the main loop delivers the signal to COMMAND once COMMAND
  catches it (dsl.launcher.host.elastic installs its handler before importing torch), or after
  `elastic.CATCH_WAIT_S`, so a warning that arrives while COMMAND starts is not fatal to it.
- When COMMAND exits, leftover descendants get the same treatment, and the guard exits with
  COMMAND's exit code (128+N if COMMAND or the guard itself ended by signal N). With
  --checkpointed-linger-s S and COMMAND's code EXIT_CHECKPOINTED (75: every rank checkpointed at
  the warning, launcher/host/elastic.py), the guard waits up to S seconds before exiting, and a SIGTERM
  in that time does not change its code: `srun --kill-on-bad-exit` ends every node's task at the
  first non-zero exit, and the other nodes, finishing the same collective checkpoint a moment
  later, must still report 75 (the batch script requeues the job on 75 only).

It kills only its own descendants (by PID, found through /proc via psutil), never by name, so
other jobs and other users' processes on the host are untouched. It imports no torch.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import select
import signal
import subprocess
import sys
import threading
import time

import psutil

from dsl.launcher.host.elastic import CATCH_WAIT_S, EXIT_CHECKPOINTED, WARNING_SIGNALS, catches
from dsl.engine import wire
from dsl.engine.wire import DUMP_SIGNAL

_PR_SET_CHILD_SUBREAPER = 36
_POLL_S = 0.05
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_WARNINGS = {sig.name[3:]: sig for sig in WARNING_SIGNALS}  # "USR1" of `signal USR1` (engine/wire.py)


def _become_subreaper() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _descendants() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _signal_all(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.Error:
            pass


def _reap(child_pid: int, status: dict[str, int]) -> None:
    """Collect every exited child (ours are orphans too, as a subreaper); remember COMMAND's code."""
    while True:
        try:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid == child_pid:
            status["code"] = os.waitstatus_to_exitcode(wait_status)


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for proc in procs:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            pass
    return out


def _clean_up(child_pid: int, status: dict[str, int], grace_s: float) -> None:
    """SIGTERM every descendant, wait up to grace_s, SIGKILL the rest, reap them all."""
    _signal_all(_descendants(), signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        _reap(child_pid, status)
        if not _alive(_descendants()):
            break
        time.sleep(_POLL_S)
    # New descendants may appear while we wait (a starter spawning late): kill until none are left.
    for _ in range(50):
        left = _alive(_descendants())
        if not left:
            break
        _signal_all(left, signal.SIGKILL)
        time.sleep(_POLL_S)
        _reap(child_pid, status)
    _reap(child_pid, status)


def _dump_stacks() -> None:
    """DUMP_SIGNAL to every descendant that catches it (the ranks registered faulthandler for it,
    engine/wire.py); the others would die of it, so they do not get it."""
    for proc in _descendants():
        if catches(proc.pid, DUMP_SIGNAL):
            try:
                proc.send_signal(DUMP_SIGNAL)
            except psutil.Error:
                pass


def _read_line(fd: int) -> bytes:
    """One line from a raw fd, byte by byte, so nothing after it is consumed."""
    out = bytearray()
    while True:
        byte = os.read(fd, 1)
        if not byte or byte == b"\n":
            return bytes(out)
        out += byte


class _Signals:
    """What the handlers record; made before they are installed, so that a handler only stores a
    number into a list that exists already (see the module docstring)."""

    def __init__(self) -> None:
        self.stop = [0]  # the first of SIGTERM/SIGINT/SIGHUP (or end of stdin): 0 = none
        self.warned = [0] * (max(WARNING_SIGNALS) + 1)  # per warning signal: 1 = received
        self.dump = [0]  # 1: pass DUMP_SIGNAL to every process that catches it (stack dumps)

    def on_dump(self, _signum: int, _frame: object) -> None:
        self.dump[0] = 1

    def on_stop(self, signum: int, _frame: object) -> None:
        if not self.stop[0]:
            self.stop[0] = signum

    def on_warning(self, signum: int, _frame: object) -> None:
        self.warned[signum] = 1

    def install(self) -> None:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, self.on_stop)
        for sig in WARNING_SIGNALS:
            signal.signal(sig, self.on_warning)
        if DUMP_SIGNAL is not None:
            signal.signal(DUMP_SIGNAL, self.on_dump)


class _Warnings:
    """Warning signals received and not yet delivered to COMMAND (main loop only)."""

    def __init__(self, signals: _Signals):
        self._signals = signals
        self._since: dict[int, float] = {}

    def deliver(self, pid: int) -> None:
        now = time.monotonic()
        for sig in WARNING_SIGNALS:
            if self._signals.warned[sig]:
                self._signals.warned[sig] = 0
                self._since.setdefault(sig, now)
        for sig, since in list(self._since.items()):
            if catches(pid, sig) or now - since >= CATCH_WAIT_S:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
                del self._since[sig]


def _watch_stdin(signals: _Signals, timeout_s: float | None = None) -> None:
    """Read fd 0 until it closes (then stop the job); `signal USR1` lines are warnings. With
    `timeout_s`, nothing read for that long also stops the job (the launcher writes `ping`
    lines: a connection cut without a close, e.g. a partition, never ends stdin by itself)."""
    pending = b""
    # Raw reads on fd 0: a buffered sys.stdin held by this thread would abort the interpreter at
    # exit ("could not acquire lock for <stdin>").
    while True:
        ready, _, _ = select.select([0], [], [], timeout_s)
        if not ready:
            print(f"dsl guard: nothing heard from the launcher for {timeout_s:g} s (connection "
                  "lost?); stopping every rank of this host", file=sys.stderr, flush=True)
            break
        chunk = os.read(0, 4096)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            control = wire.parse_guard_line(line)
            if control == wire.GUARD_DUMP:
                signals.dump[0] = 1
            elif control in _WARNINGS:
                signals.warned[_WARNINGS[control]] = 1
    if not signals.stop[0]:
        signals.stop[0] = signal.SIGHUP


def main(argv: list[str] | None = None) -> int:
    # First of all: until the handlers are set, a warning signal would end the guard.
    signals = _Signals()
    signals.install()
    parser = argparse.ArgumentParser(prog="python -m dsl.launcher.host.guard")
    parser.add_argument("--grace-s", type=float, default=3.0)
    parser.add_argument("--watch-stdin", action="store_true")
    parser.add_argument("--env-stdin", action="store_true")
    parser.add_argument("--checkpointed-linger-s", type=float, default=0.0)
    parser.add_argument("--launcher-timeout-s", type=float, default=None)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")

    env = None
    if args.env_stdin:
        try:
            extra = wire.parse_env_line(_read_line(0))
        except ValueError as exc:  # json.JSONDecodeError is one
            print(f"dsl guard: bad environment line on stdin: {exc}", file=sys.stderr, flush=True)
            return 2
        env = {**os.environ, **extra}

    _become_subreaper()
    if args.watch_stdin:
        threading.Thread(target=_watch_stdin, args=(signals, args.launcher_timeout_s), daemon=True).start()

    try:
        # Ranks never read the launcher's terminal; with --watch-stdin the guard owns stdin.
        child = psutil.Popen(command, stdin=subprocess.DEVNULL, env=env)
    except OSError as exc:
        print(f"dsl guard: cannot start {command[0]!r}: {exc}", file=sys.stderr, flush=True)
        return 127

    warnings = _Warnings(signals)
    status: dict[str, int] = {}
    while "code" not in status and not signals.stop[0]:
        _reap(child.pid, status)
        if "code" not in status:  # not reaped: the PID is still the child's
            warnings.deliver(child.pid)
        if signals.dump[0]:
            signals.dump[0] = 0
            _dump_stacks()
        time.sleep(_POLL_S)
    _clean_up(child.pid, status, args.grace_s)
    if signals.stop[0] and "code" not in status:
        return 128 + signals.stop[0]
    code = status.get("code", 1)
    if code == EXIT_CHECKPOINTED and args.checkpointed_linger_s > 0:
        deadline = time.monotonic() + args.checkpointed_linger_s
        while time.monotonic() < deadline and not signals.stop[0]:
            time.sleep(_POLL_S)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter finalisation racing the stdin watcher thread
