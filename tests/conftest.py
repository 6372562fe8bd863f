"""Shared test helpers: run the real `dsl` command, find leftover processes by a marker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytest_plugins = ["tests.cluster.pytest_plugin"]

ROOT = Path(__file__).resolve().parent.parent


def wants_gpu(markexpr: str) -> bool:
    """True for a run that selects the `gpu` tests (`make test-gpu`: `-m gpu`)."""
    expr = " ".join(markexpr.split())
    return "gpu" in expr and "not gpu" not in expr


def pytest_configure(config: pytest.Config) -> None:
    # The CPU suite runs on gloo and the CPU even on a GPU host: with GPUs visible the engine
    # would pick NCCL and cuda:LOCAL_RANK for the ranks that tests start ("invalid device
    # ordinal" when a test starts more ranks than the host has GPUs). Hidden before anything
    # imports torch, and inherited by every process a test starts. `-m gpu` keeps them.
    if not wants_gpu(config.option.markexpr or ""):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    # dsl's cache folder (a host's measured process baseline, topology/baseline.py) is the suite's
    # own, empty at its start: what an earlier `dsl probe --measure-baseline` on this machine
    # stored must not change the plans the tests check. Inherited by every process they start.
    import tempfile

    os.environ["DSL_CACHE_DIR"] = tempfile.mkdtemp(prefix="dsl-test-cache-")
DSL = [sys.executable, "-m", "dsl.launcher"]


def run_dsl(*args: str, cwd: Path | None = None, timeout: float = 120, env: dict | None = None,
            check: bool = False) -> subprocess.CompletedProcess:
    """Run `dsl ARGS` as a user would (a fresh process), capturing stdout and stderr."""
    full_env = dict(os.environ)
    full_env.pop("DSL_DEBUG", None)
    full_env.update(env or {})
    proc = subprocess.run([*DSL, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"dsl {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def processes_with(marker: str) -> list[psutil.Process]:
    """Live processes whose command line mentions `marker` (zombies excluded)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
                continue
            if any(marker in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            pass
    return found


@pytest.fixture
def write(tmp_path: Path):
    """write("name.yaml", text) -> path, in the test's own folder."""

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    return _write
