"""The guard leaves nothing behind: orphans, new sessions and SIGTERM-ignoring ranks included."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid

from tests.conftest import processes_with

GUARD = [sys.executable, "-m", "dsl.launcher.host.guard", "--grace-s=1", "--"]


def _wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_exit_code_of_command_is_passed_on():
    assert subprocess.run([*GUARD, "sh", "-c", "exit 7"]).returncode == 7
    assert subprocess.run([*GUARD, "sh", "-c", "kill -9 $$"]).returncode == 128 + 9


def test_orphan_in_its_own_session_is_killed_when_command_ends():
    marker = f"orphan-{uuid.uuid4().hex}"
    # The command starts a detached grandchild in a new session (as torchrun does with ranks),
    # then exits at once: the grandchild would outlive it without the guard.
    script = f"setsid sleep 300 {marker} </dev/null >/dev/null 2>&1 & sleep 0.3; exit 0"
    started = time.monotonic()
    code = subprocess.run([*GUARD, "sh", "-c", script], timeout=30).returncode
    assert code == 0
    assert processes_with(marker) == []
    assert time.monotonic() - started < 5


def test_sigterm_stops_every_descendant_even_one_ignoring_sigterm():
    marker = f"stubborn-{uuid.uuid4().hex}"
    stubborn = f"import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)  # {marker}"
    script = (f"setsid {sys.executable} -c '{stubborn}' & "
              f"sleep 300 {marker} & wait")
    guard = subprocess.Popen([*GUARD, "sh", "-c", script])
    assert _wait_for(lambda: len(processes_with(marker)) >= 2, 10)
    guard.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert guard.wait(timeout=10) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 3  # grace 1 s, then SIGKILL
    assert _wait_for(lambda: processes_with(marker) == [], 2)


def test_usr1_reaches_the_command_and_the_guard_goes_on(tmp_path):
    ready, got = tmp_path / "ready", tmp_path / "got"
    program = (f"import signal, time, pathlib\n"
               f"signal.signal(signal.SIGUSR1, lambda *a: pathlib.Path({str(got)!r}).write_text('usr1'))\n"
               f"pathlib.Path({str(ready)!r}).write_text('')\n"
               f"deadline = time.time() + 20\n"
               f"while not pathlib.Path({str(got)!r}).exists() and time.time() < deadline: time.sleep(0.05)\n")
    guard = subprocess.Popen([*GUARD, sys.executable, "-c", program])
    assert _wait_for(ready.exists, 10)
    guard.send_signal(signal.SIGUSR1)
    assert guard.wait(timeout=20) == 0  # the guard survived USR1 and passed on the exit code
    assert got.read_text() == "usr1"
