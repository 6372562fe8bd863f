"""The mpi backend: run the plan's one `mpirun` here and map its tagged output to host:rank.

Every rank line arrives through mpirun already prefixed `[dsl:RANK:LOCAL] ` (by
`dsl.launcher.host.mpirank`); the adapter attributes it to the rank's host. When a rank fails, mpirun
stops every other rank itself and reports "Process name: [[JOB,1],RANK] ... Exit code: N"; the
adapter turns that report into the failure record the supervisor reads. mpirun runs under the
guard like any other local command, so a stop or a crash of `dsl launch` leaves nothing.
"""

from __future__ import annotations

import re
from typing import Sequence

from dsl.engine import wire
from dsl.launcher.backends import Backend, Sink
from dsl.launcher.backends.local import LocalProcess
from dsl.launcher.plan import GUARD_GRACE_S, HostLaunch, Job, LaunchPlan

_PROCESS = re.compile(r"Process name:\s*\[\[\d+,\d+\],(\d+)\]")
_EXIT = re.compile(r"Exit code:\s*(-?\d+)")
_SIGNAL = re.compile(r"exited on signal (\d+) \((\w+)\)")


class MpiOutput:
    """Sink adapter: rank lines -> their host; mpirun's failure report -> a failure record."""

    def __init__(self, plan: LaunchPlan, sink: Sink):
        self._sink = sink
        self._host_of = {rank: launch.host for launch in plan.hosts for rank in launch.ranks}
        self._failed_rank: int | None = None

    def __call__(self, _host: str, stream: str, line: str) -> None:
        match = wire.RANK_LINE.match(line)
        if match:
            self._sink(self._host_of.get(int(match.group(1)), "mpirun"), stream, line)
            return
        self._sink("mpirun", stream, line)
        process = _PROCESS.search(line)
        if process:
            self._failed_rank = int(process.group(1))
        signal = _SIGNAL.search(line)
        code = _EXIT.search(line)
        if self._failed_rank is not None and (code or signal):
            exitcode = -int(signal.group(1)) if signal else int(code.group(1))
            report = {"event": "failed", "rank": self._failed_rank, "exitcode": exitcode,
                      "signal": f"SIG{signal.group(2)}" if signal and not signal.group(2).startswith("SIG")
                      else (signal.group(2) if signal else None)}
            self._sink("mpirun", "stderr", wire.agent_line(report))
            self._failed_rank = None


class MpiBackend(Backend):
    """A hostfile's hosts; one mpirun here starts every rank (over ssh), launcher/mpi.py renders it."""

    name = "mpi"
    preflight_before_start = True

    def render(self, job: Job, hosts) -> LaunchPlan:
        from dsl.launcher.mpi import render_plan

        return render_plan(job, hosts)

    def preflight_runner(self, plan):
        from dsl.launcher.preflight import ssh_runner

        return ssh_runner(plan)

    def start(self, plan: LaunchPlan, sink: Sink) -> Sequence[LocalProcess]:
        submit = plan.submit
        guarded = HostLaunch(
            host="mpirun", node_rank=-1, ranks=(), slots=(), cwd=submit.cwd, env=submit.env,
            argv=(plan.hosts[0].python, "-m", "dsl.launcher.host.guard", f"--grace-s={GUARD_GRACE_S:g}",
                  "--", *submit.argv))
        return [LocalProcess(guarded, MpiOutput(plan, sink))]
