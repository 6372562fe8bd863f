"""A small stateful fake of Slurm's client commands (sbatch, squeue, scontrol, sacct, scancel) for
`SlurmJob(run=...)` (launcher/backends/slurm.py), in the manner of submitit's conftest.

The job walks through `timeline`, one entry per `scontrol show job` (or `squeue`) query: each entry
is (state, node list, restarts, lines the job's output file gets at that point). After the last
entry the job stays in `end` with `code`. `forget_after` queries, scontrol no longer knows the job
(Slurm's MinJobAge) and only sacct answers; `scontrol_knows=False` is a job only sacct knows from
the start. scancel moves the job to CANCELLED.
"""

from __future__ import annotations

import subprocess
from pathlib import Path


class FakeSlurm:
    def __init__(self, timeline=(("PENDING", "(null)", 0, ()), ("RUNNING", "n[1-2]", 0, ()),
                                 ("RUNNING", "n[1-2]", 0, ())),
                 end: str = "COMPLETED", code: str = "0:0", *, output: Path | None = None,
                 forget_after: int | None = None, scontrol_knows: bool = True,
                 hostnames: dict[str, list[str]] | None = None, job_id: str = "77"):
        self.timeline = list(timeline)
        self.end, self.code, self.output, self.job_id = end, code, output, job_id
        self.forget_after, self.scontrol_knows = forget_after, scontrol_knows
        self.hostnames = hostnames or {"n[1-2]": ["n1", "n2"]}
        self.calls: list[list[str]] = []
        self.queries = 0
        self.cancelled = False
        self.state, self.nodes, self.restarts = "PENDING", "(null)", 0

    # -- the job's clock ---------------------------------------------------------------------
    def _advance(self) -> None:
        self.queries += 1
        if self.cancelled:
            self.state = "CANCELLED"
            return
        if self.timeline:
            self.state, self.nodes, self.restarts, lines = self.timeline.pop(0)
            if lines and self.output is not None:
                with open(self.output, "a", encoding="utf-8") as handle:
                    handle.writelines(line + "\n" for line in lines)
        else:
            self.state = self.end

    def _exit_code(self) -> str:
        return self.code if self.state == self.end else ("0:15" if self.state == "CANCELLED" else "0:0")

    def _scontrol_answers(self) -> bool:
        return self.scontrol_knows and (self.forget_after is None or self.queries <= self.forget_after)

    # -- the commands ------------------------------------------------------------------------
    def __call__(self, argv, **_kw) -> subprocess.CompletedProcess:
        argv = list(argv)
        self.calls.append(argv)
        out, err, code = "", "", 0
        if argv[0] == "sbatch":
            out = f"{self.job_id}\n" if "--parsable" in argv else f"Submitted batch job {self.job_id}\n"
        elif argv[:3] == ["scontrol", "show", "job"]:
            self._advance()
            if self._scontrol_answers():
                out = (f"JobId={self.job_id} JobState={self.state} Reason=None ExitCode={self._exit_code()} "
                       f"NodeList={self.nodes} Restarts={self.restarts}\n")
            else:
                err, code = "slurm_load_jobs error: Invalid job id specified\n", 1
        elif argv[:3] == ["scontrol", "show", "hostnames"]:
            names = self.hostnames.get(argv[3])
            out, code = ("\n".join(names) + "\n", 0) if names else ("", 1)
        elif argv[0] == "squeue":
            self._advance()
            out = f"{self.state}\n" if self._scontrol_answers() else ""
        elif argv[0] == "sacct":
            out = f"{self.state} |{self._exit_code()}|{self.nodes}\n"
        elif argv[0] == "scancel":
            self.cancelled = True
        else:
            err, code = f"{argv[0]}: command not found\n", 127
        return subprocess.CompletedProcess(argv, code, out, err)

    def ran(self, command: str) -> list[list[str]]:
        return [c for c in self.calls if c[0] == command]
