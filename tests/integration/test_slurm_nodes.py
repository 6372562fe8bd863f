"""One `dsl sbatch` script on the real test Slurm, submitted by hand with `sbatch --nodes=N`: it
runs on the allocation's nodes, its setup line's export reaches every rank, and its own
arguments reach the training script."""

from __future__ import annotations

import json
import re
import sys

import pytest

from dsl.launcher import shell
from tests.conftest import ROOT
from tests.integration.multihost import run_dsl_on_head, wait_until
from tests.integration.test_slurm_backend import _slurm, _state

pytestmark = pytest.mark.integration
SCRIPT = ROOT / "tests/integration/scripts/affinity_script.py"
HOSTILE = """a b; $(id) "dq" 'sq' ü"""


def _submit(cluster, script: str, *argv: str) -> list[dict]:
    submitted = _slurm(cluster, "sbatch", "--parsable", *argv)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    assert wait_until(lambda: _state(cluster, job_id) == "COMPLETED", 120), _state(cluster, job_id)
    output = (script.parent / "out" / f"slurm-{job_id}.out").read_text()
    return [json.loads(m.group(1)) for m in re.finditer(r"^\d+: \[dsl:\d+:\d+\] AFFINITY (.*)$", output, re.M)]


def test_same_script_runs_on_the_nodes_sbatch_gives_it(cluster, tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps({
        "name": "nodes", "output_dir": str(tmp_path / "out"),
        "run": {"script": str(SCRIPT), "python": sys.executable, "workdir": str(tmp_path),
                "setup": [f"export HOSTILE={shell.quote(HOSTILE)}"]},
        "resources": {"backend": "slurm", "nodes": 2, "procs_per_node": 2, "slurm": {"time_min": 5}}}))
    script = tmp_path / "job.sh"
    proc = run_dsl_on_head(cluster, "sbatch", str(spec), "-o", str(script))
    assert proc.returncode == 0, proc.stderr
    for nodes in (1, 2):
        ranks = _submit(cluster, script, f"--nodes={nodes}", str(script), "HOSTILE")
        assert sorted(r["rank"] for r in ranks) == list(range(2 * nodes))
        assert {r["world_size"] for r in ranks} == {2 * nodes}
        assert len({r["host"] for r in ranks}) == nodes
        assert {r["var"] for r in ranks} == {HOSTILE}  # run.setup's export, via "$@" the name
