"""Root cause across hosts (launcher/supervise.py): when a rank fails on one host while another
host's ssh keepalive goes unanswered, the silent host is named, not the ranks that errored
afterwards; a host that answers leaves the blame where it was. Fakes of the ssh backend's
HostProcess (probe / answered_since / lost), driven by time."""

from __future__ import annotations

import time
from types import SimpleNamespace

from dsl.launcher.supervise import EXIT_LOST_HOST, supervise


class _Host:
    def __init__(self, name: str, fail_after_s: float | None = None, silent: bool = False,
                 dead_after_s: float = 1.0):
        self.host, self.dead_after_s, self.silent = name, dead_after_s, silent
        self.started = time.monotonic()
        self._fail_at = None if fail_after_s is None else self.started + fail_after_s
        self.code, self.lost, self.probes = None, None, 0

    def poll(self):
        now = time.monotonic()
        if self.code is None and self._fail_at is not None and now >= self._fail_at:
            self.code = 1  # its rank errored (its peer's traffic stopped)
        if self.code is None and self.silent and now - self.started > self.dead_after_s:
            self.code, self.lost = 255, f"no answer to ssh keepalives for {self.dead_after_s:g} s"
        return self.code

    def probe(self):
        self.probes += 1
        return time.monotonic()

    def answered_since(self, when):
        return not self.silent

    def terminate(self):
        if self.code is None:
            self.code = 143

    kill = terminate

    def wait_output(self, timeout_s):
        pass


class _Output:
    def __init__(self):
        self.failures, self.rank_hosts = {}, {}

    def note(self, text, ranks=None):
        pass


def _run(*hosts):
    backend = SimpleNamespace(start=lambda plan, sink: list(hosts))
    return supervise(SimpleNamespace(name="job", world_size=2, max_restarts=0), backend, _Output())


def test_a_rank_error_after_another_host_went_silent_is_blamed_on_the_silent_host():
    node1, node2 = _Host("node1", fail_after_s=0.3), _Host("node2", silent=True, dead_after_s=1.5)
    outcome = _run(node1, node2)
    assert node2.probes == 1  # asked at once when node1 failed
    assert (outcome.exit_code, outcome.failed_host) == (EXIT_LOST_HOST, "node2")
    assert outcome.lost == "no answer to ssh keepalives for 1.5 s"


def test_a_rank_error_while_every_host_answers_stays_the_rank_errors():
    node1, node2 = _Host("node1", fail_after_s=0.3), _Host("node2")
    started = time.monotonic()
    outcome = _run(node1, node2)
    assert (outcome.exit_code, outcome.failed_host, outcome.lost) == (1, "node1", None)
    assert time.monotonic() - started < 1.5  # no wait for a host that answered


def test_a_guard_that_hears_nothing_from_the_launcher_stops_its_ranks(tmp_path):
    import os
    import subprocess
    import sys

    import psutil

    marker = tmp_path / "child-pid"
    child = f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(300)"
    guard = subprocess.Popen([sys.executable, "-m", "dsl.launcher.host.guard", "--grace-s=1", "--watch-stdin",
                              "--launcher-timeout-s=1.5", "--", sys.executable, "-c", child],
                             stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        started = time.monotonic()
        while not marker.exists() or not marker.read_text():
            time.sleep(0.05)
        guard.stdin.write("ping\n")  # a ping resets the clock; then silence, stdin still open
        guard.stdin.flush()
        code = guard.wait(timeout=20)
        took = time.monotonic() - started
    finally:
        guard.kill()
    assert code == 143  # its command was stopped with SIGTERM, as when stdin closes
    assert 1.5 <= took < 8
    assert "nothing heard from the launcher for 1.5 s" in guard.stderr.read()
    assert not psutil.pid_exists(int(marker.read_text())) or \
        psutil.Process(int(marker.read_text())).status() == psutil.STATUS_ZOMBIE
