"""`dsl launch`, `dsl plan`, `dsl sbatch`: spec -> hosts -> plan -> backend, one path for all.

`prepare(spec, mode)` does the look-ups a plan needs (the backend's hosts, GPU count, env file,
the master port) and calls the pure `render()`; `execute(prepared, mode)` then acts on it as the
mode says (`Mode`): print it (dry run), report the planner's choice (plan), or write the run
folder and hand the same plan to the backend under supervision (run, launcher/run.py). What a
backend does differently (hosts, port, render, probes) is its object's (launcher/backends/);
which devices a host without a hostfile uses is in launcher/spechosts.py.
"""

from __future__ import annotations

import dataclasses
import enum
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
from dsl.launcher import envsources
from dsl.launcher.backends import Backend, backend_of
from dsl.launcher.plan import LaunchPlan, RenderInputs, plan_json
from dsl.launcher.render import render
from dsl.launcher.ports import PortReservation
from dsl.launcher.spec import SpecFile, check_engine, load_spec, spec_world
from dsl.launcher.spechosts import in_slurm_allocation, launching_visible_devices

log = logging.getLogger(__name__)


class Mode(enum.Enum):
    """What `execute` does with a prepared plan, said rather than derived from flags."""

    DRY_RUN = "dry-run"
    """Print the plan, start nothing; the port is picked, not held; remote hosts are probed only
    when `auto` fields need their hardware; a configuration that does not fit is refused."""
    PLAN = "plan"
    """`dsl plan`: the planner's report, also when nothing fits (then exit 1); hosts probed."""
    RUN = "run"
    """Hold the port, check the hosts (preflight), write the run folder, start and supervise."""


@dataclass
class Prepared:
    spec_file: SpecFile
    plan: LaunchPlan
    port: PortReservation | None
    memory: Any = None
    """The planner's answer (launcher.planner.Plan) for a bundled-engine run, else None."""

    @property
    def backend(self) -> Backend:
        return backend_of(self.spec_file)


def resolve_spec_hosts(spec_file: SpecFile):
    """The hosts of a spec and whether CUDA_VISIBLE_DEVICES should pin their devices."""
    return backend_of(spec_file).resolve_hosts(spec_file)


def _render_inputs(spec_file: SpecFile, pin: bool, hold_port: bool) -> tuple[RenderInputs, PortReservation | None]:
    """What render needs from this machine: env values, interpreter, and the master port (held
    until the ranks start when `hold_port`)."""
    master_port, port = backend_of(spec_file).master_port(spec_file, hold_port)
    env = envsources.env_values(spec_file)
    env_values = env.values
    inputs = RenderInputs(
        python=sys.executable,
        cwd=os.getcwd(),
        master_port=master_port,
        env_values=env_values,
        # The spec's own CUDA_VISIBLE_DEVICES (env.vars, env.file, env.forward) wins on every
        # backend: dsl then writes none (mpi: dsl.launcher.host.mpirank would replace it on the hosts).
        set_visible_devices=pin and "CUDA_VISIBLE_DEVICES" not in env_values,
        in_slurm_allocation=in_slurm_allocation(),
        is_root=hasattr(os, "geteuid") and os.geteuid() == 0,
        secrets=frozenset(env.secrets),
    )
    return inputs, port


def probe_spec_hosts(spec_path: str | os.PathLike[str], measure_baseline: bool = False) -> dict[str, Any]:
    """`dsl probe SPEC`: every host of the spec, probed over its backend -> {host: HostTopology}
    (`measure_baseline`: each measures its CPU process baseline first, engine/baseline.py)."""
    from dsl.launcher import remote_probe

    spec_file = load_spec(spec_path)
    backend = backend_of(spec_file)
    unknown = backend.unknown_hosts(spec_file)
    if unknown:
        raise UserError(unknown)
    hosts, pin = backend.resolve_hosts(spec_file)
    inputs, _ = _render_inputs(spec_file, pin, hold_port=False)
    return remote_probe.probe_hosts(render(spec_file, hosts, inputs), measure_baseline=measure_baseline)


def prepare(spec_path: str | os.PathLike[str], mode: Mode, *, backend: str | None = None,
            topology: str | None = None, node: Any = None) -> Prepared:
    """Everything up to the plan, for `mode` (see Mode). `backend` overrides the spec's
    (`dsl sbatch` renders any spec for Slurm); `topology` overrides resources.topology; `node`
    (launcher/backends/pernode.py NodeArgs, from `dsl launch --node-rank ...`) makes it this
    node's part of a per-node start."""
    spec_file = load_spec(spec_path)
    if backend is not None and backend != spec_file.spec.resources.backend:
        resources = spec_file.spec.resources.model_copy(update={"backend": backend})
        spec_file = dataclasses.replace(spec_file, spec=spec_file.spec.model_copy(update={"resources": resources}))
    if node is not None and node.given():
        from dsl.launcher.backends.pernode import with_node_args

        spec_file = with_node_args(spec_file, node)
        check_engine(spec_file, *(spec_world(spec_file.spec) or (None, None)))
    return prepare_spec(spec_file, mode, topology=topology)


