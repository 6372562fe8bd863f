"""`resources.bind` through a real `dsl launch` on this machine: each rank's own cores."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_dsl

pytestmark = pytest.mark.integration
SCRIPT = ROOT / "tests/integration/scripts/affinity_script.py"


def _launch(tmp_path: Path, procs: int, bind: str):
    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: bind\nrun:\n  script: {SCRIPT}\nresources:\n  procs_per_node: {procs}\n"
                    f"  bind: {bind}\noutput_dir: {tmp_path / 'out'}\n")
    return run_dsl("launch", str(spec), timeout=120)


def _ranks(stdout: str) -> dict[int, dict]:
    return {int(m.group(1)): json.loads(m.group(2))
            for m in re.finditer(r"^\[localhost:(\d+)\] AFFINITY (.*)$", stdout, re.M)}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 usable cores")
def test_bind_cores_gives_each_rank_its_own_cores(tmp_path):
    proc = _launch(tmp_path, 2, "cores")
    assert proc.returncode == 0, proc.stderr
    ranks = _ranks(proc.stdout)
    assert sorted(ranks) == [0, 1]
    cpus = [set(ranks[r]["cpus"]) for r in (0, 1)]
    assert cpus[0] and cpus[1] and not cpus[0] & cpus[1]  # disjoint, none empty
    assert cpus[0] | cpus[1] == set(os.sched_getaffinity(0))  # the host's cores, all used
    for r in (0, 1):  # OMP_NUM_THREADS follows the share
        assert ranks[r]["omp"] == str(len(cpus[r]))
    assert "bind cores: local rank 0 -> cpus" in proc.stderr


def test_more_ranks_than_cores_is_refused_with_the_numbers(tmp_path):
    usable = len(os.sched_getaffinity(0))
    proc = _launch(tmp_path, usable + 1, "cores")
    assert proc.returncode == 2, proc.stderr
    assert f"runs {usable + 1} ranks on {usable} usable CPU(s)" in proc.stderr
    assert f"lower procs_per_node to {usable}" in proc.stderr
    assert "Traceback" not in proc.stderr and _ranks(proc.stdout) == {}
