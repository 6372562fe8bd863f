"""`dsl launch` on this machine, for real: torchrun's contract, fail-fast, signals, restarts."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import DSL, ROOT, processes_with, run_dsl

pytestmark = pytest.mark.integration
SCRIPT = ROOT / "tests/integration/scripts/torchrun_script.py"


def _spec(tmp_path: Path, args: list[str], procs: int = 2, extra: str = "") -> Path:
    spec = tmp_path / "job.yaml"
    spec.write_text(
        f"name: itest\nrun:\n  script: {SCRIPT}\n  args: {json.dumps(args)}\n"
        f"resources:\n  procs_per_node: {procs}\noutput_dir: {tmp_path / 'out'}\n{extra}")
    return spec


def _rank_lines(stdout: str, tag: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(2)
            for m in re.finditer(rf"^\[localhost:(\d+)\] {tag} (.*)$", stdout, re.M)}


def test_script_sees_the_full_torchrun_environment(tmp_path):
    proc = run_dsl("launch", str(_spec(tmp_path, [])), check=True)
    envs = {rank: json.loads(text) for rank, text in _rank_lines(proc.stdout, "ENV").items()}
    assert sorted(envs) == [0, 1]
    port = json.loads((tmp_path / "out/plan.json").read_text())["master_port"]
    for rank, env in envs.items():
        assert env["RANK"] == env["LOCAL_RANK"] == env["ROLE_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == "2"
        assert env["GROUP_RANK"] == env["NODE_RANK"] == "0"
        assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == str(port)
        assert env["TORCHELASTIC_RESTART_COUNT"] == "0" and env["OMP_NUM_THREADS"] == "1"
    assert _rank_lines(proc.stdout, "ALLREDUCE") == {0: "3", 1: "3"}  # 1 + 2 over gloo
    assert "[localhost:1] to stderr from 1" in proc.stderr  # stderr stays stderr
    logs = tmp_path / "out/logs"
    assert "ALLREDUCE 3" in (logs / "rank1.log").read_text()
    assert "to stderr from 0" in (logs / "rank0.log").read_text()
    assert "finished" in proc.stderr


def test_rank_failure_stops_every_rank_within_5_s(tmp_path):
    marker = f"m-{uuid.uuid4().hex}"
    spec = _spec(tmp_path, ["--fail-rank", "1", "--code", "3", "--sleep", "300", "--marker", marker])
    proc = run_dsl("launch", str(spec), timeout=60)
    ended = time.time()
    assert proc.returncode == 3, proc.stderr
    failed_at = float(re.search(r"\[localhost:1\] EXITING 3 at ([0-9.]+)", proc.stdout).group(1))
    assert ended - failed_at < 5.0
    assert processes_with(marker) == []
    assert "job itest failed: rank 1 on localhost exited with code 3" in proc.stderr
    assert "last lines of rank 1" in proc.stderr and "EXITING 3 at" in proc.stderr.split("last lines")[1]


def test_rank_killed_by_signal_is_named(tmp_path):
    marker = f"m-{uuid.uuid4().hex}"
    proc = run_dsl("launch", str(_spec(tmp_path, ["--kill-rank", "0", "--sleep", "300", "--marker", marker])),
                   timeout=60)
    assert proc.returncode == 128 + signal.SIGKILL
    assert "rank 0 on localhost was killed by SIGKILL" in proc.stderr
    assert processes_with(marker) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_to_dsl_stops_its_job_and_only_its_job(tmp_path, signum):
    marker = f"m-{uuid.uuid4().hex}"
    bystander = subprocess.Popen(["sh", "-c", "sleep 60", marker])  # another "job" sharing the marker
    dsl = subprocess.Popen([*DSL, "launch", str(_spec(tmp_path, ["--sleep", "300", "--marker", marker]))],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_lines(dsl, "SLEEPING", 2, timeout_s=60)
        sent = time.monotonic()
        dsl.send_signal(signum)
        code = dsl.wait(timeout=15)
        assert time.monotonic() - sent < 5.0
        assert code == 128 + signum
        leftovers = [p.pid for p in processes_with(marker)]
        assert leftovers == [bystander.pid]
        assert "interrupted; every rank was stopped" in dsl.stderr.read()
    finally:
        bystander.kill()
        dsl.kill()


def _wait_for_lines(proc: subprocess.Popen, text: str, count: int, timeout_s: float) -> None:
    seen: list[str] = []
    done = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            if text in line:
                seen.append(line)
                if len(seen) >= count:
                    done.set()
                    return

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(timeout_s), f"never saw {count} x {text!r}"


def test_concurrent_launches_choose_different_ports(tmp_path):
    specs = []
    for i in range(3):
        folder = tmp_path / f"job{i}"
        folder.mkdir()
        specs.append(_spec(folder, ["--sleep", "1"]))
    procs = [subprocess.Popen([*DSL, "launch", str(s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for s in specs]
    codes = [p.wait(timeout=120) for p in procs]
    assert codes == [0, 0, 0], [p.stderr.read() for p in procs]
    ports = {json.loads((s.parent / "out/plan.json").read_text())["master_port"] for s in specs}
    assert len(ports) == 3


def test_max_restarts_reruns_the_job(tmp_path):
    flag = tmp_path / "failed-once"
    spec = _spec(tmp_path, ["--fail-rank", "1", "--fail-once", str(flag), "--code", "4"],
                 extra="max_restarts: 1\n")
    proc = run_dsl("launch", str(spec), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert flag.exists()
    assert "restart 1 of 1" in proc.stderr and "attempt 2" in proc.stderr
    log = (tmp_path / "out/logs/rank1.log").read_text()
    assert "# dsl: attempt 1" in log and "# dsl: attempt 2" in log and "DONE" in log
    # Without restarts the same job fails with the rank's code.
    flag.unlink()
    proc = run_dsl("launch", str(_spec(tmp_path, ["--fail-rank", "1", "--fail-once", str(flag), "--code", "4"])))
    assert proc.returncode == 4


def test_usr1_to_the_guard_reaches_every_rank(tmp_path):
    """What Slurm's `--signal=USR1@T` does before the time limit: ranks get it, the job goes on."""
    import psutil

    spec = _spec(tmp_path, ["--on-usr1", "--sleep", "300"])
    dsl = subprocess.Popen([*DSL, "launch", str(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        _wait_for_lines(dsl, "SLEEPING", 2, timeout_s=60)
        guards = [p for p in processes_with(str(tmp_path / "out")) if "dsl.launcher.host.guard" in p.cmdline()]
        assert len(guards) == 1
        guards[0].send_signal(signal.SIGUSR1)
        assert dsl.wait(timeout=20) == 0
        out = dsl.stdout.read()
        assert "[localhost:0] GOT USR1" in out and "[localhost:1] GOT USR1" in out
    finally:
        dsl.kill()
