"""run.setup through a real `dsl launch` on this machine: every rank sees what a line exports."""

from __future__ import annotations

import json
import re

import pytest

from dsl.launcher import shell
from tests.conftest import ROOT, run_dsl

pytestmark = pytest.mark.integration
SCRIPT = ROOT / "tests/integration/scripts/affinity_script.py"
HOSTILE = """a b; $(id) "dq" 'sq' `x` ü"""


def test_every_rank_sees_what_a_setup_line_exports(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps({
        "name": "setup", "output_dir": str(tmp_path / "out"), "resources": {"procs_per_node": 2},
        "run": {"script": str(SCRIPT), "args": ["HOSTILE"],
                "setup": [f"export HOSTILE={shell.quote(HOSTILE)}", "echo setup done"]}}))
    proc = run_dsl("launch", str(spec), timeout=120)
    assert proc.returncode == 0, proc.stderr
    seen = {int(m.group(1)): json.loads(m.group(2))["var"]
            for m in re.finditer(r"^\[localhost:(\d+)\] AFFINITY (.*)$", proc.stdout, re.M)}
    assert seen == {0: HOSTILE, 1: HOSTILE}
    assert "[localhost] setup done" in proc.stdout + proc.stderr


def test_a_failing_setup_line_fails_the_launch_naming_it(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps({
        "name": "setup", "output_dir": str(tmp_path / "out"), "resources": {"procs_per_node": 2},
        "run": {"script": str(SCRIPT), "setup": ["module load cuda/12.4 2>/dev/null || false"]}}))
    proc = run_dsl("launch", str(spec), timeout=120)
    assert proc.returncode == 1
    assert "run.setup[0] failed with exit 1: module load cuda/12.4" in proc.stderr
    assert "AFFINITY" not in proc.stdout
