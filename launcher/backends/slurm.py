"""The slurm backend: submit the batch script, follow the job, cancel it, return its exit code.

Outside an allocation: `sbatch --parsable SCRIPT` (environment, secrets included, passed on by
sbatch's default `--export=ALL`), then every POLL_S: `scontrol show job -o ID` for the state
and the node list, and the new lines of the job's output file (srun `--label` tags them with the
node's task id, mapped here to the host name). Ctrl-C / a failure elsewhere: `scancel ID`.
When scontrol has forgotten the job (MinJobAge), `sacct` answers. A requeued job (its batch
script requeues itself when every rank checkpointed at the time-limit signal, `requeue: true`)
goes back to PENDING and runs again: it is followed through every run, its output file is
appended to, and each requeue is logged.

Inside an allocation (`SLURM_JOB_ID` set): the same script runs under `bash` here, its srun
output streamed directly (the local backend's process handling).
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from dsl.engine.errors import RunError, UserError
from dsl.launcher.backends import Backend, Sink
from dsl.launcher.backends.local import LocalProcess
from dsl.launcher.plan import Job, LaunchPlan

log = logging.getLogger(__name__)
POLL_S = 0.5
Run = Callable[..., subprocess.CompletedProcess]
_LABEL = re.compile(r"^\s*(\d+): ?(.*)$", re.DOTALL)
_DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, **kwargs)
    except FileNotFoundError:
        raise UserError(f"{argv[0]} not found: backend slurm needs the Slurm client commands") from None


def allocation_hosts(run: Run = _run) -> list[str]:
    import os

    proc = run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]])
    if proc.returncode != 0:
        raise RunError(f"scontrol show hostnames failed: {proc.stderr.strip()}")
    return proc.stdout.split()


def labelled(sink: Sink, hosts: list[str], fallback: str) -> Sink:
    """A sink that turns srun's `TASK: line` into the host of that task (one task per node)."""

    def feed(_host: str, stream: str, line: str) -> None:
        match = _LABEL.match(line)
        if match and int(match.group(1)) < len(hosts):
            sink(hosts[int(match.group(1))], stream, match.group(2))
        else:
            sink(fallback, stream, line)

    return feed


def parse_job(text: str) -> dict[str, str]:
    """`scontrol show job -o` output -> {Key: value}."""
    return dict(re.findall(r"(\w+)=(\S*)", text))


STATE_MEANINGS = {
    "TIMEOUT": "it reached its time limit (--time)",
    "NODE_FAIL": "a node of its allocation failed",
    "OUT_OF_MEMORY": "a process exceeded its memory allocation and was killed",
    "PREEMPTED": "a higher-priority job preempted it",
    "BOOT_FAIL": "a node failed to boot",
    "DEADLINE": "it reached its deadline",
    "CANCELLED": "it was cancelled (scancel, or an administrator)",
    "FAILED": "a step exited with a non-zero code",
}
"""What a Slurm job's end state means, for the failure message (sacct(1) JOB STATE CODES)."""


def state_exit_code(state: str) -> int | None:
    """The exit code a Slurm end state stands for, whatever the batch script's own code: a time
    limit as `dsl launch --time-limit` and GNU timeout (124), a failed node as a lost ssh host
    (255), the out-of-memory killer's SIGKILL (137), preemption's SIGTERM (143)."""
    from dsl.launcher.supervise import EXIT_LOST_HOST, EXIT_TIME_LIMIT

    return {"TIMEOUT": EXIT_TIME_LIMIT, "NODE_FAIL": EXIT_LOST_HOST, "OUT_OF_MEMORY": 128 + 9,
            "PREEMPTED": 128 + 15}.get(state)


def exit_code(state: str, code: str) -> int:
    """Slurm's end state and `ExitCode=N:S` (code, signal) -> a shell-style exit code."""
    by_state = state_exit_code(state)
    if by_state is not None:
        return by_state
    number, _, signal = code.partition(":")
    if signal and signal != "0":
        return 128 + int(signal)
    if int(number or 0) != 0:
        return int(number)
    return 0 if state == "COMPLETED" else 1


