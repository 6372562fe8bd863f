"""Time limits on this machine, for real: SIGUSR1 to a job's guard, `dsl launch --time-limit`,
2 gloo ranks of the bundled trainer (tiny preset) or a user script, through `dsl launch`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import DSL, processes_with, run_dsl
from tests.integration.multihost import SCRIPT, Lines

pytestmark = pytest.mark.integration


def _train_spec(folder: Path, steps: int, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "job.yaml"
    spec.write_text(f"name: tl\nrun:\n  train:\n    steps: {steps}\n    log_every: 10\n"
                    f"    model: {{preset: tiny}}\nresources:\n  procs_per_node: 2\n{extra}"
                    f"engine: {{micro_batch: 4}}\noutput_dir: {folder / 'out'}\n")
    return spec


def _start(*args: str) -> tuple[subprocess.Popen, Lines]:
    proc = subprocess.Popen([*DSL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, Lines(proc)


def _job_process(out: Path, module: str) -> psutil.Process:
    found = [p for p in processes_with(str(out)) if p.cmdline()[1:3] == ["-m", module]]
    assert len(found) == 1, found
    return found[0]


def test_one_sigusr1_to_the_guard_checkpoints_every_rank_exits_75_and_a_relaunch_resumes(tmp_path):
    out = tmp_path / "out"
    dsl, lines = _start("launch", str(_train_spec(tmp_path, steps=100_000)))
    try:
        lines.wait_for("step 20/100000", timeout_s=120)
        _job_process(out, "dsl.launcher.host.guard").send_signal(signal.SIGUSR1)
        code = dsl.wait(timeout=60)
        stderr = dsl.stderr.read()
    finally:
        dsl.kill()
    assert code == 75, stderr[-3000:]
    step = int(re.search(r"\[localhost:0\] dsl\.engine\.train: SIGUSR1 received: checkpointed step (\d+) "
                         r"to \S+; exiting with code 75", stderr).group(1))
    assert "stopped at a time-limit signal after every rank checkpointed (exit 75)" in stderr
    assert step >= 20
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == f"step-{step:06d}"
    report = next(json.loads(line.split("[dsl-agent] ", 1)[1])
                  for line in (out / "logs/localhost.agent.log").read_text().splitlines()
                  if "[dsl-agent] " in line)
    assert report["event"] == "checkpointed" and 75 in report["failures"].values()
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == step
    assert processes_with(str(out)) == []

    # The next launch of the same spec (a few more steps) resumes from that checkpoint.
    proc = run_dsl("launch", str(_train_spec(tmp_path, steps=step + 5)), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {checkpoints} at step {step} " in proc.stderr
    rows = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    after = rows[rows.index(step) + 1:]  # the stop step's row, then the resumed run's
    assert after[-1] == step + 5 and all(step < r <= step + 5 for r in after)


def test_time_limit_flag_warns_the_ranks_before_the_limit(tmp_path):
    spec = _train_spec(tmp_path, steps=100_000, extra="  slurm: {signal_before_end_s: 15}\n")
    started = time.monotonic()
    proc = run_dsl("launch", str(spec), "--time-limit", "30s", timeout=90)
    elapsed = time.monotonic() - started
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert "time limit 30s: 15 s left; asking every rank to checkpoint (SIGUSR1)" in proc.stderr
    step = int(re.search(r"SIGUSR1 received: checkpointed step (\d+)", proc.stderr).group(1))
    assert (tmp_path / "out/checkpoints/latest").read_text().strip() == f"step-{step:06d}"
    assert 14 < elapsed < 30


def test_time_limit_stops_a_script_at_the_limit_after_its_own_handler_saw_the_warning(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: tls\nrun:\n  script: {SCRIPT}\n  args: [--keep-on-usr1, --sleep, '300']\n"
                    f"resources:\n  procs_per_node: 2\n  slurm: {{signal_before_end_s: 5}}\n"
                    f"output_dir: {tmp_path / 'out'}\n")
    proc = run_dsl("launch", str(spec), "--time-limit", "15s", timeout=60)
    assert proc.returncode == 124, proc.stderr[-3000:]
    assert proc.stdout.count("GOT USR1") == 2  # once per rank: the script went on after it
    assert "reached its time limit (15s); every rank still running was stopped (exit 124)" in proc.stderr
    assert processes_with(str(tmp_path / "out")) == []


def test_a_burst_of_sigusr1_to_guard_and_agent_reaches_a_script_that_keeps_running(tmp_path):
    """What Slurm does: the signal to every process of the step (guard, agent, ranks), plus
    dsl's own forwarding. The old agent imported psutil inside its handler and crashed when a
    second signal came during that import."""
    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: burst\nrun:\n  script: {SCRIPT}\n  args: [--keep-on-usr1, --sleep, '8']\n"
                    f"resources:\n  procs_per_node: 2\noutput_dir: {tmp_path / 'out'}\n")
    dsl, lines = _start("launch", str(spec))
    try:
        lines.wait_for("SLEEPING", count=2, timeout_s=120)
        agent = _job_process(tmp_path / "out", "dsl.launcher.host.elastic")
        guard = _job_process(tmp_path / "out", "dsl.launcher.host.guard")
        for _ in range(30):
            os.kill(agent.pid, signal.SIGUSR1)
            os.kill(guard.pid, signal.SIGUSR1)
            time.sleep(0.002)
        code = dsl.wait(timeout=60)
        stderr = dsl.stderr.read()
    finally:
        dsl.kill()
    assert code == 0, stderr[-3000:]
    got = [line for line in lines.lines if "GOT USR1" in line]
    assert sorted(line.split("]")[0] for line in got) == ["[localhost:0", "[localhost:1"]  # once each
    assert sum("DONE" in line for line in lines.lines) == 2
    assert "Traceback" not in stderr and "partially initialized" not in stderr
