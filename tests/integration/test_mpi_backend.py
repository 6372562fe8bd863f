"""backend: mpi on the test cluster: OpenMPI's mpirun over ssh into two host namespaces."""

from __future__ import annotations

import json
import re
import signal
import time
import uuid

import pytest

from tests.integration.multihost import (Lines, job_processes, run_dsl_on_head, script_run,
                                         start_dsl_on_head, wait_until, write_spec)

pytestmark = pytest.mark.integration


def test_bundled_engine_trains_across_two_hosts(cluster, tmp_path):
    spec = write_spec(cluster, tmp_path, "mpi", "  train: {steps: 30, log_every: 10}")
    proc = run_dsl_on_head(cluster, "launch", str(spec))
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"^\[node1:0\] step \d+/30 \| loss ([0-9.]+)", proc.stdout, re.M)]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert (tmp_path / "out/mpi-hostfile").read_text() == "node1 slots=1\nnode2 slots=1\n"


def test_ompi_environment_becomes_torchrun_environment(cluster, tmp_path):
    spec = write_spec(cluster, tmp_path, "mpi", script_run(), slots=2)
    proc = run_dsl_on_head(cluster, "launch", str(spec))
    assert proc.returncode == 0, proc.stderr[-3000:]
    envs = {int(m.group(2)): (m.group(1), json.loads(m.group(3)))
            for m in re.finditer(r"^\[(node\d):(\d+)\] ENV (.*)$", proc.stdout, re.M)}
    assert {r: h for r, (h, _) in envs.items()} == {0: "node1", 1: "node1", 2: "node2", 3: "node2"}
    for rank, (_, env) in envs.items():
        assert env["RANK"] == str(rank) and env["WORLD_SIZE"] == "4"
        assert env["LOCAL_RANK"] == str(rank % 2) and env["LOCAL_WORLD_SIZE"] == "2"
        assert env["NODE_RANK"] == env["GROUP_RANK"] == str(rank // 2)
        assert env["MASTER_ADDR"] == "node1"
    assert re.findall(r"ALLREDUCE (\d+)", proc.stdout) == ["10"] * 4


def test_failing_rank_stops_the_job_and_is_named(cluster, tmp_path):
    marker = f"mpif-{uuid.uuid4().hex}"
    spec = write_spec(cluster, tmp_path, "mpi",
                      script_run("--fail-rank", "1", "--code", "3", "--sleep", "300", "--marker", marker))
    started = time.monotonic()
    proc = run_dsl_on_head(cluster, "launch", str(spec))
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "rank 1 on node2 exited with code 3" in proc.stderr
    assert time.monotonic() - started < 60
    assert wait_until(lambda: not any(job_processes(cluster, marker).values()), 5)


def test_sigint_leaves_nothing_on_any_host(cluster, tmp_path):
    marker = f"mpii-{uuid.uuid4().hex}"
    spec = write_spec(cluster, tmp_path, "mpi", script_run("--sleep", "300", "--marker", marker))
    job = start_dsl_on_head(cluster, "launch", str(spec))
    Lines(job).wait_for("SLEEPING", count=2)
    job.send_signal(signal.SIGINT)
    sent = time.monotonic()
    assert job.wait(timeout=30) == 130
    assert time.monotonic() - sent < 5
    assert wait_until(lambda: not any(job_processes(cluster, marker).values()), 5), \
        job_processes(cluster, marker)