class SlurmJob:
    def __init__(self, plan: LaunchPlan, sink: Sink, run: Run = _run):
        import os

        self._run = run
        self._sink = sink
        submit = plan.submit
        proc = run(list(submit.argv), cwd=submit.cwd, env={**os.environ, **submit.env})
        if proc.returncode != 0:
            raise RunError(f"sbatch refused the job: {proc.stderr.strip() or proc.stdout.strip()}")
        self.job_id = proc.stdout.strip().split(";")[0]
        self.host = f"slurm job {self.job_id}"
        log.info("submitted Slurm job %s (squeue -j %s; scancel %s)", self.job_id, self.job_id, self.job_id)
        self._output_pattern = plan.job_output or f"{plan.output_dir}/slurm-%j.out"
        self._code: int | None = None
        self.end_detail: str | None = None
        """Set when the job ends in a state other than COMPLETED: the state and what it means."""
        self.end_exit_code: int | None = None
        """The exit code that end state stands for (`state_exit_code`), when it stands for one."""
        self._hosts: list[str] = []
        self._state = "PENDING"
        self._stop = threading.Event()
        self._follower = threading.Thread(target=self._follow, daemon=True)
        self._follower.start()

    # -- following the job ----------------------------------------------------------------------
    def _output_path(self) -> Path:
        return Path(self._output_pattern.replace("%j", self.job_id))

    def _query(self) -> tuple[str, str, str, int]:
        """(state, exit code, node list, restarts so far) of the job."""
        proc = self._run(["scontrol", "show", "job", "-o", self.job_id])
        if proc.returncode == 0 and proc.stdout.strip():
            job = parse_job(proc.stdout)
            restarts = job.get("Restarts", "0")
            return (job.get("JobState", "UNKNOWN"), job.get("ExitCode", "0:0"), job.get("NodeList", ""),
                    int(restarts) if restarts.isdigit() else 0)
        acct = self._run(["sacct", "-j", self.job_id, "-X", "-n", "-P", "-o", "State,ExitCode,NodeList"])
        if acct.returncode == 0 and acct.stdout.strip():
            state, code, nodes = acct.stdout.strip().splitlines()[0].split("|")
            return state.split()[0], code, nodes, 0
        return "UNKNOWN", "0:0", "", 0

    def _follow(self) -> None:
        offset, pending, announced, runs, nodes_of = 0, b"", None, 0, ""
        while True:
            state, code, nodelist, restarts = self._query()
            if restarts > runs:
                runs = restarts
                log.warning("Slurm job %s was requeued (restart %d); when it runs again it resumes "
                            "from its latest checkpoint", self.job_id, restarts)
            if state != announced:
                log.info("Slurm job %s: %s%s", self.job_id, state, f" on {nodelist}" if nodelist and
                         nodelist != "(null)" else "")
                announced = state
            if nodelist and nodelist != "(null)" and nodelist != nodes_of:
                # A requeued job may run on other nodes: srun's task ids follow the new list.
                nodes_of, self._hosts = nodelist, allocation_hosts_of(nodelist, self._run)
            offset, pending = self._read(offset, pending)
            if state in _DONE or state == "UNKNOWN" and self._stop.is_set():
                offset, pending = self._read(offset, pending)
                if pending:
                    self._emit(pending)
                self._code = exit_code(state, code)
                if state != "COMPLETED":
                    meaning = STATE_MEANINGS.get(state, "see sacct -j " + self.job_id)
                    self.end_detail = f"Slurm job {self.job_id} ended {state}: {meaning}"
                    self.end_exit_code = state_exit_code(state)
                return
            time.sleep(POLL_S)

    def _read(self, offset: int, pending: bytes) -> tuple[int, bytes]:
        path = self._output_path()
        try:
            with open(path, "rb") as handle:
                handle.seek(offset)
                data = handle.read()
        except FileNotFoundError:
            return offset, pending
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            self._emit(line)
        return offset + len(data), pending

    def _emit(self, raw: bytes) -> None:
        labelled(self._sink, self._hosts, self.host)(self.host, "stdout",
                                                     raw.decode("utf-8", errors="replace"))

    # -- HostProcess ----------------------------------------------------------------------------
    def poll(self) -> int | None:
        return self._code

    def terminate(self) -> None:
        self._stop.set()
        proc = self._run(["scancel", self.job_id])
        if proc.returncode != 0:
            log.warning("scancel %s: %s", self.job_id, proc.stderr.strip())

    def kill(self) -> None:
        self._run(["scancel", "--signal=KILL", "--full", self.job_id])

    def wait_output(self, timeout_s: float) -> None:
        self._follower.join(timeout_s)


