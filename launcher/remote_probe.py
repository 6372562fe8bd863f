"""Probe every host of a plan over its backend: the topology the planner plans for.

`python -m dsl.topology.probe` runs on each host, in parallel, the way preflight reaches it
(ssh for the ssh and mpi backends, `srun -w HOST` inside a Slurm allocation, a subprocess for
local) and answers with one JSON recording (NVML answers + host facts, the format of
`dsl probe --record`). The planner plans for the weakest host: hosts of one job should be alike,
and a plan that fits the smallest device and the smallest RAM fits all of them.
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

from dsl.engine.errors import DslError, UserError
from dsl.launcher import preflight, shell
from dsl.launcher.plan import LaunchPlan
from dsl.topology.model import HostTopology

TIMEOUT_S = 60


def probe_argv(python: str, measure_baseline: bool = False) -> list[str]:
    return [python, "-m", "dsl.topology.probe", *(["--measure-baseline"] if measure_baseline else [])]


def srun_runner(host: str, argv: list[str]) -> tuple[int, str, str]:
    proc = subprocess.run(["srun", "--nodes=1", "--ntasks=1", f"--nodelist={host}", "--export=ALL",
                           "--quiet", *argv], capture_output=True, text=True, timeout=TIMEOUT_S)
    return proc.returncode, proc.stdout, proc.stderr


def runner_for(plan: LaunchPlan) -> preflight.Runner:
    from dsl.launcher.backends import get_backend

    return get_backend(plan.backend).probe_runner(plan)


def probe_hosts(plan: LaunchPlan, run: preflight.Runner | None = None,
                measure_baseline: bool = False) -> dict[str, HostTopology]:
    """host -> its topology. A host that cannot be probed is a UserError naming it and the fix.
    `measure_baseline`: each host measures its process baseline first (engine/baseline.py)."""
    from dsl.topology.probe import from_data

    run = run or runner_for(plan)

    def one(index: int) -> HostTopology | str:
        launch = plan.hosts[index]
        try:
            code, out, err = run(launch.host, probe_argv(shell.unwrapped(launch.argv)[0], measure_baseline))
        except DslError as exc:
            return str(exc)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"{launch.host}: cannot run the probe: {exc}"
        if code != 0:
            last = (err.strip().splitlines() or [f"exit {code}"])[-1]
            return f"{launch.host}: the probe failed: {last}"
        try:
            data = json.loads(out.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            return f"{launch.host}: the probe printed no answer: {out[-200:]!r}"
        try:
            return from_data(data, f"probe of {launch.host}")
        except UserError as exc:
            return str(exc)

    with ThreadPoolExecutor(max_workers=min(32, len(plan.hosts))) as pool:
        answers = list(pool.map(one, range(len(plan.hosts))))
    errors = [a for a in answers if isinstance(a, str)]
    if errors:
        raise UserError("cannot probe every host (dsl needs python, dsl and psutil there; "
                        "`dsl preflight SPEC` checks them):\n" + "\n".join(f"  {e}" for e in errors))
    return {launch.host: topo for launch, topo in zip(plan.hosts, answers)}


def weakest(topologies: dict[str, HostTopology]) -> tuple[str, HostTopology]:
    """The host the plan must fit: least memory per accelerator, then least RAM."""

    def key(item: tuple[str, HostTopology]) -> tuple[int, int, int]:
        topo = item[1]
        device = min((a.memory_bytes or 0 for a in topo.accelerators), default=0)
        return (0 if topo.accelerators else 1, device, topo.ram_limit_bytes or topo.ram_bytes or 0)

    hosts = sorted(topologies.items(), key=key)
    with_gpus = [h for h in hosts if h[1].accelerators]
    return (with_gpus or hosts)[0]
