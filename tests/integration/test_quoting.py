"""Hostile values through every shell dsl crosses: bash (local and Slurm's batch script), ssh,
srun and mpirun. The program must receive them byte for byte, and nothing else may run."""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, run_dsl
from tests.integration.multihost import run_dsl_on_head

pytestmark = pytest.mark.integration


def _hostile(canary: Path) -> list[str]:
    return ["a b", "it's", 'say "hi"', f"x; touch {canary}-semicolon", f"$(touch {canary}-dollar)",
            f"`touch {canary}-backtick`", "line1\nline2", "ünïcødé ✓ 日本", "$HOME", "*", "--", "-n",
            "\\", "tab\there", "", f"' ; touch {canary}-quote ; '"]


HOSTILE_ENV = "multi\nline 'single' \"double\" $(echo no) `echo no` ; & | > $PATH ü"


@pytest.mark.parametrize("backend", ["local", "ssh", "slurm", "mpi"])
def test_hostile_values_arrive_byte_for_byte(backend, tmp_path, request):
    folder = tmp_path / "dir with spaces ü $x"
    folder.mkdir()
    script = folder / "echo args.py"
    shutil.copy(ROOT / "tests/integration/scripts/echo_args.py", script)
    canary = tmp_path / f"pwned-{uuid.uuid4().hex}"
    args = _hostile(canary)
    spec = {
        "name": f"quote-{backend}",
        "run": {"script": str(script), "args": args, "python": sys.executable, "workdir": str(folder)},
        "resources": {"backend": backend, "procs_per_node": 1},
        "env": {"vars": {"HOSTILE_ENV": HOSTILE_ENV}},
        "output_dir": str(folder / "out"),
    }
    if backend != "local":
        cluster = request.getfixturevalue("cluster")
        if backend != "slurm":
            (folder / "hostfile").write_text("node1 slots=1\nnode2 slots=1\n")
            spec["resources"]["hostfile"] = "hostfile"
            spec["resources"]["ssh"] = {"user": "root", "identity_file": str(cluster.ssh_key),
                                        "known_hosts": str(cluster.known_hosts)}
        else:
            spec["resources"]["nodes"] = 2
    spec_path = folder / "job.yaml"
    spec_path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    if backend == "local":
        proc = run_dsl("launch", str(spec_path), cwd=tmp_path)
    else:
        proc = run_dsl_on_head(cluster, "launch", str(spec_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = 1 if backend == "local" else 2
    for rank in range(ranks):
        received = json.loads((folder / "out" / f"received-{rank}.json").read_text(encoding="utf-8"))
        assert received["argv"] == args
        assert received["hostile_env"] == HOSTILE_ENV
        assert received["cwd"] == str(folder)
    assert not any(p.name.startswith(canary.name) for p in tmp_path.iterdir())  # nothing else ran
