"""One object per backend (launcher/backends/): every registered backend renders, describes and
names its hosts through the same calls, and nothing outside launcher/backends/ branches on a
backend's name (issue 18's acceptance: `git grep 'backend ==' launcher/` outside it is empty)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dsl.launcher.backends import _BACKENDS, Backend, get_backend, time_limit_backends
from dsl.launcher.backends.pernode import NodeArgs
from dsl.launcher.launch import Mode, execute, prepare

LAUNCHER = Path(__file__).resolve().parents[2] / "launcher"
SPEC = ("name: b\nrun: {script: s.py}\nresources:\n  backend: BACKEND\n  procs_per_node: 2\nHOSTFILE"
        "output_dir: OUT\n")


def test_no_module_outside_the_backends_branches_on_a_backend_name():
    pattern = re.compile(r"backend\s*(==|!=)|backend\s+(not\s+)?in\s*\(")
    hits = [f"{path.relative_to(LAUNCHER)}: {line.strip()}"
            for path in sorted(LAUNCHER.rglob("*.py")) if "backends" not in path.parts
            for line in path.read_text().splitlines() if pattern.search(line)]
    # launch.prepare compares the spec's backend with `dsl sbatch`'s override, no branch on a name.
    assert hits == ["launch.py: if backend is not None and backend != spec_file.spec.resources.backend:"]


@pytest.mark.parametrize("name", sorted(_BACKENDS))
def test_every_backend_is_one_object_that_renders_and_describes_its_dry_run(name, tmp_path, capsys):
    (tmp_path / "s.py").write_text("print('hi')\n")
    (tmp_path / "hf").write_text("h1 slots=2\nh2 slots=2\n")
    hostfile = "  hostfile: hf\n" if name in ("ssh", "mpi") else ""
    spec = tmp_path / "job.yaml"
    spec.write_text(SPEC.replace("BACKEND", name).replace("HOSTFILE", hostfile).replace("OUT", str(tmp_path / "o")))
    backend = get_backend(name)
    assert isinstance(backend, Backend) and backend.name == name
    node = NodeArgs(0, 1) if name == "pernode" else None
    prepared = prepare(spec, Mode.DRY_RUN, node=node)
    assert prepared.plan.backend == name and prepared.backend.name == name
    assert execute(prepared, Mode.DRY_RUN) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"job b: ") and f"backend {name}," in out
    assert backend.where(prepared.plan)


def test_the_time_limit_applies_where_dsl_runs_the_hosts_itself():
    assert time_limit_backends() == ["local", "ssh", "pernode"]
