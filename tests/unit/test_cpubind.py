"""resources.bind: the per-rank CPU sets (topology/cpubind.py), how they reach the ranks (the
starter's rewrite of torchrun's program, launcher/host/elastic.py), and the spec and render sides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsl.engine.errors import UserError
from dsl.launcher.hosts import Host
from dsl.launcher.plan import RenderInputs
from dsl.launcher.render import render
from dsl.launcher.spec import load_spec
from dsl.topology.cpubind import BindError, decode, encode, numa_layout, rank_cores

TWO_NODES = {0: (0, 1, 2, 3), 1: (4, 5, 6, 7)}


def test_cores_are_disjoint_contiguous_shares_inside_numa_nodes():
    sets = rank_cores("cores", 2, frozenset(range(8)), TWO_NODES)
    assert sets == [(0, 1, 2, 3), (4, 5, 6, 7)]
    sets = rank_cores("cores", 3, frozenset(range(8)), TWO_NODES)
    assert sets == [(0, 1, 2), (3, 4, 5), (6, 7)]  # the remainder goes to the first ranks
    assert sorted(c for s in sets for c in s) == list(range(8))


def test_cores_use_only_the_usable_cpus():
    # The affinity mask (cgroup cpuset, taskset) leaves out 1 and 5.
    sets = rank_cores("cores", 2, frozenset({0, 2, 3, 4, 6, 7}), TWO_NODES)
    assert sets == [(0, 2, 3), (4, 6, 7)]
    assert rank_cores("cores", 2, frozenset({0, 1}), {}) == [(0,), (1,)]  # no NUMA info needed


def test_numa_is_round_robin_over_nodes():
    sets = rank_cores("numa", 3, frozenset(range(8)), TWO_NODES)
    assert sets == [(0, 1, 2, 3), (4, 5, 6, 7), (0, 1, 2, 3)]


def test_binds_that_cannot_apply_say_why():
    with pytest.raises(BindError, match=r"3 ranks on 2 usable CPU\(s\) 0-1: lower procs_per_node to 2"):
        rank_cores("cores", 3, frozenset({0, 1}), {0: (0, 1)})
    with pytest.raises(BindError, match="no NUMA node"):
        rank_cores("numa", 2, frozenset({0, 1}), {})


def test_cpu_sets_round_trip_in_kernel_cpulist_form():
    sets = [(0, 1, 2, 5), (7,), (8, 9)]
    assert encode(sets) == "0-2,5;7;8-9"
    assert decode(encode(sets)) == sets


def test_numa_layout_reads_sys(tmp_path):
    for node, cpus in ((1, "4-7"), (0, "0-3")):
        folder = tmp_path / f"devices/system/node/node{node}"
        folder.mkdir(parents=True)
        (folder / "cpulist").write_text(cpus + "\n")
    assert numa_layout(tmp_path) == TWO_NODES
    assert numa_layout(tmp_path / "nothing") == {}


def test_starter_runs_each_rank_through_the_binder(monkeypatch):
    from torch.distributed.run import parse_args

    from dsl.launcher.host.elastic import bind_ranks

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("DSL_CPU_SETS", raising=False)
    args = parse_args(["--nproc-per-node=1", "-m", "dsl.engine.train", "x.yaml"])
    sets = bind_ranks(args, "cores")
    assert sets == [tuple(sorted(os.sched_getaffinity(0)))]
    assert os.environ["DSL_CPU_SETS"] == encode(sets) and os.environ["DSL_CPU_OMP"] == "1"
    assert args.no_python and not args.module and args.training_script == sys.executable
    assert args.training_script_args == ["-m", "dsl.engine.cpubind", "--", sys.executable, "-u", "-m",
                                         "dsl.engine.train", "x.yaml"]


def test_binder_pins_then_execs_the_program():
    cpu = min(os.sched_getaffinity(0))
    env = dict(os.environ, LOCAL_RANK="1", DSL_CPU_SETS=f"{cpu};{cpu}", DSL_CPU_OMP="1")
    env.pop("OMP_NUM_THREADS", None)
    out = subprocess.run(
        [sys.executable, "-m", "dsl.engine.cpubind", "--", sys.executable, "-c",
         "import os; print(sorted(os.sched_getaffinity(0)), os.environ['OMP_NUM_THREADS'], "
         "'DSL_CPU_OMP' in os.environ)"],
        env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [f"[{cpu}]", "1", "False"]  # two ranks share one CPU: 1 thread each
    bad = subprocess.run([sys.executable, "-m", "dsl.engine.cpubind", "--", "true"],
                         env=dict(env, DSL_CPU_SETS="0"), capture_output=True, text=True)
    assert bad.returncode == 2 and "cannot bind local rank '1'" in bad.stderr


def _spec(tmp_path: Path, resources: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(f"name: b\nrun:\n  script: s.py\nresources:\n{resources}")
    return path


def test_spec_bind_reaches_every_backend(tmp_path):
    inputs = RenderInputs(python="/py", cwd="/w", master_port=29500, env_values={},
                          set_visible_devices=False)
    local = render(load_spec(_spec(tmp_path, "  procs_per_node: 2\n  bind: cores\n")),
                   [Host("localhost", (0, 1))], inputs)
    assert local.hosts[0].env["DSL_BIND"] == "cores"
    slurm = render(load_spec(_spec(tmp_path, "  backend: slurm\n  procs_per_node: 2\n  bind: numa\n")),
                   [Host("n1", (0, 1))], inputs)
    assert "export DSL_BIND=numa" in next(v for k, v in slurm.files.items() if k.endswith("sbatch.sh"))
    none = render(load_spec(_spec(tmp_path, "  procs_per_node: 2\n")), [Host("localhost", (0, 1))], inputs)
    assert "DSL_BIND" not in none.hosts[0].env


def test_unknown_bind_is_a_located_error(tmp_path):
    with pytest.raises(UserError, match=r"job.yaml:6:9.*resources.bind.*'numa'.*'cores'"):
        load_spec(_spec(tmp_path, "  procs_per_node: 2\n  bind: socket\n"))
