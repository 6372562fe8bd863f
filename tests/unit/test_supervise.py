"""supervise (launcher/supervise.py) with fake host processes (the HostProcess protocol of
launcher/backends/__init__.py): the first failure wins and stops every other host, a host that
ignores terminate() is killed, SIGINT/SIGTERM stop the job (a second one kills at once), and
max_restarts runs the plan again. No process is started."""

from __future__ import annotations

import os
import signal
import threading
import time
from types import SimpleNamespace

import pytest

from dsl.launcher import supervise as sup
from dsl.launcher.output import Failure
from dsl.launcher.supervise import supervise


class FakeHost:
    """Ends with `code` `after_s` after start (None: runs until stopped). terminate() ends it with
    143 unless `stubborn`; kill() always ends it with 137. Records every call with its time."""

    def __init__(self, host: str, code: int | None = None, after_s: float = 0.0, stubborn: bool = False):
        self.host, self._code, self._after_s, self.stubborn = host, code, after_s, stubborn
        self._at = time.monotonic() + after_s
        self.ended: int | None = None
        self.calls: list[tuple[str, float]] = []

    def restart(self) -> "FakeHost":
        self._at, self.ended = time.monotonic() + self._after_s, None
        return self

    def poll(self) -> int | None:
        if self.ended is None and self._code is not None and time.monotonic() >= self._at:
            self.ended = self._code
        return self.ended

    def terminate(self) -> None:
        self.calls.append(("terminate", time.monotonic()))
        if self.ended is None and not self.stubborn:
            self.ended = 143

    def kill(self) -> None:
        self.calls.append(("kill", time.monotonic()))
        if self.ended is None:
            self.ended = 137

    def wait_output(self, timeout_s: float) -> None:
        pass

    def did(self, name: str) -> list[float]:
        return [at for call, at in self.calls if call == name]


class FakeBackend:
    name = "fake"

    def __init__(self, *hosts: FakeHost):
        self.hosts, self.starts = list(hosts), 0

    def start(self, plan, sink):
        self.starts += 1
        return [h.restart() for h in self.hosts]


class FakeOutput:
    def __init__(self, failures=None, rank_hosts=None):
        self.failures, self.rank_hosts, self.notes = dict(failures or {}), dict(rank_hosts or {}), []

    def note(self, text, ranks=None):
        self.notes.append(text)


def _plan(max_restarts: int = 0):
    return SimpleNamespace(name="job", world_size=4, max_restarts=max_restarts)


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    monkeypatch.setattr(sup, "POLL_S", 0.01)
    monkeypatch.setattr(sup, "STOP_TIMEOUT_S", 0.3)


def test_every_host_ending_0_is_success():
    outcome = supervise(_plan(), FakeBackend(FakeHost("a", 0, 0.05), FakeHost("b", 0, 0.1)), FakeOutput())
    assert outcome.ok and outcome.attempts == 1


def test_the_first_failure_wins_and_stops_every_other_host():
    first, second, running = FakeHost("a", 3, 0.05), FakeHost("b", 5, 0.5), FakeHost("c")
    output = FakeOutput({"a": Failure("a", 1, 3, None)}, {1: "a"})
    outcome = supervise(_plan(), FakeBackend(first, second, running), output)
    assert (outcome.exit_code, outcome.failed_host, outcome.failed_rank) == (3, "a", 1)
    assert second.did("terminate") and running.did("terminate") and not first.did("terminate")
    assert second.ended == 143  # stopped before its own failure came


def test_a_host_failing_without_a_report_gives_its_own_code():
    outcome = supervise(_plan(), FakeBackend(FakeHost("a", 9, 0.02), FakeHost("b")), FakeOutput())
    assert (outcome.exit_code, outcome.failed_host, outcome.failed_rank) == (9, "a", None)


def test_a_rank_killed_by_a_signal_is_named_with_its_signal():
    output = FakeOutput({"b": Failure("b", 2, -9, "SIGKILL")}, {2: "b"})
    outcome = supervise(_plan(), FakeBackend(FakeHost("a"), FakeHost("b", 137, 0.02)), output)
    assert (outcome.exit_code, outcome.signal_name, outcome.failed_rank) == (137, "SIGKILL", 2)


def test_a_host_that_ignores_terminate_is_killed_after_the_stop_timeout():
    stubborn = FakeHost("b", stubborn=True)
    outcome = supervise(_plan(), FakeBackend(FakeHost("a", 1, 0.02), stubborn), FakeOutput())
    assert outcome.exit_code == 1
    (asked,), (killed,) = stubborn.did("terminate"), stubborn.did("kill")
    assert 0.25 <= killed - asked < 1.0 and stubborn.ended == 137


def _signal_soon(signum: int, after_s: float) -> threading.Timer:
    timer = threading.Timer(after_s, os.kill, (os.getpid(), signum))
    timer.start()
    return timer


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_every_host_with_128_plus_its_number_and_no_restart(signum):
    hosts = (FakeHost("a"), FakeHost("b"))
    backend = FakeBackend(*hosts)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where pytest was started in the background
    _signal_soon(signum, 0.1)
    outcome = supervise(_plan(max_restarts=3), backend, FakeOutput())
    assert (outcome.exit_code, outcome.interrupted_by) == (128 + signum, signum)
    assert all(h.did("terminate") and h.ended == 143 for h in hosts) and backend.starts == 1
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_a_second_signal_kills_without_waiting(monkeypatch):
    monkeypatch.setattr(sup, "STOP_TIMEOUT_S", 30.0)
    stubborn = FakeHost("a", stubborn=True)
    _signal_soon(signal.SIGINT, 0.1)
    _signal_soon(signal.SIGINT, 0.3)
    started = time.monotonic()
    outcome = supervise(_plan(), FakeBackend(stubborn), FakeOutput())
    assert outcome.exit_code == 130 and stubborn.did("kill") and time.monotonic() - started < 2


def test_max_restarts_runs_the_plan_again_and_marks_each_attempt():
    output = FakeOutput()
    backend = FakeBackend(FakeHost("a", 2, 0.02))
    outcome = supervise(_plan(max_restarts=2), backend, output)
    assert (outcome.exit_code, outcome.attempts, backend.starts) == (2, 3, 3)
    assert output.notes == [f"attempt {i} of job job starts" for i in (1, 2, 3)]