def prepare_spec(spec_file: SpecFile, mode: Mode, *, topology: str | None = None) -> Prepared:
    """`prepare` for a loaded spec (the CLI may have changed its resources)."""
    spec = spec_file.spec
    if spec.run.script is not None:
        script = spec_file.resolve(spec.run.script)
        if not script.is_file():
            raise UserError(f"{spec_file.where('run', 'script')}: no such script: {script}")
    # A recorded topology (resources.topology, --topology) stands for this host: it decides
    # procs_per_node auto; then the planner fills `auto` engine fields from memory + topology
    # and refuses what does not fit, before anything starts.
    from dsl.launcher import planspec

    backend = backend_of(spec_file)
    hosts, pin = planspec.recorded_hosts(spec_file, topology, launching_visible_devices()) \
        or backend.resolve_hosts(spec_file)
    # load_spec checked the engine section with what the spec alone says; now the hosts fix the
    # world (engine/validity.py: sequence_parallel and train_batch against the ranks).
    ranks = [len(h.slots) for h in hosts]
    check_engine(spec_file, sum(ranks) or None, max(ranks, default=0) or None)
    inputs, port = _render_inputs(spec_file, pin, hold_port=mode is Mode.RUN)

    def probe_remote():
        """The weakest host's topology, probed over the backend (None: hosts not allocated yet).
        A dry run reaches remote hosts only when `auto` fields need their hardware."""
        if not backend.hosts_known(inputs):
            return None
        from dsl.launcher import remote_probe

        probed = remote_probe.probe_hosts(render(spec_file, hosts, inputs))
        name, topo = remote_probe.weakest(probed)
        log.info("planner: planning for %s, the weakest of %d probed host(s)", name, len(probed))
        return topo

    try:
        spec_file, hosts, pin, memory_plan = planspec.resolve(
            spec_file, hosts, pin, topology=topology, refuse=mode is not Mode.PLAN,
            runnable=unsupported_reason, probe=probe_remote, probe_only_for_auto=mode is Mode.DRY_RUN)
        return Prepared(spec_file, render(spec_file, hosts, inputs), port, memory_plan)
    except BaseException:
        if port is not None:
            port.release()
        raise


def execute(prepared: Prepared, mode: Mode, *, as_json: bool = False, time_limit: str | None = None,
            preflight: bool = True) -> int:
    """Act on a prepared plan as `mode` says; returns the exit code. DRY_RUN prints the plan
    (`as_json`: as JSON); PLAN prints the planner's report (exit 1 when nothing fits); RUN checks
    the hosts when the backend wants it (`preflight`), runs the job under supervision with the
    `--time-limit` TEXT, and reports how it ended (launcher/run.py)."""
    limit = None
    try:
        if time_limit is not None:
            from dsl.launcher.supervise import time_limit_of

            limit = time_limit_of(prepared.spec_file, time_limit, prepared.plan.backend)
        if mode is Mode.DRY_RUN:
            print(dry_run_text(prepared, as_json))
            return 0
        if mode is Mode.PLAN:
            return _print_plan(prepared, as_json)
    except BaseException:
        if prepared.port is not None:
            prepared.port.release()
        raise
    from dsl.launcher.run import run

    return run(prepared, limit, preflight=preflight and prepared.backend.preflight_before_start)


def _print_plan(prepared: Prepared, as_json: bool) -> int:
    memory = prepared.memory
    if memory is None:
        raise UserError(f"{prepared.spec_file.path}: nothing to plan: dsl plan needs run.train "
                        "(the bundled engine)")
    if as_json:
        # One line: with indent json falls back to its pure-Python encoder, ~0.1 s for a plan's
        # hundreds of candidates, a fifth of `dsl plan`'s 0.5 s budget; `| jq` indents it.
        print(json.dumps({**memory.to_json(), "launch": prepared.plan.to_json()}))
    else:
        from rich.console import Console

        from dsl.launcher.planreport import render as render_report

        out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
        commands = prepared.plan.describe() if memory.launch_choice is not None else None
        render_report(memory, prepared.spec_file.spec.name, commands, out)
    return 1 if memory.choice is None else 0


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
    note = prepared.backend.port_note(prepared.spec_file)
    return text + f"\n\n{note}" if note else text
