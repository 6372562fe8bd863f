"""The ranks' environment over the ssh backend (launcher/envsources.py): variables of the
launching shell by prefix (DeepSpeed's NCCL and one the spec adds), a `.deepspeed_env` in the
working folder of `dsl launch`, and a secret that reaches every rank but is never printed or
written to the run folder."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess

import pytest

from tests.conftest import ROOT
from tests.integration.multihost import dsl_argv, job_processes, write_spec

pytestmark = pytest.mark.integration

SECRET = "hf_never_printed_3f9c"


def test_prefixed_shell_variables_and_deepspeed_env_reach_every_remote_rank(cluster, tmp_path):
    script = ROOT / "tests/integration/scripts/print_env.py"
    run = f"  script: {script}\n  args: [NCCL_DEBUG, MY_FLAG, FROM_DS_ENV, OTHER, '#HF_TOKEN']"
    spec = write_spec(cluster, tmp_path, "ssh", run, slots=1,
                      extra="env:\n  forward_prefixes: [NCCL, MY_]\n")
    (tmp_path / ".deepspeed_env").write_text(f"FROM_DS_ENV=from file\nHF_TOKEN={SECRET}\n")
    (tmp_path / "home").mkdir()
    env = {**os.environ, **cluster.env(), "NCCL_DEBUG": "INFO", "MY_FLAG": "1", "OTHER": "not forwarded",
           "HOME": str(tmp_path / "home")}
    proc = subprocess.run(dsl_argv(cluster, "launch", str(spec)), cwd=tmp_path, capture_output=True,
                          text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = {m.group(1): json.loads(m.group(2))
            for m in re.finditer(r"^\[(node\d):\d+\] SEEN (.*)$", proc.stdout, re.M)}
    expected = {"NCCL_DEBUG": "INFO", "MY_FLAG": "1", "FROM_DS_ENV": "from file", "OTHER": None,
                "#HF_TOKEN": hashlib.sha256(SECRET.encode()).hexdigest()}
    assert seen == {"node1": expected, "node2": expected}
    assert SECRET not in proc.stdout + proc.stderr
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(errors="replace"), path
    plan = json.loads((tmp_path / "out/plan.json").read_text())
    assert {h["env"]["HF_TOKEN"] for h in plan["hosts"]} == {"<secret>"}
    assert job_processes(cluster, str(tmp_path)) == {h: [] for h in cluster.hosts}
