"""Batch scripts people write (issue 18): gres checked against procs_per_node, extra srun
options, the script's own arguments passed through ("$@"), env.prepend. Rendered scripts and
commands are run through a real bash, with fake srun/scontrol and a fake python that prints what
the rank would get."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from dsl.engine.errors import UserError
from dsl.launcher.hosts import Host
from dsl.launcher.plan import RenderInputs
from dsl.launcher.render import render
from dsl.launcher.spec import load_spec
from tests.conftest import run_dsl

HOSTILE = """a b; $(id) "dq" 'sq' `x` \\ ü"""


def _bin(tmp_path: Path) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    scripts = {
        "fakepython": '#!/bin/bash\nexec python3 -c \'import json, os, sys; print("FAKE " + json.dumps('
                      '{"argv": sys.argv[1:], "LD": os.environ.get("LD_LIBRARY_PATH")}))\' "$@"\n',
        "scontrol": "#!/bin/bash\nexec /usr/bin/printf 'h1\\nh2\\n'\n",  # one write: head -n 1 in the script
        # srun: prints its options, then runs its command once per node like Slurm would.
        "srun": '#!/bin/bash\nopts=()\nwhile [ "$1" != bash ]; do opts+=("$1"); shift; done\n'
                'python3 -c \'import json, sys; print("SRUN " + json.dumps(sys.argv[1:]))\' "${opts[@]}"\n'
                'for node in 0 1; do SLURM_NODEID=$node SLURMD_NODENAME=h$node "$@" || exit; done\n',
    }
    for name, text in scripts.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def _spec(tmp_path: Path, run: dict, resources: dict, env: dict | None = None) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps({"name": "opts", "run": run, "resources": resources, "env": env or {},
                                "output_dir": str(tmp_path / "out")}, indent=1))
    return path


def _render(tmp_path: Path, spec: Path, slots=(0, 1), env_values: dict | None = None):
    inputs = RenderInputs(python=str(_bin(tmp_path) / "fakepython"), cwd=str(tmp_path),
                          master_port=29500, env_values=env_values or {}, set_visible_devices=False)
    hosts = [Host("h1", tuple(slots)), Host("h2", tuple(slots))]
    (tmp_path / "hosts").write_text("h1 slots=2\nh2 slots=2\n")
    return render(load_spec(spec), hosts, inputs)


def _run_batch(tmp_path: Path, plan, *args: str, env: dict | None = None):
    script = next(text for path, text in plan.files.items() if path.endswith("sbatch.sh"))
    path = tmp_path / "sbatch.sh"
    path.write_text(script)
    full = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="2",
                SLURM_JOB_NODELIST="h[1-2]", **(env or {}))
    full.pop("LD_LIBRARY_PATH", None)
    full.update(env or {})
    return subprocess.run(["bash", str(path), *args], capture_output=True, text=True, env=full, timeout=30)


def _lines(out: str, tag: str) -> list:
    return [json.loads(line[len(tag) + 1:]) for line in out.splitlines() if line.startswith(tag + " ")]


SLURM = {"backend": "slurm", "nodes": 2, "procs_per_node": 2}


def test_gres_with_fewer_gpus_than_ranks_is_refused_located(tmp_path):
    spec = _spec(tmp_path, {"script": "t.py"}, {**SLURM, "procs_per_node": 8, "slurm": {"gres": "gpu:4"}})
    with pytest.raises(UserError, match=r"job\.yaml:\d+:\d+ resources\.slurm\.gres: 'gpu:4' gives each "
                                        r"node 4 GPU\(s\) but procs_per_node is 8.*gpu:8.*procs_per_node to 4"):
        load_spec(spec)
    proc = run_dsl("sbatch", str(spec))
    assert proc.returncode == 2 and "resources.slurm.gres" in proc.stderr and "Traceback" not in proc.stderr
    ok = _spec(tmp_path, {"script": "t.py"}, {**SLURM, "procs_per_node": 8,
                                               "slurm": {"gres": "gpu:h100:8,nvme:1"}})
    assert load_spec(ok).spec.resources.slurm.gres_gpus() == 8


def test_gres_is_checked_when_procs_per_node_is_auto(tmp_path):
    spec = _spec(tmp_path, {"script": "t.py"}, {**SLURM, "procs_per_node": "auto", "slurm": {"gres": "gpu:2"}})
    _render(tmp_path, spec, slots=(0, 1))  # two slots per host: fits
    with pytest.raises(UserError, match="'gpu:2' gives each node 2 GPU.* procs_per_node is 4"):
        _render(tmp_path, spec, slots=(0, 1, 2, 3))


def test_srun_args_are_passed_as_single_words(tmp_path):
    spec = _spec(tmp_path, {"script": "t.py"},
                 {**SLURM, "slurm": {"srun_args": ["--wait=60", f"--comment={HOSTILE}"]}})
    proc = _run_batch(tmp_path, _render(tmp_path, spec))
    assert proc.returncode == 0, proc.stderr
    [srun] = _lines(proc.stdout, "SRUN")
    assert srun[-2:] == ["--wait=60", f"--comment={HOSTILE}"]  # after dsl's own options


def test_bad_srun_arg_is_a_located_error(tmp_path):
    spec = _spec(tmp_path, {"script": "t.py"}, {**SLURM, "slurm": {"srun_args": ["wait=60"]}})
    with pytest.raises(UserError, match=r"resources\.slurm\.srun_args.*one srun option such as --wait=60"):
        load_spec(spec)


def test_batch_script_arguments_reach_the_training_script(tmp_path):
    spec = _spec(tmp_path, {"script": "t.py", "args": ["--lr", "1"]}, SLURM)
    proc = _run_batch(tmp_path, _render(tmp_path, spec), "--epochs", HOSTILE, "")
    assert proc.returncode == 0, proc.stderr
    nodes = _lines(proc.stdout, "FAKE")
    assert len(nodes) == 2
    for node in nodes:
        assert node["argv"][-5:] == ["--lr", "1", "--epochs", HOSTILE, ""]
    without = _lines(_run_batch(tmp_path, _render(tmp_path, spec)).stdout, "FAKE")
    assert without[0]["argv"][-2:] == ["--lr", "1"]


def test_arguments_to_the_bundled_trainer_are_refused(tmp_path):
    spec = _spec(tmp_path, {"train": {"steps": 5}}, SLURM)
    proc = _run_batch(tmp_path, _render(tmp_path, spec), "--lr=1")
    assert proc.returncode == 2 and _lines(proc.stdout, "SRUN") == []
    assert "run.train), which takes no arguments; got: --lr=1" in proc.stderr


@pytest.mark.parametrize("before, after", [("/old/lib", "/x y/lib:/old/lib"), (None, "/x y/lib"),
                                           ("", "/x y/lib")])
def test_prepend_expands_the_hosts_value_on_every_backend(tmp_path, before, after):
    env = {"prepend": {"LD_LIBRARY_PATH": "/x y/lib"}}
    host_env = {} if before is None else {"LD_LIBRARY_PATH": before}
    # slurm: once, in the batch script; every node gets the result
    plan = _render(tmp_path, _spec(tmp_path, {"script": "t.py"}, SLURM, env))
    proc = _run_batch(tmp_path, plan, env=host_env)
    assert [n["LD"] for n in _lines(proc.stdout, "FAKE")] == [after, after], proc.stderr
    # local and ssh: the host's command (ssh runs it through the login shell: remote_command)
    for resources in ({"procs_per_node": 2}, {"backend": "ssh", "hostfile": "hosts"}):
        plan = _render(tmp_path, _spec(tmp_path, {"script": "t.py"}, resources, env))
        base = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
        seen = subprocess.run(list(plan.hosts[0].argv), env={**base, **host_env}, capture_output=True,
                              text=True, timeout=30).stdout
        assert _lines(seen, "FAKE")[0]["LD"] == after
    # mpi: before each rank's program, behind mpirank
    plan = _render(tmp_path, _spec(tmp_path, {"script": "t.py"}, {"backend": "mpi", "hostfile": "hosts"}, env))
    argv = list(plan.hosts[0].argv)
    base = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    seen = subprocess.run(argv[argv.index("--") + 1:], env={**base, **host_env}, capture_output=True,
                          text=True, timeout=30).stdout
    assert _lines(seen, "FAKE")[0]["LD"] == after


def test_literal_values_stay_literal_and_prepend_is_not_also_set(tmp_path):
    # env.vars reach render resolved (launcher/envsources.py), as env_values
    plan = _render(tmp_path, _spec(tmp_path, {"script": "t.py"}, SLURM),
                   env_values={"LD_LIBRARY_PATH": "/a:$LD_LIBRARY_PATH"})
    proc = _run_batch(tmp_path, plan, env={"LD_LIBRARY_PATH": "/old"})
    assert {n["LD"] for n in _lines(proc.stdout, "FAKE")} == {"/a:$LD_LIBRARY_PATH"}
    with pytest.raises(UserError, match="LD_LIBRARY_PATH both set .vars. and prepended to .prepend."):
        load_spec(_spec(tmp_path, {"script": "t.py"}, SLURM,
                        {"vars": {"LD_LIBRARY_PATH": "/a"}, "prepend": {"LD_LIBRARY_PATH": "/b"}}))


def test_a_large_allocation_names_its_first_host_as_master(tmp_path):
    """scontrol's host list of a big allocation fills the pipe more than once: reading only its
    first line would end scontrol by SIGPIPE, which `set -o pipefail` turns into the end of the
    batch script (exit 141)."""
    plan = _render(tmp_path, _spec(tmp_path, {"script": "t.py"}, SLURM))
    (tmp_path / "bin/scontrol").write_text("#!/bin/bash\nseq -f 'node%06g' 1 50000\n")  # ~550 kB
    proc = _run_batch(tmp_path, plan)
    assert proc.returncode == 0, proc.stderr
    nodes = _lines(proc.stdout, "FAKE")
    assert len(nodes) == 2 and all("--master-addr=node000001" in n["argv"] for n in nodes)


def test_container_options_reach_srun_as_pyxis_options(tmp_path):
    image = "nvcr.io#nvidia/pytorch:24.05-py3"
    spec = _spec(tmp_path, {"script": "t.py"},
                 {**SLURM, "slurm": {"container_image": image,
                                     "container_mounts": ["/data:/data:ro", "/home/a b:/work"],
                                     "srun_args": ["--container-workdir=/work"]}})
    proc = _run_batch(tmp_path, _render(tmp_path, spec))
    assert proc.returncode == 0, proc.stderr
    [srun] = _lines(proc.stdout, "SRUN")
    assert srun[-3:] == [f"--container-image={image}", "--container-mounts=/data:/data:ro,/home/a b:/work",
                         "--container-workdir=/work"]


@pytest.mark.parametrize("slurm, message", [
    ({"container_mounts": ["/a:/a"]}, "set container_image too"),
    ({"container_image": "i", "container_mounts": ["/a:/a,/b:/b"]}, "one mount SRC:DST"),
])
def test_bad_container_settings_are_located_errors(tmp_path, slurm, message):
    with pytest.raises(UserError, match=rf"job\.yaml:\d+:\d+ resources\.slurm.*{message}"):
        load_spec(_spec(tmp_path, {"script": "t.py"}, {**SLURM, "slurm": slurm}))
