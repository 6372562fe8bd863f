"""Backend pernode (launcher/backends/pernode.py): `dsl launch SPEC --node-rank N --nnodes M
--master-addr A` plans this node's ranks only, as node N of M, with A as the rendezvous; the spec's
own `backend: pernode` takes the rank from --node-rank or Kubernetes' JOB_COMPLETION_INDEX."""

from __future__ import annotations

import socket

import pytest

from dsl.engine.errors import UserError
from dsl.launcher.backends.pernode import NodeArgs
from dsl.launcher.launch import Mode, prepare

SPEC = ("name: pn\nrun: {script: s.py}\nresources:\n  procs_per_node: 2\n{extra}output_dir: {out}\n")


@pytest.fixture
def spec(tmp_path):
    (tmp_path / "s.py").write_text("print('hi')\n")

    def write(extra: str = "") -> str:
        path = tmp_path / "job.yaml"
        path.write_text(SPEC.replace("{extra}", extra).replace("{out}", str(tmp_path / "out")))
        return str(path)

    return write


def _starter(plan) -> str:
    return " ".join(plan.hosts[0].argv)


def test_node_args_plan_this_nodes_ranks_of_the_whole_job(spec):
    plan = prepare(spec(), Mode.DRY_RUN, node=NodeArgs(1, 3, "head-0.svc", 29400)).plan
    (host,) = plan.hosts
    assert (plan.backend, plan.world_size, plan.master_addr, plan.master_port) == ("pernode", 6, "head-0.svc", 29400)
    assert (host.host, host.node_rank, host.ranks) == (socket.gethostname(), 1, (2, 3))
    for flag in ("--nnodes=3", "--node-rank=1", "--nproc-per-node=2", "--master-addr=head-0.svc",
                 "--master-port=29400"):
        assert flag in _starter(plan)
    assert host.env["NODE_RANK"] == "1"
    assert "node_rank 1, ranks 2-3" in plan.describe()


def test_the_port_defaults_to_torchruns_on_every_node(spec):
    plan = prepare(spec(), Mode.DRY_RUN, node=NodeArgs(0, 2, "a")).plan
    assert plan.master_port == 29500 and "--master-port=29500" in _starter(plan)


def test_the_spec_can_say_pernode_and_kubernetes_gives_the_rank(spec, monkeypatch):
    path = spec("  backend: pernode\n  nodes: 2\n  master_addr: job-0.job\n")
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    plan = prepare(path, Mode.DRY_RUN).plan
    assert plan.hosts[0].ranks == (2, 3) and plan.world_size == 4
    monkeypatch.delenv("JOB_COMPLETION_INDEX")
    with pytest.raises(UserError, match=r"job.yaml:\d+:\d+ resources.node_rank: backend pernode needs this "
                                        r"node's rank: `dsl launch SPEC --node-rank N`"):
        prepare(path, Mode.DRY_RUN)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    with pytest.raises(UserError, match="JOB_COMPLETION_INDEX='2' is not a node rank of 2 node"):
        prepare(path, Mode.DRY_RUN)


@pytest.mark.parametrize(("extra", "node", "message"), [
    ("", NodeArgs(2, 2, "a"), "node rank 2 but the job has 2 node"),
    ("", NodeArgs(0, 2), r"resources.master_addr: backend pernode with 2 nodes needs the address of node 0"),
    ("  hostfile: hf\n", NodeArgs(0, 1), r"resources.hostfile: backend pernode runs on the machine it is started on"),
    ("  backend: ssh\n  hostfile: hf\n", NodeArgs(0, 2, "a"), r"resources.backend: --node-rank, --nnodes and "
                                                             r"--master-addr start this node's ranks only"),
])
def test_what_cannot_be_a_per_node_start_is_refused_located(spec, tmp_path, extra, node, message):
    (tmp_path / "hf").write_text("a slots=2\n")
    with pytest.raises(UserError, match=message):
        prepare(spec(extra), Mode.DRY_RUN, node=node)


def test_each_node_locks_the_shared_run_folder_under_its_own_name(spec, tmp_path):
    from dsl.launcher.backends import get_backend
    from dsl.launcher.runlock import acquire

    plans = [prepare(spec(), Mode.DRY_RUN, node=NodeArgs(n, 2, "a")).plan for n in (0, 1)]
    backend = get_backend("pernode")
    names = [backend.lock_name(p) for p in plans]
    assert names == [".dsl-launch.node0.lock", ".dsl-launch.node1.lock"]
    with acquire(tmp_path / "out", "pn", "here", names[0]), acquire(tmp_path / "out", "pn", "here", names[1]):
        with pytest.raises(UserError, match="is in use by job pn"):
            acquire(tmp_path / "out", "pn", "here", names[1])
