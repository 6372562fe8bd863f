"""Per-node start on the test cluster: two `dsl launch --node-rank` processes, started by hand in
two hosts' namespaces the way a scheduler (a Kubernetes Indexed Job, PBS, ...) starts one process
per node, form one 4-rank job of the bundled trainer (launcher/backends/pernode.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration
PORT = "29517"


def _spec(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "name: pernode\n"
        "run:\n"
        "  train:\n"
        "    model: {preset: tiny}\n"
        "    steps: 4\n"
        "    log_every: 1\n"
        "    seed: 0\n"
        f"  python: {sys.executable}\n"
        f"  workdir: {tmp_path}\n"
        "resources:\n"
        "  procs_per_node: 2\n"
        "engine: {zero_stage: 1, precision: fp32, micro_batch: 2, grad_accum: 1,"
        " optimizer: {type: adamw, lr: 3.0e-3}}\n"
        f"output_dir: {tmp_path / 'out'}\n")
    return spec


def _start(cluster, host: str, spec, node_rank: int) -> subprocess.Popen:
    argv = cluster.on_host(host, [sys.executable, "-m", "dsl.launcher", "launch", str(spec),
                                  "--node-rank", str(node_rank), "--nnodes", "2",
                                  "--master-addr", "node1", "--master-port", PORT])
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **cluster.env()})


def test_two_nodes_started_by_hand_train_one_four_rank_job(cluster, tmp_path):
    spec = _spec(tmp_path)
    # Node 1 first: it waits for node 0's rendezvous, as a pod that starts early would.
    second = _start(cluster, "node2", spec, 1)
    first = _start(cluster, "node1", spec, 0)
    try:
        out0, err0 = first.communicate(timeout=400)
        out1, err1 = second.communicate(timeout=120)
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert first.returncode == 0, err0[-3000:]
    assert second.returncode == 0, err1[-3000:]
    assert "4 rank(s) (data-parallel 4)" in err0 + out0  # the trainer on rank 0 sees the whole job
    steps = re.findall(r"^\[node1:0\] step (\d)/4 \| loss ([0-9.]+)", out0, re.M)
    assert [s for s, _ in steps] == ["1", "2", "3", "4"]
    assert "node 0 of 2" in err0 and "node 1 of 2" in err1  # each launch ran its own node only
    logs = tmp_path / "out" / "logs"
    assert sorted(p.name for p in logs.glob("rank*.log")) == ["rank0.log", "rank1.log", "rank2.log", "rank3.log"]
    assert (logs / "torchelastic" / "node1").is_dir() and (logs / "torchelastic" / "node2").is_dir()
