"""Run a LaunchPlan on a backend and watch it until it ends: fail fast, signals, restarts.

- If any host's command exits non-zero (its rank starter already stopped that host's other
  ranks), every other host is told to stop at once (SIGTERM to its guard, which SIGKILLs what is
  left after its grace period); the job's exit code is the failing rank's exit code.
- SIGINT/SIGTERM to `dsl launch` stops every host of this job the same way (a second Ctrl-C kills
  at once) and the exit code is 130/143, like a shell's.
- `max_restarts: N` runs the whole plan again after a failure (not after an interrupt, a time
  limit or a checkpoint at a warning signal), up to N times; each attempt is marked in the logs.
- A host that exits EXIT_CHECKPOINTED (75: its ranks checkpointed at a time-limit warning and
  stopped, launcher/host/elastic.py) is not a failure: the other hosts, which took part in the same
  collective checkpoint, get CHECKPOINTED_WAIT_S to exit too (then they are stopped), and the job
  ends with 75 ("launch again to resume"; Slurm with `requeue: true` requeues it by itself).
- `dsl launch --time-limit` (local and ssh backends; `TimeLimit`): `warn_before_s` before the
  limit every host's guard gets SIGUSR1 (local: the signal; ssh: a `signal USR1` line on its
  stdin), which it passes to every rank, as Slurm's `--signal=USR1@N` does; at the limit every
  rank still running is stopped and the job ends with EXIT_TIME_LIMIT (124, as GNU `timeout`).
  The limit counts from when the job first starts, across restarts, like a Slurm job's.
- A host that stops answering ssh keepalives (launcher/backends/ssh.py) is lost: the job is
  stopped, the host named, and the exit code is EXIT_LOST_HOST (255, as ssh's). When a rank
  fails on one host while another host's keepalive is unanswered, dsl waits for that host's
  dead-peer timeout first: a partitioned host makes its peers' collectives fail, and the host
  that went silent first is the cause, not the ranks that errored afterwards.
- Hang watchdog (`watchdog_s`, local and ssh): ranks send a heartbeat per step
  (engine/wire.py); when none has come from any rank for watchdog_s, dsl names every rank with
  its last step, has each print its Python stack (faulthandler, through the guards), stops the
  job and exits EXIT_HUNG (70). It starts with the first heartbeat, so a script that sends none
  is never judged hung. No restart after a hang (it would most likely hang again).
- A rank's log that dsl cannot write (a full disk; `RankOutput.write_error`) stops every rank and
  the job ends with EXIT_WRITE_FAILED (74, as a rank whose checkpoint or metrics write failed:
  engine/writefail.py); neither is restarted, the disk would still be full.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from dataclasses import dataclass
from typing import Sequence

from dsl.engine.wire import EXIT_CHECKPOINTED
from dsl.engine.errors import UserError
from dsl.engine.writefail import EXIT_WRITE_FAILED
from dsl.launcher.backends import Backend, HostProcess, get_backend, time_limit_backends
from dsl.launcher.output import RankOutput
from dsl.launcher.plan import GUARD_GRACE_S, LaunchPlan
from dsl.launcher.spec import SpecFile, check_warning_time, warning_before_end_s

log = logging.getLogger(__name__)

POLL_S = 0.05
# The guard needs GUARD_GRACE_S to escalate to SIGKILL; past this the backend kills it itself.
STOP_TIMEOUT_S = GUARD_GRACE_S + 1.5
# After one host exited 75 the others finish the same checkpoint and exit within seconds.
CHECKPOINTED_WAIT_S = 30.0
EXIT_TIME_LIMIT = 124
EXIT_LOST_HOST = 255  # OpenSSH's client's code when the connection fails
EXIT_HUNG = 70  # sysexits' EX_SOFTWARE: the job stopped making progress (watchdog_s)
DUMP_WAIT_S = 3.0  # after asking for the stacks, for them to arrive (over ssh too)


@dataclass
class Outcome:
    exit_code: int
    attempts: int
    failed_host: str | None = None
    failed_rank: int | None = None
    signal_name: str | None = None
    interrupted_by: int | None = None
    checkpointed: bool = False
    """Every rank checkpointed at a warning signal and stopped (exit 75): resume by launching again."""
    timed_out: bool = False
    """--time-limit ran out: the ranks still running were stopped."""
    hung: list[tuple[str, int, int, float, list[str]]] | None = None
    """No rank finished a step for watchdog_s: per rank (host, rank, last step, seconds since,
    its last lines before the stack dump), exit 70."""
    lost: str | None = None
    """failed_host stopped answering (ssh keepalives) or its connection closed: why (exit 255)."""
    write_error: str | None = None
    """dsl could not write a rank's log (a full disk): the job was stopped (exit 74)."""
    detail: str | None = None
    """What the failed host's process says about its end (a Slurm job's end state)."""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True)
