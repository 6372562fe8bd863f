"""A host lost mid-run (ssh backend, the test cluster): all of node2's traffic is dropped with
nftables inside its namespace (this kernel has no netem). With the default keepalives (5 s x 3)
`dsl launch` exits within 30 s naming node2, not node1's ranks stuck in their all-reduce, and
nothing of the job is left on any host: node1's ranks are stopped by dsl, node2's by its own
guard, which stops hearing the launcher."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.conftest import ROOT
from tests.integration.multihost import (Lines, job_processes, start_dsl_on_head, wait_until,
                                         write_spec)

pytestmark = pytest.mark.integration

TABLE = "dsl_test_cut"
CUT = f"""table netdev {TABLE} {{
  chain in {{ type filter hook ingress device eth0 priority 0; policy drop; }}
  chain out {{ type filter hook egress device eth0 priority 0; policy drop; }}
}}
"""


def _nft(cluster, host: str, *args: str, rules: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cluster.on_host(host, ["nft", *args]), input=rules, capture_output=True,
                          text=True, timeout=30)


def test_a_partitioned_host_is_named_within_30_s_and_nothing_is_left(cluster, tmp_path):
    run = f"  script: {ROOT / 'tests/integration/scripts/allreduce_loop.py'}"
    spec = write_spec(cluster, tmp_path, "ssh", run)
    dsl = start_dsl_on_head(cluster, "launch", str(spec))
    lines = Lines(dsl)
    try:
        lines.wait_for("[node2:1] ITER 20", timeout_s=120)
        cut = _nft(cluster, "node2", "-f", "-", rules=CUT)
        assert cut.returncode == 0, cut.stderr
        cut_at = time.monotonic()
        code = dsl.wait(timeout=90)
        took = time.monotonic() - cut_at
        stderr = dsl.stderr.read()
    finally:
        _nft(cluster, "node2", "delete", "table", "netdev", TABLE)
        if dsl.poll() is None:
            dsl.kill()
    assert code == 255, stderr[-3000:]
    assert took < 30, f"{took:.1f} s\n{stderr[-3000:]}"
    assert "dsl: job mh-ssh failed: lost contact with host node2 (no answer to ssh keepalives for 15 s)" in stderr
    assert "Traceback" not in stderr
    assert wait_until(lambda: all(not pids for pids in job_processes(cluster, str(tmp_path)).values()), 20), \
        job_processes(cluster, str(tmp_path))
    print(f"dsl exited {took:.1f} s after node2 was cut off\n{stderr[-1500:]}")
