"""`dsl launch`: spec -> hosts -> plan -> backend, one path for the real run and the dry run.

`prepare()` does the look-ups a plan needs (hostfile, GPU count, env file, a free port) and calls
the pure `render()`; `--dry-run` prints its result. `execute()` writes the run folder and hands
the same plan to the backend under supervision.

Which devices a local run without a hostfile uses: the entries of this shell's
CUDA_VISIBLE_DEVICES when it lists any (passed through verbatim, one rank each; DeepSpeed's
launcher reads it as `--include localhost:<entries>`), else the GPUs NVML finds
(topology/gpus.py) or a recorded topology lists (launcher/planspec.py). With a hostfile its slots
decide, and a CUDA_VISIBLE_DEVICES of this shell is ignored with a log line saying so. Several
MIG instances never go to the ranks of one host (launcher/hosts.py, `one_rank_per_mig`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsl.engine.config import unsupported_reason
from dsl.engine.errors import UserError
from dsl.engine.writefail import write_failed
from dsl.launcher import hosts as hostlib
from dsl.launcher import envsources
from dsl.launcher.plan import LaunchPlan, RenderInputs, plan_json
from dsl.launcher.render import render
from dsl.launcher.ports import PortReservation, hold_port, reserve_port
from dsl.launcher.spec import SpecFile, check_engine, load_spec
from dsl.topology.gpus import count_gpus, visible_devices

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    spec_file: SpecFile
    plan: LaunchPlan
    port: PortReservation | None
    memory: Any = None
    """The planner's answer (launcher.planner.Plan) for a bundled-engine run, else None."""


def in_slurm_allocation() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_JOB_NODELIST"))


def _slurm_hosts(spec_file: SpecFile) -> list[hostlib.Host]:
    """Inside an allocation: its hosts. Otherwise placeholders for the nodes sbatch will get."""
    res = spec_file.spec.resources
    if res.hostfile:
        raise UserError(f"{spec_file.where('resources', 'hostfile')}: with backend slurm, Slurm "
                        "chooses the hosts; remove hostfile (use slurm.constraint or extra_sbatch)")
    nproc = res.procs_per_node if isinstance(res.procs_per_node, int) else \
        (res.slurm.gpus_per_node or 1)
    if in_slurm_allocation():
        from dsl.launcher.backends.slurm import allocation_hosts

        names = allocation_hosts()
        if res.nodes and res.nodes > len(names):
            raise UserError(f"{spec_file.where('resources', 'nodes')}: nodes: {res.nodes} but the "
                            f"allocation {os.environ['SLURM_JOB_ID']} has {len(names)} node(s)")
        names = names[:res.nodes] if res.nodes else names
    else:
        names = [f"slurm-node{i}" for i in range(res.nodes or 1)]
    return [hostlib.Host(name, tuple(range(nproc))) for name in names]


def launching_visible_devices() -> tuple[str, ...] | None:
    """The CUDA_VISIBLE_DEVICES entries of the shell that runs dsl (None: unset)."""
    return visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"))


