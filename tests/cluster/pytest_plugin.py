"""Pytest plugin: the session-scoped `cluster` fixture (register with
`pytest_plugins = ["tests.cluster.pytest_plugin"]` in tests/conftest.py).

The cluster is brought up once per test run (tests.cluster.up(), DSL_TEST_CLUSTER_HOSTS hosts, default
3) and taken down at the end of the session only if a pytest session started it: a cluster that was
up before (`python -m tests.cluster up`) stays up, and one shared by concurrent pytest sessions is
taken down by the last one to finish. If it cannot start, every test that uses it FAILS with the
reason (the components' log tails); it never skips. A cluster that this session failed to start is
taken down again right away.
"""

from __future__ import annotations

import os

import pytest

from tests.cluster.core import Cluster, ClusterError, down, is_up, lease

HOSTS_ENV = "DSL_TEST_CLUSTER_HOSTS"


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    n_hosts = int(os.environ.get(HOSTS_ENV, "3"))
    was_up = False
    held = lease("pytest", n_hosts)
    try:
        was_up = is_up()
        handle = held.__enter__()
    except (ClusterError, OSError, ValueError) as exc:
        reason = str(exc)
        if not was_up:
            try:
                down(verbose=False)  # leave no half-started daemons behind
            except (ClusterError, OSError) as exc2:
                reason += f"\n(and down() failed too: {exc2})"
        pytest.fail(f"the test cluster could not start: {reason}", pytrace=False)
    try:
        yield handle
    finally:
        held.__exit__(None, None, None)
