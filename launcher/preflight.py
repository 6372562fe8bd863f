"""Preflight: check every host before anything starts (`dsl preflight SPEC`, and `dsl launch`).

One small stdlib-only Python program (PROBE) runs on every host, in parallel, over the plan's
backend (ssh, or locally), and answers in one JSON line: versions of Python, torch and dsl (read
from package metadata, so torch is not imported), the GPU count (NVML), whether the master
address resolves and answers on the ssh port from there, and, on the master host, whether the
rendezvous port is free. `check()` turns the answers into one row per host and check; a failed
row names the host and the fix. Unreachable hosts fail within the connect timeout.
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from dsl.engine.errors import DslError, UserError
from dsl.launcher import shell
from dsl.launcher.backends import get_backend
from dsl.launcher.plan import LaunchPlan

PROBE = r"""
import json, os, platform, socket, sys
from importlib import metadata
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
master, ssh_port, master_port, is_master = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
out = {"python": platform.python_version(), "torch": version("torch"), "dsl": version("dsl"),
       "hostname": socket.gethostname(), "cpus": os.cpu_count()}
try:
    import pynvml
    pynvml.nvmlInit()
    try:
        out["gpus"] = pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()
except Exception as exc:
    out["gpus"] = 0
    out["gpus_reason"] = type(exc).__name__
try:
    addr = socket.getaddrinfo(master, ssh_port, type=socket.SOCK_STREAM)[0][4]
    out["master_ip"] = addr[0]
    with socket.create_connection(addr[:2], timeout=3):
        out["master_reachable"] = True
except OSError as exc:
    out["master_reachable"] = False
    out["master_error"] = str(exc)
if is_master:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", master_port))
            out["port_free"] = True
        except OSError as exc:
            out["port_free"] = False
            out["port_error"] = str(exc)
