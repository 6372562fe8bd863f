"""The pernode backend: this machine's ranks of a job whose nodes a scheduler starts one by one.

Kubernetes (an Indexed Job), PBS, LSF and cloud batch services start one process per node
themselves, like DeepSpeed's `--no_ssh` and torchrun's per-node form expect. On every node:

    dsl launch SPEC --node-rank N --nnodes M --master-addr A [--master-port P]

(or `backend: pernode` with resources.nodes / master_addr / master_port in the spec and the node
rank from `--node-rank` or Kubernetes' JOB_COMPLETION_INDEX). Each node runs the same guard +
torchrun as the local backend (`hostcmd.render_per_host`) with `--nnodes=M --node-rank=N` and the
given master: its ranks are N*R .. N*R+R-1 for R ranks per node (procs_per_node, or one per
device found), so every node must have as many ranks. Node 0 hosts the rendezvous on A:P; the
others wait for it (torchrun's rendezvous timeout). dsl supervises this node only: a failure on
another node reaches this one as its ranks' failed collectives.

The run folder may be shared between the nodes: each node locks it under its own name
(`.dsl-launch.nodeN.lock`) and writes resolved.yaml and plan.json (the same spec; the last
writer's plan.json names its node); the ranks' logs are per rank. `dsl render SPEC --format k8s`
(launcher/k8s.py) writes an Indexed Job that runs this command on every pod.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

from dsl.engine.errors import UserError
from dsl.launcher.backends.local import LocalBackend
from dsl.launcher.hostcmd import render_per_host
from dsl.launcher.plan import Job, LaunchPlan

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500  # torchrun's: every node must agree without talking first
INDEX_ENV = "JOB_COMPLETION_INDEX"  # Kubernetes' Indexed Job sets it in every pod


@dataclass(frozen=True)
class NodeArgs:
    """`dsl launch --node-rank N --nnodes M --master-addr A --master-port P` (None: not given)."""

    node_rank: int | None = None
    nnodes: int | None = None
    master_addr: str | None = None
    master_port: int | None = None

    def given(self) -> bool:
        return any(v is not None for v in (self.node_rank, self.nnodes, self.master_addr, self.master_port))


BY_HAND = "--node-rank, --nnodes and --master-addr start this node's ranks only (backend pernode)"


def with_node_args(spec_file, args: NodeArgs, why: str = BY_HAND):  # (SpecFile, NodeArgs) -> SpecFile
    """The spec as backend pernode with these node values in resources. A spec of another backend
    than local or pernode is refused, saying `why` (its backend starts every host itself)."""
    import dataclasses

    res = spec_file.spec.resources
    if res.backend not in ("local", "pernode"):
        raise UserError(f"{spec_file.where('resources', 'backend')}: {why}; backend {res.backend} "
                        "starts every host itself: set backend: local or pernode")
    update = {"backend": "pernode"}
    for field, value in (("node_rank", args.node_rank), ("nodes", args.nnodes),
                         ("master_addr", args.master_addr), ("master_port", args.master_port)):
        if value is not None:
            update[field] = value
    resources = res.model_copy(update=update)
    spec_file = dataclasses.replace(spec_file, spec=spec_file.spec.model_copy(update={"resources": resources}))
    PerNodeBackend().check_spec(spec_file)
    return spec_file


class PerNodeBackend(LocalBackend):
    """This machine's ranks of a multi-node job; the other nodes are started by a scheduler."""

    name = "pernode"

    def check_spec(self, spec_file) -> None:
        res = spec_file.spec.resources
        nodes = res.nodes or 1
        if res.hostfile:
            raise UserError(f"{spec_file.where('resources', 'hostfile')}: backend pernode runs on the "
                            "machine it is started on (the scheduler chooses the machines); remove hostfile")
        if res.include or res.exclude:
            raise UserError(f"{spec_file.where('resources', 'include' if res.include else 'exclude')}: "
                            "backend pernode has no hostfile to select from")
        if res.node_rank is not None and res.node_rank >= nodes:
            raise UserError(f"{spec_file.where('resources', 'node_rank')}: node rank {res.node_rank} "
                            f"but the job has {nodes} node(s) (nodes / --nnodes): ranks are 0..{nodes - 1}")

    def spec_world(self, res):
        ppn = res.procs_per_node
        return ((res.nodes or 1) * ppn, ppn) if isinstance(ppn, int) else None

    def node_rank(self, spec_file) -> int:
        """The spec's node_rank (from --node-rank), else Kubernetes' JOB_COMPLETION_INDEX."""
        res = spec_file.spec.resources
        if res.node_rank is not None:
            return res.node_rank
        raw = os.environ.get(INDEX_ENV)
        where = spec_file.where("resources", "node_rank")
        if raw is None:
            raise UserError(f"{where}: backend pernode needs this node's rank: "
                            "`dsl launch SPEC --node-rank N` (or an Indexed Job's JOB_COMPLETION_INDEX)")
        if not raw.isdigit() or int(raw) >= (res.nodes or 1):
            raise UserError(f"{where}: {INDEX_ENV}={raw!r} is not a node rank of {res.nodes or 1} node(s)")
        log.info("pernode: node rank %s from %s", raw, INDEX_ENV)
        return int(raw)

    def resolve_hosts(self, spec_file):
        from dsl.launcher import spechosts
        from dsl.launcher.hosts import Host

        hosts, pin = spechosts.local_hosts(spec_file)
        host = hosts[0]
        # The machine's name: logs/torchelastic/NAME and the [NAME:RANK] prefixes tell nodes apart.
        return [Host(socket.gethostname(), host.slots, host.devices)], pin

    def master_port(self, spec_file, hold):
        port = spec_file.spec.resources.master_port
        if port == "auto":
            log.info("pernode: master_port auto is %d (torchrun's default) on every node", DEFAULT_PORT)
            return DEFAULT_PORT, None
        return port, None  # node 0's torchrun binds it; held here, it would be taken

    def port_note(self, spec_file):
        return None

    def render(self, job: Job, hosts) -> LaunchPlan:
        res = job.spec.resources
        nodes = res.nodes or 1
        if nodes > 1 and not res.master_addr:  # may come from the command line: checked only now
            raise UserError(f"{job.spec_file.where('resources', 'master_addr')}: backend pernode with "
                            f"{nodes} nodes needs the address of node 0 (master_addr, or --master-addr): "
                            "every node must find the rendezvous without asking anyone")
        return render_per_host(job, hosts, backend=self.name, nnodes=nodes,
                               first_node_rank=self.node_rank(job.spec_file),
                               master_addr=res.master_addr or "127.0.0.1")

    def where(self, plan) -> str:
        launch = plan.hosts[0]
        return f"this host ({launch.host}), node {launch.node_rank} of {plan.world_size // len(launch.ranks)}"

    def lock_name(self, plan) -> str:
        return f".dsl-launch.node{plan.hosts[0].node_rank}.lock"