def allocation_hosts_of(nodelist: str, run: Run = _run) -> list[str]:
    proc = run(["scontrol", "show", "hostnames", nodelist])
    return proc.stdout.split() if proc.returncode == 0 else []


class SlurmBackend(Backend):
    """Slurm chooses the hosts: the job's batch script (launcher/slurm.py) is submitted with
    sbatch, or run with bash inside an allocation; the nodes compute the port and the master."""

    name = "slurm"
    forwards_env_prefixes = False  # sbatch passes the submitting shell's whole environment
    time_limit_hint = "set resources.slurm.time_min (Slurm enforces the limit and sends the warning itself)"

    def __init__(self, run: Run = _run):
        self._run = run

    def check_spec(self, spec_file) -> None:
        from dsl.launcher.slurm import check_gres

        ppn = spec_file.spec.resources.procs_per_node
        if isinstance(ppn, int):
            check_gres(spec_file, ppn)

    def spec_world(self, res):
        ppn = res.procs_per_node
        return ((res.nodes or 1) * ppn, ppn) if isinstance(ppn, int) and not res.hostfile else None

    def resolve_hosts(self, spec_file):
        """Inside an allocation: its hosts. Otherwise placeholders for the nodes sbatch will get."""
        import os

        from dsl.launcher.hosts import Host
        from dsl.launcher.spechosts import in_slurm_allocation

        res = spec_file.spec.resources
        if res.hostfile:
            raise UserError(f"{spec_file.where('resources', 'hostfile')}: with backend slurm, Slurm "
                            "chooses the hosts; remove hostfile (use slurm.constraint or extra_sbatch)")
        nproc = res.procs_per_node if isinstance(res.procs_per_node, int) else \
            (res.slurm.gpus_per_node or 1)
        if in_slurm_allocation():
            names = allocation_hosts(self._run)
            if res.nodes and res.nodes > len(names):
                raise UserError(f"{spec_file.where('resources', 'nodes')}: nodes: {res.nodes} but the "
                                f"allocation {os.environ['SLURM_JOB_ID']} has {len(names)} node(s)")
            names = names[:res.nodes] if res.nodes else names
        else:
            names = [f"slurm-node{i}" for i in range(res.nodes or 1)]
        return [Host(name, tuple(range(nproc))) for name in names], False

    def unknown_hosts(self, spec_file):
        from dsl.launcher.spechosts import in_slurm_allocation

        if in_slurm_allocation():
            return None
        return (f"{spec_file.where('resources', 'backend')}: Slurm has not allocated the hosts "
                "yet; run `dsl probe SPEC` inside an allocation (salloc), or probe a node "
                "with `srun -N1 dsl probe`")

    def hosts_known(self, inputs) -> bool:
        return inputs.in_slurm_allocation

    def master_port(self, spec_file, hold):
        """Decided on the nodes: the spec's port, or one derived from the job id."""
        return spec_file.spec.resources.master_port, None

    def port_note(self, spec_file):
        return None

    def render(self, job: Job, hosts) -> LaunchPlan:
        from dsl.launcher.slurm import render_plan

        return render_plan(job, hosts)

    def where(self, plan) -> str:
        if plan.submit.argv[0] == "bash":
            return super().where(plan)
        return f"{len(plan.hosts)} node(s) Slurm allocates"

    def probe_runner(self, plan):
        from dsl.launcher.remote_probe import srun_runner

        return srun_runner

    def start(self, plan: LaunchPlan, sink: Sink) -> Sequence[object]:
        if plan.submit is None:
            raise RunError("slurm plan without a submit command")
        if plan.submit.argv[0] == "bash":  # inside an allocation: run the script here
            hosts = [h.host for h in plan.hosts]
            return [LocalProcess(plan.submit, labelled(sink, hosts, "srun"))]
        return [SlurmJob(plan, sink, self._run)]
