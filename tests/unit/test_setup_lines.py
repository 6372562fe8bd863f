"""run.setup: shell lines run on every host before its ranks, for every backend, checked by
running the rendered commands through a real bash (a fake interpreter stands in for python and
prints what the rank would see)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from dsl.engine.errors import UserError
from dsl.launcher import shell
from dsl.launcher.hosts import Host
from dsl.launcher.plan import RenderInputs
from dsl.launcher.render import render
from dsl.launcher.spec import load_spec

HOSTILE = """a b; $(id) "dq" 'sq' `x` \\ $HOME ü"""
SETUP = [f"export HOSTILE={shell.quote(HOSTILE)}", "export STEP=$((1 + 1))", "cd /"]


def _fake_python(tmp_path: Path) -> str:
    """Prints, as JSON, its argv and what the setup lines exported (stands in for python)."""
    path = tmp_path / "bin/fakepython"
    path.parent.mkdir(exist_ok=True)
    path.write_text('#!/bin/bash\nexec python3 -c \'import json, os, sys; print("FAKE " + json.dumps('
                    '{"argv": sys.argv[1:], "HOSTILE": os.environ.get("HOSTILE"), '
                    '"STEP": os.environ.get("STEP"), "cwd": os.getcwd()}))\' "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def _plan(tmp_path: Path, resources: str, setup=SETUP):
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps({"name": "setup", "run": {"script": "train.py", "args": ["--x", "1"],
                                                        "setup": setup},
                                "output_dir": str(tmp_path / "out")})[:-1]
                    + ', "resources": ' + resources + "}")
    (tmp_path / "hosts").write_text("h1 slots=2\nh2 slots=2\n")
    inputs = RenderInputs(python=_fake_python(tmp_path), cwd=str(tmp_path), master_port=29500,
                          env_values={}, set_visible_devices=False)
    hosts = [Host("h1", (0, 1)), Host("h2", (0, 1))]
    return render(load_spec(spec), hosts, inputs)


def _fake_output(out: str) -> list[dict]:
    return [json.loads(line[5:]) for line in out.splitlines() if line.startswith("FAKE ")]


def test_ssh_remote_command_runs_setup_then_the_guard_through_a_real_bash(tmp_path):
    plan = _plan(tmp_path, '{"backend": "ssh", "hostfile": "hosts"}')
    host = plan.hosts[1]
    assert host.python == _fake_python(tmp_path)  # preflight and the probe still find python
    command = shell.remote_command(host.cwd, host.argv)  # what the ssh session's shell runs
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30)
    [seen] = _fake_output(proc.stdout)
    assert seen["HOSTILE"] == HOSTILE and seen["STEP"] == "2"  # exported, byte for byte
    assert seen["cwd"] == "/"  # a setup line's cd holds too
    assert seen["argv"][:2] == ["-m", "dsl.launcher.host.guard"] and seen["argv"][-2:] == ["--x", "1"]


def test_a_failing_line_stops_the_host_and_is_named(tmp_path):
    plan = _plan(tmp_path, '{"procs_per_node": 2}', setup=["true", "test -d '/no/such dir'"])
    proc = subprocess.run(list(plan.hosts[0].argv), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and _fake_output(proc.stdout) == []  # the program never started
    assert "run.setup[1] failed with exit 1: test -d '/no/such dir'" in proc.stderr


def test_setup_lines_do_not_read_the_guards_stdin(tmp_path):
    plan = _plan(tmp_path, '{"procs_per_node": 2}', setup=["read -r line || true", "export STEP=$line"])
    proc = subprocess.run(list(plan.hosts[0].argv), input="env-json\n", capture_output=True,
                          text=True, timeout=30)
    assert _fake_output(proc.stdout)[0]["STEP"] == ""  # the env line stays for the guard


def test_slurm_batch_script_runs_setup_before_srun_and_on_every_node(tmp_path):
    plan = _plan(tmp_path, '{"backend": "slurm", "nodes": 2, "procs_per_node": 2}')
    script = next(text for path, text in plan.files.items() if path.endswith("sbatch.sh"))
    assert script.index("export HOSTILE=") < script.index("\nsrun ")
    # Fake Slurm: scontrol names the hosts; srun runs its `bash -c` command once per node,
    # with srun's environment (the batch script's, --export=ALL) minus what setup exported.
    bin_dir = tmp_path / "bin"
    (bin_dir / "scontrol").write_text("#!/bin/bash\nexec /usr/bin/printf 'h1\\nh2\\n'\n")  # one write
    (bin_dir / "srun").write_text(
        '#!/bin/bash\necho "SRUN_SEES $HOSTILE"\nwhile [ "$1" != bash ]; do shift; done\n'
        'for node in 0 1; do env -u HOSTILE -u STEP SLURM_NODEID=$node SLURMD_NODENAME=h$node "$@"; done\n')
    for name in ("scontrol", "srun"):
        (bin_dir / name).chmod(0o755)
    path = tmp_path / "sbatch.sh"
    path.write_text(script)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="2",
               SLURM_JOB_NODELIST="h[1-2]")
    proc = subprocess.run(["bash", str(path)], capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert f"SRUN_SEES {HOSTILE}" in proc.stdout  # the batch script's setup reached srun
    nodes = _fake_output(proc.stdout)
    assert len(nodes) == 2 and all(n["HOSTILE"] == HOSTILE and n["STEP"] == "2" for n in nodes)
    assert [n["argv"][n["argv"].index("--nnodes=2") + 1] for n in nodes] == ["--node-rank=0", "--node-rank=1"]


def test_mpi_ranks_run_setup_behind_mpirank(tmp_path):
    plan = _plan(tmp_path, '{"backend": "mpi", "hostfile": "hosts"}')
    argv = list(plan.hosts[0].argv)
    assert argv[1:3] == ["-m", "dsl.launcher.host.mpirank"]  # mpirank first: setup output is prefixed
    program = argv[argv.index("--") + 1:]
    proc = subprocess.run(program, capture_output=True, text=True, timeout=30)
    [seen] = _fake_output(proc.stdout)
    assert seen["HOSTILE"] == HOSTILE and seen["argv"][-2:] == ["--x", "1"]
    assert plan.submit.argv[plan.submit.argv.index("dsl.launcher.host.mpirank") - 2] == _fake_python(tmp_path)


@pytest.mark.parametrize("bad", ["", "   "])
def test_an_empty_setup_line_is_a_located_error(tmp_path, bad):
    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: s\nrun:\n  script: s.py\n  setup:\n    - module load x\n    - {json.dumps(bad)}\n")
    with pytest.raises(UserError, match=r"job\.yaml:\d+:\d+ run\.setup.*entry 1 .*is not a shell line"):
        load_spec(spec)