class TimeLimit:
    """`dsl launch --time-limit`: stop the job `limit_s` after it starts, warning every rank with
    SIGUSR1 `warn_before_s` earlier (None: no warning)."""

    limit_s: float
    warn_before_s: float | None
    text: str
    """The limit as the user wrote it, for messages."""


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_UNIT_S = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration_s(text: str) -> float:
    """`2h`, `90m`, `1h30m`, `45s`, `1d`; a bare number is minutes (as Slurm's --time).
    Raises ValueError."""
    value = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        seconds = float(value) * 60
    elif value and _DURATION.sub("", value) == "":
        seconds = sum(float(n) * _UNIT_S[u] for n, u in _DURATION.findall(value))
    else:
        raise ValueError(f"{text!r} is not a duration; write e.g. 2h, 90m, 1h30m, 45s")
    if seconds <= 0:
        raise ValueError(f"{text!r}: a time limit must be longer than 0 s")
    return seconds


def time_limit_of(spec_file: SpecFile, text: str, backend: str) -> TimeLimit:
    """The TimeLimit of `--time-limit TEXT` for this spec. Raises UserError (exit 2) for a bad
    duration, a backend without it, or a warning due before the job starts (located)."""
    try:
        limit_s = parse_duration_s(text)
    except ValueError as exc:
        raise UserError(f"--time-limit: {exc}") from None
    hint = get_backend(backend).time_limit_hint
    if hint is not None:
        raise UserError(f"{spec_file.where('resources', 'backend')}: --time-limit applies to backends "
                        f"{_and(time_limit_backends())}, not {backend}; {hint}")
    check_warning_time(spec_file, limit_s, f"--time-limit {text} ({limit_s:g} s)", None)
    warn_s = warning_before_end_s(spec_file.spec)
    return TimeLimit(limit_s, float(warn_s) if warn_s is not None else None, text)


def _and(words: list[str]) -> str:
    return " and ".join(words) if len(words) < 3 else ", ".join(words[:-1]) + " and " + words[-1]


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


def supervise(plan: LaunchPlan, backend: Backend, output: RankOutput,
              time_limit: TimeLimit | None = None) -> Outcome:
    stop = _Stop()
    handled = (signal.SIGINT, signal.SIGTERM)
    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, stop) for s in handled} if in_main else {}
    clock = _Clock(time_limit, time.monotonic())
    try:
        attempt = 0
        while True:
            attempt += 1
            output.note(f"attempt {attempt} of job {plan.name} starts", _ranks_here(plan))
            outcome = _run_attempt(plan, backend, output, stop, attempt, clock)
            if (outcome.ok or outcome.interrupted_by or outcome.checkpointed or outcome.timed_out
                    or outcome.write_error or outcome.exit_code == EXIT_WRITE_FAILED or outcome.hung
                    or attempt > plan.max_restarts):  # a full disk stays full: no restart
                return outcome
            log.warning("job %s failed (exit %d); restart %d of %d", plan.name, outcome.exit_code,
                        attempt, plan.max_restarts)
            output.failures.clear()
            getattr(output, "beats", {}).clear()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ranks_here(plan: LaunchPlan) -> list[int] | range:
    """The ranks this launch starts (pernode: this node's only; their logs get the note)."""
    return [r for h in getattr(plan, "hosts", ()) for r in h.ranks] or range(plan.world_size)


class _Clock:
    """When to warn and when to stop, from the time the job first started (monotonic)."""

    def __init__(self, limit: TimeLimit | None, started: float):
        self.limit = limit
        self.deadline = started + limit.limit_s if limit else None
        self.warn_at = self.deadline - limit.warn_before_s if limit and limit.warn_before_s is not None \
            else None


def _warn(procs: Sequence[HostProcess], clock: _Clock) -> None:
    left = max(0.0, clock.deadline - time.monotonic())
    log.warning("time limit %s: %.0f s left; asking every rank to checkpoint (SIGUSR1)",
                clock.limit.text, left)
    for proc in procs:
        warn = getattr(proc, "warn", None)  # the hosts of backends with a time limit
        if warn is not None and proc.poll() is None:
            warn(signal.SIGUSR1)