print(json.dumps(out))
"""

# host, argv -> (exit code, stdout, stderr); raises UserError when the host cannot be reached.
Runner = Callable[[str, list[str]], tuple[int, str, str]]


@dataclass(frozen=True)
class Check:
    host: str
    name: str
    ok: bool
    detail: str


def probe_argv(plan: LaunchPlan, host_index: int) -> list[str]:
    python = plan.hosts[host_index].python
    ssh_port = plan.ssh.port if plan.ssh else 22
    return [python, "-c", PROBE, plan.master_addr, str(ssh_port), str(plan.master_port),
            "1" if host_index == 0 else "0"]


def probe_all(plan: LaunchPlan, run: Runner) -> dict[str, dict | str]:
    """host -> the probe's answer, or a string saying why there is none."""

    def one(index: int) -> dict | str:
        host = plan.hosts[index].host
        try:
            code, out, err = run(host, probe_argv(plan, index))
        except DslError as exc:
            return str(exc)
        if code != 0:
            last = (err.strip().splitlines() or [f"exit {code}"])[-1]
            return f"the probe failed on {host}: {last}"
        try:
            return json.loads(out.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            return f"the probe printed no answer on {host}: {out[-200:]!r}"

    with ThreadPoolExecutor(max_workers=min(32, len(plan.hosts))) as pool:
        answers = list(pool.map(one, range(len(plan.hosts))))
    return {h.host: a for h, a in zip(plan.hosts, answers)}


def check(plan: LaunchPlan, answers: dict[str, dict | str], local_dsl: str | None) -> list[Check]:
    rows: list[Check] = []
    reached = {h: a for h, a in answers.items() if isinstance(a, dict)}
    for host, answer in answers.items():
        if isinstance(answer, str):
            rows.append(Check(host, "reachable", False, answer))
            continue
        rows.append(Check(host, "reachable", True, f"{answer['hostname']}, {answer['cpus']} cpus"))
    for name in ("python", "torch", "dsl"):
        values = {h: a.get(name) for h, a in reached.items()}
        expected = local_dsl if name == "dsl" and local_dsl else _most_common(values.values())
        for host, value in values.items():
            if value is None:
                rows.append(Check(host, name, False, f"{name} is not installed for {plan.hosts[0].python}"))
            elif value != expected:
                rows.append(Check(host, name, False, f"{name} {value}, others have {expected}; "
                                                     "install the same version on every host"))
            else:
                rows.append(Check(host, name, True, value))
    master_host = plan.hosts[0].host
    here = get_backend(plan.backend).runs_here
    for host, answer in reached.items():
        if here or host == master_host:
            rows.append(Check(host, "master", True, f"{plan.master_addr} (this host)"))
        elif answer.get("master_reachable"):
            rows.append(Check(host, "master", True, f"{plan.master_addr} -> {answer['master_ip']}"))
        else:
            rows.append(Check(host, "master", False, f"{plan.master_addr} unreachable from {host}: "
                                                     f"{answer.get('master_error')}; set resources.master_addr"))
    master = reached.get(master_host)
    if master is not None:
        free = master.get("port_free")
        rows.append(Check(master_host, "port", bool(free), f"{plan.master_port} free" if free else
                          f"{plan.master_port} in use ({master.get('port_error')}); "
                          "set resources.master_port: auto or another port"))
    for launch in plan.hosts:
        answer = reached.get(launch.host)
        if answer is None:
            continue
        gpus = answer.get("gpus") or 0
        if gpus == 0:
            rows.append(Check(launch.host, "slots", True, f"{len(launch.slots)} rank(s) on CPU (no GPU)"))
        elif max(launch.slots) >= gpus:
            rows.append(Check(launch.host, "slots", False, f"slots {list(launch.slots)} but only {gpus} "
                                                           "GPU(s) found; fix the hostfile's slots="))
        else:
            rows.append(Check(launch.host, "slots", True, f"{len(launch.slots)} of {gpus} GPU(s)"))
    return rows


def _most_common(values) -> str | None:
    values = [v for v in values if v is not None]
    return max(set(values), key=values.count) if values else None


def failures(rows: list[Check]) -> str | None:
    bad = [r for r in rows if not r.ok]
    if not bad:
        return None
    return "preflight failed:\n" + "\n".join(f"  {r.host}: {r.name}: {r.detail}" for r in bad)


def local_runner(_host: str, argv: list[str]) -> tuple[int, str, str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    return proc.returncode, proc.stdout, proc.stderr


def ssh_runner(plan: LaunchPlan) -> Runner:
    import paramiko
    from invoke.exceptions import CommandTimedOut

    from dsl.launcher.sshconn import connect

    def run(host: str, argv: list[str]) -> tuple[int, str, str]:
        conn = connect(host, plan.ssh)
        try:
            result = conn.run(shell.join(argv), hide=True, warn=True, in_stream=False,
                              timeout=30)
        except (CommandTimedOut, paramiko.SSHException, OSError) as exc:
            raise UserError(f"{host}: preflight probe did not finish: {exc}") from None
        finally:
            conn.close()
        return result.exited, result.stdout, result.stderr

    return run


def runner_for(plan: LaunchPlan) -> Runner:
    """How preflight reaches the plan's hosts: its backend says (launcher/backends/)."""
    return get_backend(plan.backend).preflight_runner(plan)


def local_dsl_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("dsl")
    except metadata.PackageNotFoundError:
        return None


def run_preflight(plan: LaunchPlan, run: Runner | None = None) -> list[Check]:
    answers = probe_all(plan, run or runner_for(plan))
    return check(plan, answers, local_dsl_version())


def table(rows: list[Check]):  # -> rich.table.Table
    from rich.table import Table

    out = Table(title="preflight", show_lines=False)
    for column in ("host", "check", "", "detail"):
        out.add_column(column, overflow="fold")
    for r in rows:
        out.add_row(r.host, r.name, "[green]ok[/]" if r.ok else "[bold red]FAIL[/]", r.detail)
    return out