def _say_hostfile_wins(spec_file: SpecFile) -> None:
    """A hostfile's slots are physical indices and decide the devices, as in DeepSpeed; a
    CUDA_VISIBLE_DEVICES of this shell does not reach the ranks, which is worth a line."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw:
        log.warning("CUDA_VISIBLE_DEVICES=%s of this shell is ignored: the hostfile's slots (%s) choose "
                    "each host's devices, and its ranks get CUDA_VISIBLE_DEVICES from them; to use other "
                    "devices, select their slots with resources.include", raw,
                    spec_file.where("resources", "hostfile"))


def _local_hosts(spec_file: SpecFile, num_procs: int | None) -> tuple[list[hostlib.Host], bool]:
    """This host: on the devices this shell's CUDA_VISIBLE_DEVICES lists, else on the GPUs NVML
    finds (topology/gpus.py), one rank per device unless procs_per_node says otherwise."""
    visible = launching_visible_devices()
    if visible:
        raw = os.environ["CUDA_VISIBLE_DEVICES"]
        try:
            hosts = one_rank_per_mig(spec_file, hostlib.visible_host(visible, num_procs))
        except UserError as exc:
            raise UserError(f"{spec_file.where('resources', 'procs_per_node')}: {exc}") from None
        log.info("procs_per_node %s: %d rank(s) on CUDA_VISIBLE_DEVICES=%s of this shell (passed through)",
                 num_procs or "auto", len(hosts[0].slots), raw)
        return hosts, True
    gpus = count_gpus()
    count = num_procs or gpus.count or 1
    if num_procs is None:
        log.info("procs_per_node auto: %d (%s)", count, gpus.reason)
    try:
        hosts = one_rank_per_mig(spec_file, hostlib.local_host(count, devices=gpus.devices))
    except UserError as exc:
        raise UserError(f"{spec_file.where('resources', 'procs_per_node')}: {exc}") from None
    return hosts, gpus.count > 0


def one_rank_per_mig(spec_file: SpecFile, hosts: list[hostlib.Host]) -> list[hostlib.Host]:
    """hosts.one_rank_per_mig on the local host, its note logged (its error is the caller's to
    locate)."""
    host, note = hostlib.one_rank_per_mig(hosts[0], isinstance(spec_file.spec.resources.procs_per_node, int))
    if note:
        log.warning(note)
    return [host]


def resolve_spec_hosts(spec_file: SpecFile) -> tuple[list[hostlib.Host], bool]:
    """The hosts of a spec and whether CUDA_VISIBLE_DEVICES should pin their devices."""
    res = spec_file.spec.resources
    num_procs = res.procs_per_node if isinstance(res.procs_per_node, int) else None
    if res.backend == "slurm":
        return _slurm_hosts(spec_file), False
    if res.hostfile:
        try:
            pool = hostlib.load_hostfile(spec_file.resolve(res.hostfile))
            selected = hostlib.select_hosts(pool, res.include, res.exclude, res.nodes, num_procs)
        except UserError as exc:
            field = "include" if res.include else "exclude" if res.exclude else "hostfile"
            raise UserError(f"{spec_file.where('resources', field)}: {exc}") from None
        if res.backend == "local" and len(selected) > 1:
            raise UserError(
                f"{spec_file.where('resources', 'backend')}: the local backend runs on this machine "
                f"only, but {len(selected)} hosts are selected; use backend ssh, slurm or mpi")
        _say_hostfile_wins(spec_file)
        return selected, True
    if res.backend in ("ssh", "mpi"):
        raise UserError(f"{spec_file.where('resources', 'hostfile')}: backend {res.backend} needs "
                        "a hostfile (`hostname slots=N` lines)")
    if res.nodes and res.nodes > 1:
        raise UserError(f"{spec_file.where('resources', 'nodes')}: nodes: {res.nodes} needs "
                        "resources.hostfile (or backend slurm); without one dsl runs on this host")
    return _local_hosts(spec_file, num_procs)


def _render_inputs(spec_file: SpecFile, pin: bool, reserve: bool) -> tuple[RenderInputs, PortReservation | None]:
    """What render needs from this machine: env values, interpreter, and the master port (held
    until the ranks start when `reserve`)."""
    spec = spec_file.spec
    port: PortReservation | None = None
    master_port = spec.resources.master_port
    if spec.resources.backend == "slurm":
        pass  # decided on the nodes: the spec's port, or one derived from the job id
    elif master_port == "auto":
        port = reserve_port()
        master_port = port.port
        if not reserve:
            port.release()
            port = None
    elif reserve and spec.resources.backend == "local":
        try:
            port = hold_port(master_port)
        except UserError as exc:
            raise UserError(f"{spec_file.where('resources', 'master_port')}: {exc}") from None
    env = envsources.env_values(spec_file)
    env_values = env.values
    inputs = RenderInputs(
        python=sys.executable,
        cwd=os.getcwd(),
        master_port=master_port,
        env_values=env_values,
        # The spec's own CUDA_VISIBLE_DEVICES (env.vars, env.file, env.forward) wins on every
        # backend: dsl then writes none (mpi: dsl.launcher.mpirank would replace it on the hosts).
        set_visible_devices=pin and "CUDA_VISIBLE_DEVICES" not in env_values,
        in_slurm_allocation=in_slurm_allocation(),
        is_root=hasattr(os, "geteuid") and os.geteuid() == 0,
        secrets=frozenset(env.secrets),
    )
    return inputs, port


def probe_spec_hosts(spec_path: str | os.PathLike[str]) -> dict[str, Any]:
    """`dsl probe SPEC`: every host of the spec, probed over its backend -> {host: HostTopology}."""
    from dsl.launcher import remote_probe

    spec_file = load_spec(spec_path)
    if spec_file.spec.resources.backend == "slurm" and not in_slurm_allocation():
        raise UserError(f"{spec_file.where('resources', 'backend')}: Slurm has not allocated the hosts "
                        "yet; run `dsl probe SPEC` inside an allocation (salloc), or probe a node "
                        "with `srun -N1 dsl probe`")
    hosts, pin = resolve_spec_hosts(spec_file)
    inputs, _ = _render_inputs(spec_file, pin, reserve=False)
    return remote_probe.probe_hosts(render(spec_file, hosts, inputs))


def prepare(spec_path: str | os.PathLike[str], *, reserve: bool = True,
            backend: str | None = None, topology: str | None = None,
            refuse_unfit: bool = True) -> Prepared:
    """Everything up to the plan. `reserve=False` (dry run) picks a port without holding it;
    `backend` overrides the spec's (`dsl sbatch` renders any spec for Slurm); `topology`
    overrides resources.topology; `refuse_unfit=False` (`dsl plan`) returns a plan that does not
    fit instead of raising."""
    spec_file = load_spec(spec_path)
    if backend is not None and backend != spec_file.spec.resources.backend:
        resources = spec_file.spec.resources.model_copy(update={"backend": backend})
        spec_file = dataclasses.replace(spec_file, spec=spec_file.spec.model_copy(update={"resources": resources}))
    spec = spec_file.spec
    if spec.run.script is not None:
        script = spec_file.resolve(spec.run.script)
        if not script.is_file():
            raise UserError(f"{spec_file.where('run', 'script')}: no such script: {script}")
    # A recorded topology (resources.topology, --topology) stands for this host: it decides
    # procs_per_node auto; then the planner fills `auto` engine fields from memory + topology
    # and refuses what does not fit, before anything starts.
    from dsl.launcher import planspec

    hosts, pin = planspec.recorded_hosts(spec_file, topology, launching_visible_devices()) \
        or resolve_spec_hosts(spec_file)
    # load_spec checked the engine section with what the spec alone says; now the hosts fix the
    # world (engine/validity.py: sequence_parallel and train_batch against the ranks).
    ranks = [len(h.slots) for h in hosts]
    check_engine(spec_file, sum(ranks) or None, max(ranks, default=0) or None)
    inputs, port = _render_inputs(spec_file, pin, reserve)
    backend = spec.resources.backend
    dry_run = not reserve and refuse_unfit

    def probe_remote():
        """The weakest host's topology, probed over the backend (None: hosts not allocated yet).
        A dry run reaches remote hosts only when `auto` fields need their hardware."""
        if backend == "slurm" and not inputs.in_slurm_allocation:
            return None
        from dsl.launcher import remote_probe

        probed = remote_probe.probe_hosts(render(spec_file, hosts, inputs))
        name, topo = remote_probe.weakest(probed)
        log.info("planner: planning for %s, the weakest of %d probed host(s)", name, len(probed))
        return topo

    spec_file, hosts, pin, memory_plan = planspec.resolve(
        spec_file, hosts, pin, topology=topology, refuse=refuse_unfit, runnable=unsupported_reason,
        probe=probe_remote, probe_only_for_auto=dry_run)
    return Prepared(spec_file, render(spec_file, hosts, inputs), port, memory_plan)


def write_run_folder(plan: LaunchPlan, memory: Any = None) -> Path:
    """The run folder's files (resolved spec, plan.json, ...). Raises WriteError (exit 74).
    `memory` (the planner's Plan, when the hosts were planned) adds the per-rank prediction to
    plan.json: its `memory` key, which the ranks' measured peaks (metrics.jsonl) compare with."""
    out = Path(plan.output_dir)
    try:
        (out / "logs").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_failed(out / "logs", exc, "run folder") from None
    for path, content in plan.files.items():
        _write_atomic(Path(path), content)
    text = plan_json(plan)
    choice = getattr(memory, "launch_choice", None)
    if choice is not None:
        data = json.loads(text)
        peak = choice.breakdown.peak
        data["memory"] = {"predicted_peak_bytes": choice.device_bytes, "predicted_peak_phase": peak.phase,
                          "host_bytes": choice.host_bytes, "nvme_bytes": choice.nvme_bytes,
                          "live": dict(peak.live), "per": "rank (device; on a CPU rank its RAM)"}
        text = json.dumps(data, indent=2)
    _write_atomic(out / "plan.json", text + "\n")
    return out


def _write_atomic(path: Path, content: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_failed(path, exc, "run folder file") from None


def dry_run_text(prepared: Prepared, as_json: bool) -> str:
    if as_json:
        return json.dumps(prepared.plan.to_json(), indent=2)
    text = prepared.plan.describe()
    res = prepared.spec_file.spec.resources
    if res.master_port == "auto" and res.backend != "slurm":
        text += ("\n\n# master_port is auto: this port was free just now; "
                 "`dsl launch` picks (and holds) a free port again when it starts.")
    return text
