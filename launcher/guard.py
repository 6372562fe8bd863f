"""The process guard that owns every process a job starts on one host.

`python -m dsl.launcher.guard [--grace-s S] [--watch-stdin] -- COMMAND...` runs COMMAND (the rank
starter) and makes sure that when the job ends, for whatever reason, nothing it started is left:

- It marks itself a child subreaper (Linux prctl), so rank processes that torchrun starts in
  sessions of their own, and anything they leave orphaned, stay its descendants.
- On SIGTERM, SIGINT or SIGHUP (and, with --watch-stdin, when its stdin closes, i.e. the SSH
  connection to the launcher is gone) it sends SIGTERM to every descendant at once, waits up to
  `--grace-s` seconds, then SIGKILLs whatever is left.
- With --env-stdin, the first line of stdin is a JSON object of environment variables for
  COMMAND: remote backends pass the job's environment (secrets included) this way, so no value
  appears on a command line that `ps` on the host would show.
- SIGUSR1/SIGUSR2 (Slurm's `--signal` before the time limit: "checkpoint now") are passed to
  COMMAND, and the guard keeps running.
- When COMMAND exits, leftover descendants get the same treatment, and the guard exits with
  COMMAND's exit code (128+N if COMMAND or the guard itself ended by signal N).

It kills only its own descendants (by PID, found through /proc via psutil), never by name, so
other jobs and other users' processes on the host are untouched. It imports no torch.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil

_PR_SET_CHILD_SUBREAPER = 36
_POLL_S = 0.05


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


def _read_line(fd: int) -> bytes:
    """One line from a raw fd, byte by byte, so nothing after it is consumed."""
    out = bytearray()
    while True:
        byte = os.read(fd, 1)
        if not byte or byte == b"\n":
            return bytes(out)
        out += byte


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsl.launcher.guard")
    parser.add_argument("--grace-s", type=float, default=3.0)
    parser.add_argument("--watch-stdin", action="store_true")
    parser.add_argument("--env-stdin", action="store_true")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")

    env = None
    if args.env_stdin:
        try:
            extra = json.loads(_read_line(0) or b"{}")
        except json.JSONDecodeError as exc:
            print(f"dsl guard: bad environment line on stdin: {exc}", file=sys.stderr, flush=True)
            return 2
        env = {**os.environ, **{str(k): str(v) for k, v in extra.items()}}

    _become_subreaper()
    stop: dict[str, int] = {}

    def on_signal(signum: int, _frame: object) -> None:
        stop.setdefault("signal", signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    if args.watch_stdin:
        def watch() -> None:
            # Raw reads on fd 0: a buffered sys.stdin held by this thread would abort the
            # interpreter at exit ("could not acquire lock for <stdin>").
            while os.read(0, 4096):
                pass
            stop.setdefault("signal", signal.SIGHUP)

        threading.Thread(target=watch, daemon=True).start()

    try:
        # Ranks never read the launcher's terminal; with --watch-stdin the guard owns stdin.
        child = psutil.Popen(command, stdin=subprocess.DEVNULL, env=env)
    except OSError as exc:
        print(f"dsl guard: cannot start {command[0]!r}: {exc}", file=sys.stderr, flush=True)
        return 127

    def forward(signum: int, _frame: object) -> None:
        try:
            child.send_signal(signum)
        except psutil.Error:
            pass

    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, forward)
    status: dict[str, int] = {}
    while "code" not in status and "signal" not in stop:
        _reap(child.pid, status)
        time.sleep(_POLL_S)
    _clean_up(child.pid, status, args.grace_s)
    if "signal" in stop and "code" not in status:
        return 128 + stop["signal"]
    code = status.get("code", 1)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter finalisation racing the stdin watcher thread
