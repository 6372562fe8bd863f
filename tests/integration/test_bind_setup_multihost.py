"""resources.bind and run.setup on the test cluster, for the backends that reach other hosts
(ssh: dsl's starter on each host; mpi: mpirank in each rank)."""

from __future__ import annotations

import json
import re

import pytest

from dsl.launcher import shell
from tests.conftest import ROOT
from tests.integration.multihost import run_dsl_on_head, write_spec

pytestmark = pytest.mark.integration
SCRIPT = ROOT / "tests/integration/scripts/affinity_script.py"
HOSTILE = """a b; $(id) "dq" 'sq' ü"""


@pytest.mark.parametrize("backend", ["ssh", "mpi"])
def test_each_rank_on_its_own_cores_with_the_setup_export(cluster, tmp_path, backend):
    run = (f"  script: {SCRIPT}\n  args: [HOSTILE]\n"
           f"  setup: [{json.dumps('export HOSTILE=' + shell.quote(HOSTILE))}]")
    spec = write_spec(cluster, tmp_path, backend, run, slots=2)
    spec.write_text(spec.read_text().replace("  hostfile: hostfile\n", "  hostfile: hostfile\n  bind: cores\n"))
    proc = run_dsl_on_head(cluster, "launch", str(spec))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = {int(m.group(2)): (m.group(1), json.loads(m.group(3)))
             for m in re.finditer(r"^\[(node\d):(\d+)\] AFFINITY (.*)$", proc.stdout, re.M)}
    assert sorted(ranks) == [0, 1, 2, 3]
    for host in ("node1", "node2"):
        cpus = [set(seen["cpus"]) for h, seen in ranks.values() if h == host]
        assert len(cpus) == 2 and all(cpus) and not cpus[0] & cpus[1]  # disjoint per host
    assert {seen["var"] for _, seen in ranks.values()} == {HOSTILE}
