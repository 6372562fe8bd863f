"""Time limits on the test cluster: SIGUSR1 to a remote guard and `--time-limit` over ssh, and a
real Slurm time limit (`time_min: 1`, `signal_before_end_s: 30`, `requeue: true`) hit twice.

Slurm's timing, as measured on this cluster: slurmctld checks time limits every 30 s, so with a
60 s limit the `--signal=USR1@30` comes 0-30 s after a run starts (once 1 s after, once 27 s);
a requeued job is held (Reason=BeginTime) for the credential lifetime + 1 s, 121 s by default.
The Slurm test moves a requeued job's begin time to now (`scontrol update StartTime=now`, as an
administrator may) instead of waiting those 2 x 121 s, and after the second requeue it shortens
the run to 3 more steps in the job's resolved spec, the file every run reads, so that the third
run finishes however early Slurm's signal came. It takes about 1.5-3 minutes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.integration.multihost import (dsl_argv, job_processes, run_dsl_on_head, wait_until,
                                         write_spec)

pytestmark = pytest.mark.integration

TRAIN = "  train: {steps: 100000, log_every: 10, model: {preset: tiny}}"


class Streams:
    """A running dsl's stdout and stderr, collected in the background."""

    def __init__(self, proc: subprocess.Popen):
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [threading.Thread(target=self._read, args=(s, b), daemon=True)
                         for s, b in ((proc.stdout, self.out), (proc.stderr, self.err))]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = re.search(pattern, "".join(self.out + self.err), re.M)
            if match:
                return match
            time.sleep(0.1)
        raise AssertionError(f"never saw {pattern!r}; got:\n{''.join(self.err)[-3000:]}")

    def text(self) -> tuple[str, str]:
        for thread in self._threads:
            thread.join(5)
        return "".join(self.out), "".join(self.err)


def _start(cluster, *args: str) -> tuple[subprocess.Popen, Streams]:
    proc = subprocess.Popen(dsl_argv(cluster, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **cluster.env()})
    return proc, Streams(proc)


def _latest_step(out: Path) -> int:
    return int((out / "checkpoints/latest").read_text().strip().split("-")[1])


def _no_job_left(cluster, marker: str) -> bool:
    return all(not pids for pids in job_processes(cluster, marker).values())


def test_ssh_sigusr1_to_one_remote_guard_checkpoints_every_rank_of_both_hosts(cluster, tmp_path):
    spec = write_spec(cluster, tmp_path, "ssh", TRAIN)
    out = tmp_path / "out"
    dsl, streams = _start(cluster, "launch", str(spec))
    try:
        streams.wait_for(r"step 20/100000", 180)
        guards = [pid for pid in job_processes(cluster, str(out))["node2"]
                  if psutil.Process(pid).cmdline()[1:3] == ["-m", "dsl.launcher.host.guard"]]
        assert len(guards) == 1
        os.kill(guards[0], signal.SIGUSR1)  # node2's guard only: the ranks agree at the step's end
        code = dsl.wait(timeout=90)
    finally:
        dsl.kill()
    stdout, stderr = streams.text()
    assert code == 75, stderr[-3000:]
    step = int(re.search(r"\[node1:0\] dsl\.engine\.train: SIGUSR1 received: checkpointed step (\d+)",
                         stderr).group(1))
    assert _latest_step(out) == step
    for host in ("node1", "node2"):  # both hosts' ranks exited 75 after the collective save
        reports = [json.loads(line.split("[dsl-agent] ", 1)[1])
                   for line in (out / f"logs/{host}.agent.log").read_text().splitlines() if "[dsl-agent] " in line]
        assert [r["event"] for r in reports] == ["checkpointed"], host
    assert "stopped at a time-limit signal after every rank checkpointed (exit 75)" in stderr
    assert wait_until(lambda: _no_job_left(cluster, str(out)), 10)

    spec.write_text(spec.read_text().replace("steps: 100000", f"steps: {step + 3}"))
    proc = run_dsl_on_head(cluster, "launch", str(spec))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints'} at step {step} " in proc.stderr


