"""mpirun rendering and the OpenMPI -> torchrun environment mapping."""

from __future__ import annotations

import pytest

from dsl.engine.errors import UserError
from dsl.launcher.hosts import Host
from dsl.launcher.host.mpirank import torchrun_env
from dsl.launcher.plan import RenderInputs
from dsl.launcher.render import render
from dsl.launcher.spec import load_spec


def _ompi(rank, size, local, local_size):
    return {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": str(size),
            "OMPI_COMM_WORLD_LOCAL_RANK": str(local), "OMPI_COMM_WORLD_LOCAL_SIZE": str(local_size),
            "OMPI_COMM_WORLD_NODE_RANK": str(local)}  # OpenMPI's per-node rank, not the node index


def test_ranks_map_to_nodes_by_dsl_layout():
    layout = [[1, 3], [0, 1, 2]]
    env = torchrun_env(_ompi(3, 5, 1, 3), layout)
    assert (env["RANK"], env["LOCAL_RANK"], env["NODE_RANK"], env["GROUP_RANK"]) == ("3", "1", "1", "1")
    assert env["WORLD_SIZE"] == "5" and env["LOCAL_WORLD_SIZE"] == "3" and env["GROUP_WORLD_SIZE"] == "2"
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1,2"
    assert torchrun_env(_ompi(1, 5, 1, 2), layout)["CUDA_VISIBLE_DEVICES"] == "1,3"


def test_a_foreign_placement_is_refused():
    with pytest.raises(SystemExit, match="not dsl's layout"):
        torchrun_env(_ompi(2, 4, 0, 2), [[0, 1, 2], [0]])
    with pytest.raises(SystemExit, match="OMPI_COMM_WORLD_RANK is not set"):
        torchrun_env({}, [[0]])


def _plan(write, extra=""):
    write("hf", "a slots=2\nb slots=1\n")
    spec = load_spec(write("s.yaml", "name: m\nrun: {script: t.py, args: [x]}\nresources:\n"
                                     "  backend: mpi\n  hostfile: hf\n  ssh:\n    user: bob\n"
                                     f"    port: 2222\n{extra}env: {{vars: {{TOKEN: s3cret}}, secret: [TOKEN]}}\n"))
    write("t.py", "")
    inputs = RenderInputs(python="/py", cwd="/w", master_port=29555, env_values={"TOKEN": "s3cret"},
                          set_visible_devices=True, is_root=True)
    return render(spec, [Host("a", (0, 1)), Host("b", (0,))], inputs)


def test_mpirun_command(write):
    plan = _plan(write)
    argv = list(plan.submit.argv)
    assert argv[:2] == ["mpirun", "--allow-run-as-root"]
    assert argv[argv.index("-np") + 1] == "3" and argv[argv.index("--map-by") + 1] == "slot"
    assert argv[argv.index("--bind-to") + 1] == "none"
    rsh = argv[argv.index("plm_rsh_args") + 1]
    assert "-p 2222" in rsh and "-l bob" in rsh and "StrictHostKeyChecking=yes" in rsh
    exported = [argv[i + 1] for i, word in enumerate(argv) if word == "-x"]
    assert {"TOKEN", "MASTER_ADDR", "MASTER_PORT", "DSL_OUTPUT_DIR"} <= set(exported)
    assert "s3cret" not in " ".join(argv) and "s3cret" not in plan.describe()
    assert plan.submit.env["MASTER_ADDR"] == "a" and plan.submit.env["MASTER_PORT"] == "29555"
    tail = argv[argv.index("dsl.launcher.host.mpirank") - 2:]
    assert tail[3:] == ["--slots=0,1;0", "--visible-devices", "--", "/py", str(write("t.py", "")), "x"]
    hostfile = next(v for k, v in plan.files.items() if k.endswith("mpi-hostfile"))
    assert hostfile == "a slots=2\nb slots=1\n"


def test_ssh_paths_with_spaces_are_refused(write):
    with pytest.raises(UserError, match="mpirun splits its ssh options on spaces"):
        _plan(write, extra="    identity_file: /my keys/id\n")
