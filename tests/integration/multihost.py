"""Helpers for tests that launch real jobs on the test cluster (tests/cluster)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import ROOT

SCRIPT = ROOT / "tests/integration/scripts/torchrun_script.py"


def write_spec(cluster, folder: Path, backend: str, run: str, hosts=("node1", "node2"),
               slots: int = 1, extra: str = "") -> Path:
    """A spec for `backend` on the cluster's hosts; `run` is the YAML of the run: section body."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hostfile").write_text("".join(f"{h} slots={slots}\n" for h in hosts))
    spec = folder / "job.yaml"
    spec.write_text(
        f"name: mh-{backend}\n"
        f"run:\n{run}\n  python: {sys.executable}\n  workdir: {folder}\n"
        f"resources:\n  backend: {backend}\n  hostfile: hostfile\n"
        f"  ssh:\n    user: root\n    identity_file: {cluster.ssh_key}\n"
        f"    known_hosts: {cluster.known_hosts}\n"
        f"output_dir: {folder / 'out'}\n{extra}")
    return spec


def script_run(*args: str) -> str:
    return f"  script: {SCRIPT}\n  args: {json.dumps(list(args))}"


def dsl_argv(cluster, *args: str) -> list[str]:
    """`dsl ARGS` run from the cluster's head (host names resolve there)."""
    return cluster.on_head([sys.executable, "-m", "dsl.launcher", *args])


def run_dsl_on_head(cluster, *args: str, timeout: float = 180, env: dict | None = None):
    import os

    return subprocess.run(dsl_argv(cluster, *args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **cluster.env(), **(env or {})})


def start_dsl_on_head(cluster, *args: str) -> subprocess.Popen:
    import os

    return subprocess.Popen(dsl_argv(cluster, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **cluster.env()})


class Lines:
    """Collects a running dsl's stdout in the background; wait_for() a line."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, args=(proc.stdout,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()

    def wait_for(self, text: str, count: int = 1, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while sum(text in line for line in self.lines) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"never saw {count} x {text!r}; got:\n{''.join(self.lines)[-3000:]}")
                self._cond.wait(left)


def job_processes(cluster, marker: str) -> dict[str, list[int]]:
    """host -> PIDs of processes inside that host's namespaces whose command line has `marker`."""
    out = {}
    for host in cluster.hosts:
        pids = []
        for proc in cluster.processes_on(host):
            try:
                if any(marker in part for part in proc.cmdline()):
                    pids.append(proc.pid)
            except Exception:  # the process ended while we looked
                continue
        out[host] = pids
    return out


def wait_until(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()
