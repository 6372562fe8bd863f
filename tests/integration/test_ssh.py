"""backend: ssh on the test cluster: real sshd per host namespace, gloo across namespaces."""

from __future__ import annotations

import json
import re
import signal
import time
import uuid

import psutil
import pytest

from tests.integration.multihost import (Lines, job_processes, run_dsl_on_head, script_run,
                                         start_dsl_on_head, wait_until, write_spec)

pytestmark = pytest.mark.integration


def test_two_host_training_of_the_bundled_engine(cluster, tmp_path):
    spec = write_spec(cluster, tmp_path, "ssh", "  train: {steps: 30, log_every: 10}")
    proc = run_dsl_on_head(cluster, "launch", str(spec))
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"^\[node1:0\] step \d+/30 \| loss ([0-9.]+)", proc.stdout, re.M)]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert "world size  │ 2" in proc.stdout
    assert re.search(r"node2 .*reachable .*ok", proc.stderr)  # the preflight table
    assert (tmp_path / "out/logs/rank1.log").exists()


def test_ranks_run_on_their_hosts_with_torchrun_env(cluster, tmp_path):
    spec = write_spec(cluster, tmp_path, "ssh", script_run(), slots=2)
    proc = run_dsl_on_head(cluster, "launch", str(spec))
    assert proc.returncode == 0, proc.stderr[-3000:]
    envs = {int(m.group(2)): (m.group(1), json.loads(m.group(3)))
            for m in re.finditer(r"^\[(node\d):(\d+)\] ENV (.*)$", proc.stdout, re.M)}
    assert {r: h for r, (h, _) in envs.items()} == {0: "node1", 1: "node1", 2: "node2", 3: "node2"}
    for rank, (host, env) in envs.items():
        assert env["RANK"] == str(rank) and env["WORLD_SIZE"] == "4"
        assert env["LOCAL_RANK"] == str(rank % 2) and env["NODE_RANK"] == str(rank // 2)
        assert env["MASTER_ADDR"] == "node1"
    assert re.findall(r"ALLREDUCE (\d+)", proc.stdout) == ["10"] * 4  # 1+2+3+4 across hosts


def test_dry_run_shows_exact_ssh_command_lines(cluster, tmp_path):
    spec = write_spec(cluster, tmp_path, "ssh", "  train: {steps: 5}",
                      extra="env:\n  vars: {SECRET_X: hunter2}\n  secret: [SECRET_X]\n")
    proc = run_dsl_on_head(cluster, "launch", str(spec), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ssh ")]
    assert len(lines) == 2 and "-l root node1 " in lines[0] and "-l root node2 " in lines[1]
    assert "--node-rank=1" in lines[1] and "--env-stdin --watch-stdin" in lines[1]
    assert "hunter2" not in proc.stdout and "SECRET_X='<secret>'" in proc.stdout
    assert job_processes(cluster, str(tmp_path)) == {h: [] for h in cluster.hosts}


def _start_sleeper(cluster, folder, marker):
    spec = write_spec(cluster, folder, "ssh", script_run("--sleep", "300", "--marker", marker))
    proc = start_dsl_on_head(cluster, "launch", str(spec))
    lines = Lines(proc)
    lines.wait_for("SLEEPING", count=2)
    return proc, lines


def _no_job_left(cluster, marker) -> bool:
    return all(not pids for pids in job_processes(cluster, marker).values())


def test_kill_9_of_a_rank_and_sigint_stop_only_their_own_job(cluster, tmp_path):
    bystander_marker = f"by-{uuid.uuid4().hex}"
    bystander, _ = _start_sleeper(cluster, tmp_path / "bystander", bystander_marker)
    try:
        # 1. kill -9 of the rank on host 2.
        marker = f"k9-{uuid.uuid4().hex}"
        job, _ = _start_sleeper(cluster, tmp_path / "k9", marker)
        ranks = [p for p in job_processes(cluster, marker)["node2"]
                 if "torchrun_script.py" in " ".join(psutil.Process(p).cmdline())
                 and "dsl.launcher.host.elastic" not in " ".join(psutil.Process(p).cmdline())]
        assert len(ranks) == 1
        psutil.Process(ranks[0]).kill()
        killed = time.monotonic()
        code = job.wait(timeout=30)
        assert time.monotonic() - killed < 5
        assert code == 128 + signal.SIGKILL
        assert "rank 1 on node2 was killed by SIGKILL" in job.stderr.read()
        assert wait_until(lambda: _no_job_left(cluster, marker), 2), job_processes(cluster, marker)

        # 2. SIGINT to dsl launch.
        marker = f"int-{uuid.uuid4().hex}"
        job, _ = _start_sleeper(cluster, tmp_path / "int", marker)
        job.send_signal(signal.SIGINT)
        sent = time.monotonic()
        assert job.wait(timeout=30) == 130
        assert time.monotonic() - sent < 5
        assert wait_until(lambda: _no_job_left(cluster, marker), 2), job_processes(cluster, marker)

        # The other job on the same hosts never noticed.
        assert bystander.poll() is None
        alive = job_processes(cluster, bystander_marker)
        assert alive["node1"] and alive["node2"]
    finally:
        bystander.send_signal(signal.SIGINT)
        bystander.wait(timeout=30)
    assert wait_until(lambda: _no_job_left(cluster, bystander_marker), 5)


def test_lost_launcher_stops_remote_ranks(cluster, tmp_path):
    """kill -9 of `dsl launch` itself: every ssh session closes, every guard cleans its host."""
    marker = f"lost-{uuid.uuid4().hex}"
    job, _ = _start_sleeper(cluster, tmp_path, marker)
    job.kill()
    job.wait(timeout=10)
    assert wait_until(lambda: _no_job_left(cluster, marker), 5), job_processes(cluster, marker)


def test_unreachable_host_fails_preflight_fast(cluster, tmp_path):
    spec = write_spec(cluster, tmp_path, "ssh", "  train: {steps: 5}", hosts=("node1", "10.200.0.99"))
    started = time.monotonic()
    proc = run_dsl_on_head(cluster, "launch", str(spec), timeout=60)
    assert time.monotonic() - started < 15
    assert proc.returncode == 2
    failure = proc.stderr.split("preflight failed:", 1)[1].strip().splitlines()
    assert len(failure) == 1  # one line, naming the host
    assert re.match(r"10\.200\.0\.99: reachable: 10\.200\.0\.99: (no answer on port 22 within 5 s|"
                    r"cannot connect to port 22)", failure[0])
    assert "Traceback" not in proc.stderr


def test_unknown_host_key_is_refused(cluster, tmp_path):
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    spec = write_spec(cluster, tmp_path, "ssh", "  train: {steps: 5}")
    spec.write_text(spec.read_text().replace(str(cluster.known_hosts), str(empty)))
    proc = run_dsl_on_head(cluster, "preflight", str(spec), timeout=60)
    assert proc.returncode == 2
    assert "node1: reachable: node1: host key unknown" in proc.stderr


def test_probe_and_plan_reach_every_host_over_ssh(cluster, tmp_path):
    spec = write_spec(cluster, tmp_path, "ssh", "  train: {steps: 5}",
                      extra="engine: {zero_stage: auto, offload: {optimizer: auto}}\n")
    proc = run_dsl_on_head(cluster, "probe", str(spec), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    hosts = json.loads(proc.stdout)["hosts"]
    # Each host answered from its own namespace (its own hostname), not the head's.
    assert {name: topo["hostname"] for name, topo in hosts.items()} == {"node1": "node1", "node2": "node2"}
    assert all(topo["source"] == f"probe of {name}" for name, topo in hosts.items())
    plan = run_dsl_on_head(cluster, "plan", str(spec), "--json")
    assert plan.returncode == 0, plan.stderr[-2000:]
    data = json.loads(plan.stdout)
    assert data["choice"]["zero_stage"] in (0, 1, 2, 3) and data["choice"]["fits"]
    assert "probe of node" in plan.stdout
    # No rank ran anywhere: only the probes.
    assert job_processes(cluster, str(tmp_path)) == {h: [] for h in cluster.hosts}


def test_probe_measures_each_hosts_process_baseline_over_ssh(cluster, tmp_path):
    """`dsl probe SPEC --measure-baseline`: every host runs the trainer once in its own namespace
    (engine/baseline.py) and answers with the figure it stored; the plan then uses it."""
    spec = write_spec(cluster, tmp_path, "ssh", "  train: {steps: 5}")
    proc = run_dsl_on_head(cluster, "probe", str(spec), "--measure-baseline", "--json", timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    hosts = json.loads(proc.stdout)["hosts"]
    for name, topo in hosts.items():
        found = topo["process_baseline"]
        assert found is not None, (name, topo["unknown"])
        assert 100 * 2**20 < found["bytes"] < 400 * 2**20
        assert found["checkpointing_bytes"] > found["bytes"]
    plan = run_dsl_on_head(cluster, "plan", str(spec), "--json")
    assert plan.returncode == 0, plan.stderr[-2000:]
    runtime = [t for t in json.loads(plan.stdout)["choice"]["terms"] if t["name"] == "runtime"][0]
    assert "measured on this host" in runtime["formula"]
    assert runtime["device_bytes"] in {topo["process_baseline"]["bytes"] for topo in hosts.values()}


def test_probe_names_a_host_that_cannot_be_reached(cluster, tmp_path):
    spec = write_spec(cluster, tmp_path, "ssh", "  train: {steps: 5}", hosts=("node1", "node-missing"))
    proc = run_dsl_on_head(cluster, "probe", str(spec))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot probe every host" in proc.stderr and "node-missing" in proc.stderr
