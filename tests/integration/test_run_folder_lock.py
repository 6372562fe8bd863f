"""Two launches of one spec at once: the second is refused (exit 2, naming the first's host and
pid) before it writes anything; the first runs to the end with its checkpoints and logs whole."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import DSL, run_dsl

pytestmark = pytest.mark.integration


def test_second_launch_into_one_output_dir_is_refused_and_touches_nothing(tmp_path):
    out = tmp_path / "out"
    spec = tmp_path / "job.yaml"
    spec.write_text("name: twice\nrun:\n  train: {steps: 40, log_every: 5, checkpoint_every: 2, "
                    "keep_checkpoints: 2, model: {preset: tiny}}\n"
                    f"resources:\n  procs_per_node: 2\noutput_dir: {out}\n")
    env = {k: v for k, v in os.environ.items() if k != "DSL_DEBUG"}
    first = subprocess.Popen([*DSL, "launch", str(spec)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints/latest").exists():  # the first is training and checkpointing
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.1)
        before = {p: p.stat().st_mtime_ns for p in (out / "resolved.yaml", out / "plan.json")}
        second = run_dsl("launch", str(spec), timeout=120)
        assert first.poll() is None  # the refusal came while the first still ran
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2, second.stderr[-3000:]
    assert "Traceback" not in second.stderr
    assert (f"{spec}:6:13 output_dir: {out} is in use by job twice launched on host "
            f"{socket.gethostname()} (pid {first.pid}, started ") in second.stderr
    assert "launching" not in second.stderr  # nothing started, nothing written
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert first.returncode == 0, stderr[-3000:]
    assert "error" not in stderr.lower()
    assert (out / "checkpoints/latest").read_text().strip() == "step-000040"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-000038", "step-000040"]
    log = (out / "logs/rank0.log").read_text()
    assert log.count("# dsl: attempt 1 of job twice starts") == 1  # one run's lines only
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 8  # steps 5, 10, ... 40, once each
