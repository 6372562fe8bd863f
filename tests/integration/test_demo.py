"""The demo a new user runs first (`make demo`): a real 2-rank training, and Ctrl-C during it."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import pytest

from tests.conftest import DSL, ROOT, processes_with, run_dsl

pytestmark = pytest.mark.integration
DEMO = ROOT / "configs/tiny-cpu.yaml"


def test_demo_trains_two_ranks_and_loss_falls(tmp_path):
    proc = run_dsl("launch", str(DEMO), cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = re.findall(r"^\[localhost:0\] step (\d+)/300 \| loss ([0-9.]+)", proc.stdout, re.M)
    assert [int(s) for s, _ in steps][-1] == 300 and len(steps) == 15
    losses = [float(loss) for _, loss in steps]
    assert losses[-1] < 0.5 * losses[0]
    run = tmp_path / "runs/tiny-cpu"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 300 and metrics[-1]["loss"] == pytest.approx(losses[-1], abs=1e-4)
    assert "2 rank(s)" in proc.stdout + proc.stderr and "world size" in proc.stdout
    assert (run / "logs/rank0.log").exists() and (run / "logs/rank1.log").exists()
    assert (run / "resolved.yaml").exists() and json.loads((run / "plan.json").read_text())["world_size"] == 2
    assert "finished" in proc.stderr


def test_ctrl_c_during_the_demo_leaves_no_rank(tmp_path):
    marker = str(tmp_path)  # the run folder is on every rank's command line
    dsl = subprocess.Popen([*DSL, "launch", str(DEMO)], cwd=tmp_path, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        for line in dsl.stdout:
            if re.match(r"^\[localhost:0\] step \d+/", line):
                break
        starters = ("dsl.launcher.host.guard", "dsl.launcher.host.elastic")
        ranks = [p for p in processes_with(marker)
                 if not any(s in " ".join(p.cmdline()) for s in starters)]
        assert len(ranks) == 2  # both ranks are really running now
        dsl.send_signal(signal.SIGINT)
        sent = time.monotonic()
        assert dsl.wait(timeout=15) == 130
        assert time.monotonic() - sent < 5
        assert processes_with(marker) == []
    finally:
        dsl.kill()
