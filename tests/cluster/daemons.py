"""Daemons of the test cluster: started here, recorded in state.json with their start time, stopped by PID only."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import psutil

from tests.cluster.handle import Cluster, ClusterError, DAEMON_PATH, STATE_DIR, STOP_TIMEOUT
from tests.cluster.system import _tail, _write

_CHILDREN: dict[int, subprocess.Popen] = {}  # daemons this process started, so that it can reap them


def _state_path() -> Path:
    return STATE_DIR / "state.json"


def _load_state() -> dict:
    try:
        return json.loads(_state_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_state(state: dict) -> None:
    if STATE_DIR.is_dir():
        _write(_state_path(), json.dumps(state, indent=1, sort_keys=True) + "\n", 0o600)


def _alive(rec: dict | None) -> bool:
    if not rec:
        return False
    child = _CHILDREN.get(rec["pid"])
    if child is not None and child.poll() is not None:
        return False
    try:
        proc = psutil.Process(rec["pid"])
        return abs(proc.create_time() - rec["ctime"]) < 0.5 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _daemon_pids_of_host(host: str) -> list[int]:
    daemons = _load_state().get("daemons", {})
    return [rec["pid"] for name, rec in daemons.items() if name.endswith(f"@{host}") and _alive(rec)]


def _daemon_env(cluster: Cluster) -> dict[str, str]:
    return {"PATH": DAEMON_PATH, "HOME": "/root", "LANG": "C.UTF-8", "SLURM_CONF": str(cluster.slurm_conf)}


def _spawn(name: str, argv: list[str], out: Path, logs: list[Path], env: dict[str, str]) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "ab") as f:
        f.write(f"--- {time.strftime('%F %T')} starting {name}: {shlex.join(argv)}\n".encode())
        f.flush()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                    env=env, cwd="/", start_new_session=True)
        except OSError as exc:
            raise ClusterError(f"cannot start {name}: {exc}") from None
    _CHILDREN[proc.pid] = proc
    try:
        ctime = psutil.Process(proc.pid).create_time()
    except psutil.Error:
        ctime = 0.0
    return {"pid": proc.pid, "ctime": ctime, "argv": argv, "out": str(out), "logs": [str(p) for p in logs]}


def _describe(name: str, rec: dict) -> str:
    parts = [f"--- {name} (pid {rec['pid']}) output {rec['out']}:", _tail(rec["out"])]
    for log in rec.get("logs", []):
        parts += [f"--- {name} log {log}:", _tail(log)]
    return "\n".join(parts)


def _wait_ready(what: dict[str, tuple[dict, Callable[[], bool]]], timeout: float) -> None:
    """Wait until every check passes; raise with the log tails if a daemon dies or time runs out."""
    pending = dict(what)
    deadline = time.monotonic() + timeout
    while pending:
        for name, (rec, check) in list(pending.items()):
            if check():
                del pending[name]
            elif not _alive(rec):
                raise ClusterError(f"{name} exited during start-up\n{_describe(name, rec)}")
        if not pending:
            return
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:g}s waiting for {', '.join(pending)}\n"
                               + "\n".join(_describe(n, r) for n, (r, _) in pending.items()))
        time.sleep(0.03)


def _stop(recs: dict[str, dict], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the recorded daemons that are still alive, SIGKILL what is left after timeout, reap ours."""
    live = {name: rec for name, rec in recs.items() if _alive(rec)}
    for rec in live.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(rec["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_alive(r) for r in live.values()) and time.monotonic() < deadline:
        time.sleep(0.03)
    for rec in live.values():
        if _alive(rec):
            with contextlib.suppress(ProcessLookupError):
                os.kill(rec["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 2
    while any(_alive(r) for r in live.values()) and time.monotonic() < deadline:
        time.sleep(0.03)
    for rec in recs.values():
        child = _CHILDREN.pop(rec["pid"], None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=0.5)


def _kill_pids(pids: list[int], timeout: float = STOP_TIMEOUT) -> None:
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            proc.terminate()
            procs.append(proc)
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=2)