def test_ssh_time_limit_warns_remote_ranks_through_the_guards_stdin(cluster, tmp_path):
    spec = write_spec(cluster, tmp_path, "ssh", TRAIN, extra="")
    spec.write_text(spec.read_text().replace("  ssh:\n", "  slurm: {signal_before_end_s: 20}\n  ssh:\n"))
    started = time.monotonic()
    proc = run_dsl_on_head(cluster, "launch", str(spec), "--time-limit", "45s", timeout=120)
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert time.monotonic() - started < 45 + 15  # preflight included
    assert "time limit 45s: 20 s left; asking every rank to checkpoint (SIGUSR1)" in proc.stderr
    step = int(re.search(r"SIGUSR1 received: checkpointed step (\d+)", proc.stderr).group(1))
    assert _latest_step(tmp_path / "out") == step
    assert wait_until(lambda: _no_job_left(cluster, str(tmp_path / "out")), 10)


def _previous_run_gone(job_id: str, marker: str) -> bool:
    """No slurmstepd of the job's earlier run and none of its processes is left on any node.

    Slurm lists a requeued job as PENDING while the old run's steps may still be ending (KillWait);
    started again in that window (the test moves the begin time to now; Slurm's own 121 s hold
    never does), the new run failed at once with no output, twice in full-suite runs."""
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "slurmstepd" in cmdline and f"[{job_id}." in cmdline or marker in cmdline:
            return False
    return True


def _slurm(cluster, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=30,
                          env={**os.environ, **cluster.env()})


def _job(cluster, job_id: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S*)", _slurm(cluster, "scontrol", "show", "job", "-o", job_id).stdout))


def test_slurm_time_limit_checkpoints_requeues_and_resumes_twice_then_finishes(cluster, tmp_path):
    import sys

    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "out"
    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: tlq\nrun:\n{TRAIN}\n  python: {sys.executable}\n  workdir: {tmp_path}\n"
                    f"resources:\n  backend: slurm\n  nodes: 2\n  procs_per_node: 1\n"
                    f"  slurm: {{time_min: 1, signal_before_end_s: 30, requeue: true}}\n"
                    f"output_dir: {out}\n")
    dsl, streams = _start(cluster, "launch", str(spec))
    started = time.monotonic()
    job_id = None
    try:
        job_id = streams.wait_for(r"submitted Slurm job (\d+)", 60).group(1)
        released = 0
        while dsl.poll() is None and time.monotonic() - started < 600:
            job = _job(cluster, job_id)
            restarts = int(job.get("Restarts", "0") or 0)
            if (job.get("JobState") == "PENDING" and job.get("Reason") == "BeginTime" and restarts > released
                    and _previous_run_gone(job_id, str(out))):
                released = restarts
                if restarts == 2:  # the third run: 3 more steps, so it ends before any signal (even under load)
                    resolved = yaml.safe_load((out / "resolved.yaml").read_text())
                    resolved["run"]["train"]["steps"] = _latest_step(out) + 3
                    (out / "resolved.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
                assert _slurm(cluster, "scontrol", "update", f"jobid={job_id}", "StartTime=now").returncode == 0
            time.sleep(0.5)
        code = dsl.wait(timeout=60)
    finally:
        if dsl.poll() is None:
            dsl.send_signal(signal.SIGINT)
            dsl.wait(timeout=30)
        if job_id:
            _slurm(cluster, "scancel", job_id)
    stdout, stderr = streams.text()
    elapsed = time.monotonic() - started
    assert code == 0, f"after {elapsed:.0f} s: {stderr[-4000:]}"
    output = (out / f"slurm-{job_id}.out").read_text()
    stops = [int(s) for s in re.findall(r"SIGUSR1 received: checkpointed step (\d+)", output)]
    resumes = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+) ", output)]
    assert len(stops) >= 2, output[-4000:]
    assert resumes == stops  # every run resumed from the checkpoint of the signal before it
    assert output.count(f"requeueing job {job_id} to resume") == len(stops)
    for restart in range(1, len(stops) + 1):
        assert f"Slurm job {job_id} was requeued (restart {restart})" in stderr
    final = yaml.safe_load((out / "resolved.yaml").read_text())["run"]["train"]["steps"]
    assert re.search(rf"^\[node1:0\] step {final}/{final} \| loss", stdout, re.M), stdout[-2000:]
    assert f"job tlq finished" in stderr
    assert _job(cluster, job_id).get("JobState") == "COMPLETED"