def _run_attempt(plan: LaunchPlan, backend: Backend, output: RankOutput, stop: _Stop,
                 attempt: int, clock: _Clock) -> Outcome:
    procs = backend.start(plan, output)
    failed: HostProcess | None = None
    hung = None
    warned = timed_out = False
    checkpointed_at: float | None = None
    while not stop.event.is_set():
        now = time.monotonic()
        if clock.warn_at is not None and not warned and now >= clock.warn_at:
            warned = True  # once per attempt: a restart after the warning time is warned at once
            _warn(procs, clock)
        codes = [p.poll() for p in procs]
        failed = next((p for p, c in zip(procs, codes) if c not in (None, 0, EXIT_CHECKPOINTED)), None)
        if failed is not None or all(c is not None for c in codes):
            break
        if EXIT_CHECKPOINTED in codes:
            checkpointed_at = checkpointed_at or now
            if now - checkpointed_at > CHECKPOINTED_WAIT_S:
                log.warning("a host checkpointed and exited %d %.0f s ago; stopping the hosts still "
                            "running", EXIT_CHECKPOINTED, CHECKPOINTED_WAIT_S)
                break
        hung = _hung(plan, output, now)
        if hung is not None:
            _dump_stacks(procs, hung, plan.watchdog_s, stop)
            break
        write_error = getattr(output, "write_error", None)  # RankOutput's; fakes may lack it
        if write_error is not None:
            log.error("%s; stopping every rank", write_error)
            break
        if clock.deadline is not None and now >= clock.deadline:
            timed_out = True
            log.error("time limit %s reached: stopping every rank", clock.limit.text)
            break
        stop.event.wait(POLL_S)
    if failed is not None and not getattr(failed, "lost", None):
        failed = _lost_before(procs, failed, stop) or failed
    if any(p.poll() is None for p in procs):
        _stop_all(procs, stop)
    for proc in procs:
        proc.wait_output(2.0)

    if stop.event.is_set() and failed is None:
        return Outcome(128 + (stop.signum or signal.SIGINT), attempt, interrupted_by=stop.signum)
    if failed is None and hung is not None:
        return Outcome(EXIT_HUNG, attempt, hung=hung)
    if failed is None and getattr(output, "write_error", None) is not None:
        return Outcome(EXIT_WRITE_FAILED, attempt, write_error=str(output.write_error))
    if failed is None:
        if any(p.poll() == EXIT_CHECKPOINTED for p in procs):
            return Outcome(EXIT_CHECKPOINTED, attempt, checkpointed=True)
        if timed_out:
            return Outcome(EXIT_TIME_LIMIT, attempt, timed_out=True)
        return Outcome(0, attempt)
    lost = getattr(failed, "lost", None)
    if lost:
        return Outcome(EXIT_LOST_HOST, attempt, failed_host=failed.host, lost=lost)
    # mpirun and Slurm report for all hosts through one process: take the first failure seen.
    report = output.failures.get(failed.host) or next(iter(output.failures.values()), None)
    # The failing rank's own code; a scheduler's job code may be a stopped peer's (143).
    code = _shell_code(report.exitcode) if report and report.exitcode else (failed.poll() or 1)
    host = output.rank_hosts.get(report.rank, report.host) if report and report.rank is not None \
        else failed.host
    # A scheduler's end state says more than a rank's code (a Slurm TIMEOUT is 124, whatever
    # signal the ranks died of): backends/slurm.py.
    detail = getattr(failed, "end_detail", None)
    by_state = getattr(failed, "end_exit_code", None)
    if by_state is not None:
        code = by_state
    return Outcome(code, attempt, failed_host=host,
                   failed_rank=report.rank if report else None,
                   signal_name=report.signal if report else None, detail=detail)


def _hung(plan: LaunchPlan, output: RankOutput, now: float) -> list | None:
    """Per rank (host, rank, last step, seconds since, last lines) when no rank has sent a
    heartbeat for watchdog_s (engine/wire.py); None while one has, or before the first."""
    limit = getattr(plan, "watchdog_s", None)
    beats = dict(getattr(output, "beats", {}))
    if not limit or not beats or now - max(at for _, at in beats.values()) <= limit:
        return None
    return [(output.rank_hosts.get(rank, "?"), rank, step, now - at, list(output.tails.get(rank, []))[-5:])
            for rank, (step, at) in sorted(beats.items())]


def _dump_stacks(procs: Sequence[HostProcess], hung: list, limit_s: float, stop: _Stop) -> None:
    log.error("no rank finished a step for %.0f s (watchdog_s): %s; asking every rank for its "
              "Python stack, then stopping the job", limit_s,
              ", ".join(f"{host}:{rank} at step {step}" for host, rank, step, _, _ in hung))
    for proc in procs:
        dump = getattr(proc, "dump_stacks", None)  # local and ssh hosts
        if dump is not None and proc.poll() is None:
            dump()
    stop.event.wait(DUMP_WAIT_S)


def _lost_before(procs: Sequence[HostProcess], failed: HostProcess, stop: _Stop) -> HostProcess | None:
    """A host that stopped answering before `failed` failed: the cause, rather than the ranks
    that errored when its traffic stopped. Every other host that can (ssh) is sent a keepalive
    now; a host that answers none within its dead-peer timeout is lost, and named instead."""
    probes = {p: p.probe() for p in procs
              if p is not failed and hasattr(p, "probe") and p.poll() is None}
    if not probes:
        return None
    deadline = time.monotonic() + max(p.dead_after_s for p in probes) + 1.0
    said = False
    while time.monotonic() < deadline and not stop.event.is_set():
        for proc in probes:
            if proc.poll() is not None and getattr(proc, "lost", None):
                return proc
        if all(proc.answered_since(at) or proc.poll() is not None for proc, at in probes.items()):
            return None
        if not said and time.monotonic() - min(probes.values()) > 1.0:
            said = True
            log.warning("%s failed; waiting up to %.0f s for an answer from %s before naming the "
                        "cause", failed.host, deadline - time.monotonic(),
                        ", ".join(p.host for p, at in probes.items() if not p.answered_since(at)))
        stop.event.wait(POLL_S)
    return None


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
