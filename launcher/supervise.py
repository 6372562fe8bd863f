"""Run a LaunchPlan on a backend and watch it until it ends: fail fast, signals, restarts.

- If any host's command exits non-zero (its rank starter already stopped that host's other
  ranks), every other host is told to stop at once (SIGTERM to its guard, which SIGKILLs what is
  left after its grace period); the job's exit code is the failing rank's exit code.
- SIGINT/SIGTERM to `dsl launch` stops every host of this job the same way (a second Ctrl-C kills
  at once) and the exit code is 130/143, like a shell's.
- `max_restarts: N` runs the whole plan again after a failure (not after an interrupt), up to N
  times; each attempt is marked in the logs.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from typing import Sequence

from dsl.launcher.backends import Backend, HostProcess
from dsl.launcher.output import RankOutput
from dsl.launcher.plan import GUARD_GRACE_S, LaunchPlan

log = logging.getLogger(__name__)

POLL_S = 0.05
# The guard needs GUARD_GRACE_S to escalate to SIGKILL; past this the backend kills it itself.
STOP_TIMEOUT_S = GUARD_GRACE_S + 1.5


@dataclass
class Outcome:
    exit_code: int
    attempts: int
    failed_host: str | None = None
    failed_rank: int | None = None
    signal_name: str | None = None
    interrupted_by: int | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class _Stop:
    """Set by SIGINT/SIGTERM; a second signal asks for an immediate kill."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.force = threading.Event()
        self.event = threading.Event()

    def __call__(self, signum: int, _frame: object) -> None:
        if self.event.is_set():
            self.force.set()
        self.signum = self.signum or signum
        self.event.set()


def supervise(plan: LaunchPlan, backend: Backend, output: RankOutput) -> Outcome:
    stop = _Stop()
    handled = (signal.SIGINT, signal.SIGTERM)
    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, stop) for s in handled} if in_main else {}
    try:
        attempt = 0
        while True:
            attempt += 1
            output.note(f"attempt {attempt} of job {plan.name} starts", range(plan.world_size))
            outcome = _run_attempt(plan, backend, output, stop, attempt)
            if outcome.ok or outcome.interrupted_by or attempt > plan.max_restarts:
                return outcome
            log.warning("job %s failed (exit %d); restart %d of %d", plan.name, outcome.exit_code,
                        attempt, plan.max_restarts)
            output.failures.clear()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_attempt(plan: LaunchPlan, backend: Backend, output: RankOutput, stop: _Stop,
                 attempt: int) -> Outcome:
    procs = backend.start(plan, output)
    failed: HostProcess | None = None
    while not stop.event.is_set():
        codes = [p.poll() for p in procs]
        failed = next((p for p, c in zip(procs, codes) if c not in (None, 0)), None)
        if failed is not None or all(c == 0 for c in codes):
            break
        stop.event.wait(POLL_S)
    if failed is not None or stop.event.is_set():
        _stop_all(procs, stop)
    for proc in procs:
        proc.wait_output(2.0)

    if stop.event.is_set() and failed is None:
        return Outcome(128 + (stop.signum or signal.SIGINT), attempt, interrupted_by=stop.signum)
    if failed is None:
        return Outcome(0, attempt)
    # mpirun and Slurm report for all hosts through one process: take the first failure seen.
    report = output.failures.get(failed.host) or next(iter(output.failures.values()), None)
    # The failing rank's own code; a scheduler's job code may be a stopped peer's (143).
    code = _shell_code(report.exitcode) if report and report.exitcode else (failed.poll() or 1)
    host = output.rank_hosts.get(report.rank, report.host) if report and report.rank is not None \
        else failed.host
    return Outcome(code, attempt, failed_host=host,
                   failed_rank=report.rank if report else None,
                   signal_name=report.signal if report else None)


def _shell_code(exitcode: int) -> int:
    return 128 - exitcode if exitcode < 0 else exitcode


def _stop_all(procs: Sequence[HostProcess], stop: _Stop) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline and not stop.force.is_set():
        if all(p.poll() is not None for p in procs):
            return
        time.sleep(POLL_S)
    for proc in procs:
        if proc.poll() is None:
            log.warning("%s did not stop within %.1f s; killing it", proc.host, STOP_TIMEOUT_S)
            proc.kill()
