"""A real multi-host test cluster on this machine: network namespaces as hosts, sshd, Slurm, OpenMPI.

    from tests.cluster import up, down
    cluster = up(3)            # idempotent; raises ClusterError with log tails if something cannot start
    subprocess.run(cluster.on_head(["ssh", "node1", "hostname"]))
    down()                     # idempotent

CLI: python -m tests.cluster up [--hosts N] | down | status | exec HOST -- CMD...
Packages: tests/cluster/install.sh (as root). Pytest fixture: tests/cluster/pytest_plugin.py.
"""

from tests.cluster.core import (
    Cluster,
    ClusterError,
    current,
    down,
    is_up,
    lease,
    make_cluster,
    node_states,
    status,
    up,
)

__all__ = ["Cluster", "ClusterError", "current", "down", "is_up", "lease", "make_cluster", "node_states", "status", "up"]
