"""The mpi backend: run the plan's one `mpirun` here and map its tagged output to host:rank.

mpirun (with `--tag-output`) prefixes every rank line `[JOB,RANK]<stdout>:`; the adapter turns
that into dsl's canonical `[dsl:RANK:LOCAL] ` line of the rank's host. When a rank fails, mpirun
stops every other rank itself and reports "Process name: [[JOB,1],RANK] ... Exit code: N"; the
adapter turns that report into the failure record the supervisor reads. mpirun runs under the
guard like any other local command, so a stop or a crash of `dsl launch` leaves nothing.
"""

from __future__ import annotations

import json
import re
from typing import Sequence

from dsl.launcher.backends import Sink
from dsl.launcher.backends.local import LocalProcess
from dsl.launcher.plan import GUARD_GRACE_S, HostLaunch, LaunchPlan

_TAGGED = re.compile(r"^\[\d+,(\d+)\]<(stdout|stderr)>: ?(.*)$", re.DOTALL)
_PROCESS = re.compile(r"Process name:\s*\[\[\d+,\d+\],(\d+)\]")
_EXIT = re.compile(r"Exit code:\s*(-?\d+)")
_SIGNAL = re.compile(r"exited on signal (\d+) \((\w+)\)")


class MpiOutput:
    """Sink adapter: tagged rank lines -> canonical rank lines; mpirun's report -> a failure."""

    def __init__(self, plan: LaunchPlan, sink: Sink):
        self._sink = sink
        self._host_of = {}
        self._local_of = {}
        for launch in plan.hosts:
            for local, rank in enumerate(launch.ranks):
                self._host_of[rank], self._local_of[rank] = launch.host, local
        self._failed_rank: int | None = None

    def __call__(self, _host: str, stream: str, line: str) -> None:
        match = _TAGGED.match(line)
        if match:
            rank = int(match.group(1))
            self._sink(self._host_of.get(rank, "mpirun"), match.group(2),
                       f"[dsl:{rank}:{self._local_of.get(rank, 0)}] {match.group(3)}")
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
            self._sink("mpirun", "stderr", "[dsl-agent] " + json.dumps(report))
            self._failed_rank = None


class MpiBackend:
    name = "mpi"

    def start(self, plan: LaunchPlan, sink: Sink) -> Sequence[LocalProcess]:
        submit = plan.submit
        guarded = HostLaunch(
            host="mpirun", node_rank=-1, ranks=(), slots=(), cwd=submit.cwd, env=submit.env,
            argv=(plan.hosts[0].argv[0], "-m", "dsl.launcher.guard", f"--grace-s={GUARD_GRACE_S:g}",
                  "--", *submit.argv))
        return [LocalProcess(guarded, MpiOutput(plan, sink))]
