"""The hang watchdog: a rank that never enters a collective while the others wait in it. dsl
exits 70 within watchdog_s + 10 s of the hang, naming every host:rank with its last step, with
each rank's Python stack (the stuck rank in its sleep, the others in all_reduce), and leaves no
process behind. Locally and on the ssh test cluster."""

from __future__ import annotations

import re
import subprocess
import time
import uuid

import pytest

from tests.conftest import DSL, ROOT, processes_with
from tests.integration.multihost import Lines, job_processes, start_dsl_on_head, wait_until, write_spec

pytestmark = pytest.mark.integration

SCRIPT = ROOT / "tests/integration/scripts/hang_rank.py"
WATCHDOG_S = 10


def _check(code: int, took: float, stderr: str, stdout: str, hosts: tuple[str, str]) -> None:
    assert code == 70, stderr[-3000:]
    assert took < WATCHDOG_S + 10, f"{took:.1f} s\n{stderr[-3000:]}"
    assert f"hung: no rank finished a step for {WATCHDOG_S} s (watchdog_s); every rank was stopped (exit 70)" in stderr
    assert re.search(rf"^  {hosts[0]}:0 step 20, \d+ s ago; last lines:$", stderr, re.M), stderr[-3000:]
    assert re.search(rf"^  {hosts[1]}:1 step 20, \d+ s ago; last lines:$", stderr, re.M)
    both = stdout + stderr
    # faulthandler's dumps, through the guards: the stuck rank in its sleep, the other in all_reduce
    assert re.search(rf"^\[{hosts[1]}:1\]   File .*hang_rank.py\", line \d+ in stuck_here$", both, re.M), both[-4000:]
    assert re.search(rf"^\[{hosts[0]}:0\]   File .*distributed_c10d.py\", line \d+ in all_reduce$", both, re.M)
    assert "[dsl-beat]" not in both  # heartbeats are neither printed nor logged


def _until_stopped(dsl: subprocess.Popen, hanging: str) -> tuple[int, float, str, str]:
    """(exit code, seconds from the hang to the exit, stderr, stdout) of a dsl launch whose rank
    prints `hanging` when it stops advancing."""
    lines = Lines(dsl)
    try:
        lines.wait_for(hanging, timeout_s=120)
        hung_at = time.monotonic()
        code = dsl.wait(timeout=120)
        took = time.monotonic() - hung_at
        stderr = dsl.stderr.read()
    finally:
        if dsl.poll() is None:
            dsl.kill()
    return code, took, stderr, "".join(lines.lines)


def test_a_hung_rank_locally(tmp_path):
    marker = f"m-{uuid.uuid4().hex}"
    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: hang\nrun:\n  script: {SCRIPT}\n  args: ['--hang-at', '20']\n"
                    f"resources:\n  procs_per_node: 2\noutput_dir: {tmp_path / marker}\n"
                    f"watchdog_s: {WATCHDOG_S}\n")
    dsl = subprocess.Popen([*DSL, "launch", str(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    code, took, stderr, stdout = _until_stopped(dsl, "[localhost:1] HANGING NOW")
    _check(code, took, stderr, stdout, ("localhost", "localhost"))
    assert "in stuck_here" in (tmp_path / marker / "logs/rank1.log").read_text()
    assert wait_until(lambda: not processes_with(marker), 10)


def test_a_hung_rank_on_two_hosts_over_ssh(cluster, tmp_path):
    run = f"  script: {SCRIPT}\n  args: ['--hang-at', '20']"
    spec = write_spec(cluster, tmp_path, "ssh", run, extra=f"watchdog_s: {WATCHDOG_S}\n")
    dsl = start_dsl_on_head(cluster, "launch", str(spec))
    code, took, stderr, stdout = _until_stopped(dsl, "[node2:1] HANGING NOW")
    _check(code, took, stderr, stdout, ("node1", "node2"))
    assert wait_until(lambda: all(not pids for pids in job_processes(cluster, str(tmp_path)).values()), 15)
