"""backend: slurm and `dsl sbatch` on the real test Slurm (slurmctld + one slurmd per host)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid

import pytest

from tests.integration.multihost import (Lines, SCRIPT, job_processes, run_dsl_on_head,
                                         start_dsl_on_head, wait_until)

pytestmark = pytest.mark.integration


def _spec(folder, run: str, nodes: int = 2, procs: int = 2) -> str:
    import sys

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(f"name: sl\nrun:\n{run}\n  python: {sys.executable}\n  workdir: {folder}\n"
                    f"resources:\n  backend: slurm\n  nodes: {nodes}\n  procs_per_node: {procs}\n"
                    f"  slurm: {{time_min: 5}}\noutput_dir: {folder / 'out'}\n")
    return str(path)


def _script(*args: str) -> str:
    return f"  script: {SCRIPT}\n  args: {json.dumps(list(args))}"


def _slurm(cluster, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=30,
                          env={**os.environ, **cluster.env()})


def _state(cluster, job_id: str) -> str:
    out = _slurm(cluster, "scontrol", "show", "job", "-o", job_id).stdout
    match = re.search(r"JobState=(\S+)", out)
    return match.group(1) if match else "GONE"


def test_sbatch_script_matches_golden_and_runs_2_nodes_by_2_ranks(cluster, tmp_path):
    import sys

    from tests.conftest import ROOT

    spec = _spec(tmp_path, _script())
    proc = run_dsl_on_head(cluster, "sbatch", spec, "-o", str(tmp_path / "job.sh"))
    assert proc.returncode == 0, proc.stderr
    # The script that runs below is, but for this run's paths, the golden one.
    from importlib import metadata

    text = (tmp_path / "job.sh").read_text()
    for real, stand_in in ((str(tmp_path), "<RUN>"), (sys.executable, "<PYTHON>"), (str(ROOT), "<ROOT>"),
                           (f"dsl {metadata.version('dsl')}", "dsl <VERSION>")):
        text = text.replace(real, stand_in)
    golden = ROOT / "tests/golden/cluster-2node.sbatch.sh"
    if os.environ.get("DSL_REGEN_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), "run with DSL_REGEN_GOLDEN=1 to accept a deliberate change"
    submitted = _slurm(cluster, "sbatch", "--parsable", str(tmp_path / "job.sh"))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert wait_until(lambda: _state(cluster, job_id) == "COMPLETED", 90), _state(cluster, job_id)
    output = (tmp_path / "out" / f"slurm-{job_id}.out").read_text()
    envs = [json.loads(m.group(2)) for m in re.finditer(r"^(\d+): \[dsl:\d+:\d+\] ENV (.*)$", output, re.M)]
    assert sorted(int(e["RANK"]) for e in envs) == [0, 1, 2, 3]
    assert {e["WORLD_SIZE"] for e in envs} == {"4"} and {e["NODE_RANK"] for e in envs} == {"0", "1"}
    assert output.count("ALLREDUCE 10") == 4  # 1+2+3+4 across both nodes


def test_launch_follows_job_and_returns_its_exit_code(cluster, tmp_path):
    spec = _spec(tmp_path / "ok", "  train: {steps: 20, log_every: 10}", procs=1)
    proc = run_dsl_on_head(cluster, "launch", spec)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"submitted Slurm job (\d+)", proc.stderr)
    assert re.search(r"^\[node1:0\] step 20/20 \| loss", proc.stdout, re.M)

    failing = _spec(tmp_path / "fail", _script("--fail-rank", "1", "--code", "3", "--sleep", "60"), procs=1)
    proc = run_dsl_on_head(cluster, "launch", failing)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "rank 1 on node2 exited with code 3" in proc.stderr


def test_ctrl_c_cancels_the_job(cluster, tmp_path):
    marker = f"slc-{uuid.uuid4().hex}"
    job = start_dsl_on_head(cluster, "launch", _spec(tmp_path, _script("--sleep", "300", "--marker", marker),
                                                     procs=1))
    Lines(job).wait_for("SLEEPING", count=2)
    job_id = None
    # The job id is in the run folder's output file name.
    for path in (tmp_path / "out").glob("slurm-*.out"):
        job_id = path.stem.split("-", 1)[1]
    assert job_id and _state(cluster, job_id) == "RUNNING"
    job.send_signal(signal.SIGINT)
    assert job.wait(timeout=30) == 130
    assert wait_until(lambda: _state(cluster, job_id) in ("CANCELLED", "GONE"), 10)
    squeue = _slurm(cluster, "squeue", "-h", "-j", job_id, "-t", "PENDING,RUNNING,COMPLETING").stdout
    assert squeue.strip() == ""
    assert wait_until(lambda: not any(job_processes(cluster, marker).values()), 10)


def test_inside_an_allocation_srun_runs_directly(cluster, tmp_path):
    import sys

    spec = _spec(tmp_path, _script(), procs=1)
    argv = cluster.on_head(["salloc", "-N", "2", "--time=5", sys.executable, "-m", "dsl.launcher",
                            "launch", spec])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **cluster.env()})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "submitted Slurm job" not in proc.stderr  # no batch job: srun in the allocation
    hosts = dict(re.findall(r"^\[(node\d):(\d)\] ENV", proc.stdout, re.M))
    assert hosts == {"node1": "0", "node2": "1"}


def test_probe_inside_an_allocation_runs_on_each_node(cluster, tmp_path):
    import json
    import sys

    spec = _spec(tmp_path, _script(), procs=1)
    argv = cluster.on_head(["salloc", "-N", "2", "--time=5", sys.executable, "-m", "dsl.launcher",
                            "probe", spec, "--json"])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **cluster.env()})
    assert proc.returncode == 0, proc.stderr[-3000:]
    hosts = json.loads(proc.stdout[proc.stdout.index("{"):])["hosts"]
    assert {name: topo["hostname"] for name, topo in hosts.items()} == {"node1": "node1", "node2": "node2"}
    # Outside an allocation the hosts are not known yet: one clear error.
    outside = subprocess.run(cluster.on_head([sys.executable, "-m", "dsl.launcher", "probe", spec]),
                             capture_output=True, text=True, timeout=60, env={**os.environ, **cluster.env()})
    assert outside.returncode == 2 and "inside an allocation" in outside.stderr
