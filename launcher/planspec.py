"""The spec side of planning: which engine fields are free, the topology a spec selects, and
`resolve()`, what `dsl launch` / `dsl plan` call to fill `auto` fields and refuse what does not
fit, before anything starts (the search itself is launcher/planner.py).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Callable

from dsl.engine.config import EngineConfig, mixed_layout
from dsl.engine.errors import UserError
from dsl.launcher.backends import backend_of
from dsl.launcher.hardware import hardware_of
from dsl.engine.modeldesc.shape import shape_of
from dsl.launcher.planner import Free, Plan, search
from dsl.launcher.spec import check_engine
from dsl.topology.model import HostTopology

if TYPE_CHECKING:
    from dsl.launcher.hosts import Host
    from dsl.launcher.spec import SpecFile

log = logging.getLogger(__name__)


def _written(spec_file: "SpecFile", *path: str) -> bool:
    return tuple(path) in spec_file.locations.values


def free_fields(spec_file: "SpecFile") -> Free:
    e = spec_file.spec.engine
    return Free(
        zero_stage=e.zero_stage == "auto",
        offload=e.offload.optimizer == "auto",
        offload_params=not _written(spec_file, "engine", "offload", "params") and e.offload.params == "none",
        sp=e.sequence_parallel == "auto",
        activation_checkpointing=e.activation_checkpointing == "auto",
        micro_batch=not _written(spec_file, "engine", "micro_batch"),
        grad_accum=not _written(spec_file, "engine", "grad_accum"),
    )


def target_batch_of(engine: EngineConfig, world: int) -> int:
    """train_batch when set, else micro_batch x grad_accum x dp, the batch the spec implies: dp is
    world / sequence_parallel (the ranks of an SP group read the same samples), world at sp auto."""
    sp = engine.sequence_parallel if isinstance(engine.sequence_parallel, int) else 1
    return engine.train_batch or engine.micro_batch * engine.grad_accum * max(1, world // sp)


def _concrete(engine: EngineConfig, free: Free) -> EngineConfig:
    """Placeholders for auto fields, so the engine config validates while the planner varies them."""
    return engine.model_copy(update={
        "zero_stage": 0 if engine.zero_stage == "auto" else engine.zero_stage,
        "sequence_parallel": 1 if engine.sequence_parallel == "auto" else engine.sequence_parallel,
        "activation_checkpointing": False if engine.activation_checkpointing == "auto" else engine.activation_checkpointing,
        "offload": engine.offload.model_copy(update={
            "optimizer": "none" if engine.offload.optimizer == "auto" else engine.offload.optimizer}),
    })


def plan_spec(spec_file: "SpecFile", topology: HostTopology, *, hosts: int, ranks_per_host: int,
              runnable: Callable[[EngineConfig], str | None] | None = None) -> Plan:
    """The plan of a spec's bundled-engine run on `hosts` hosts like `topology`."""
    spec = spec_file.spec
    if spec.run.train is None:
        raise UserError(f"{spec_file.where('run')}: dsl plan needs run.train (the bundled engine); "
                        "the memory of a script or module is unknown to dsl")
    model = spec.run.train.model
    shape, model_notes = shape_of(model, spec_file.path.parent,
                                  lambda field: spec_file.where("run", "train", "model", field))
    free = free_fields(spec_file)
    engine = spec.engine
    hw = hardware_of(topology, hosts=hosts, ranks_per_host=ranks_per_host, precision=engine.precision)
    # The rules of engine/validity.py for these hosts (dsl launch checked them already; a direct
    # caller with a topology gets them here): sequence_parallel and train_batch against the ranks.
    check_engine(spec_file, hw.world, hw.ranks_per_host)
    batch = target_batch_of(engine, hw.world)
    plan = search(shape, _concrete(engine, free), hw, batch, free, runnable=runnable)
    plan.fixed = {name: value for name, value in (
        ("zero_stage", engine.zero_stage), ("offload.optimizer", engine.offload.optimizer),
        ("offload.params", engine.offload.params), ("sequence_parallel", engine.sequence_parallel),
        ("activation_checkpointing", engine.activation_checkpointing), ("micro_batch", engine.micro_batch),
        ("grad_accum", engine.grad_accum)) if not getattr(free, _FREE_NAME[name])}
    plan.fixed["precision"] = engine.precision
    plan.notes[:0] = model_notes
    if engine.train_batch is None:
        plan.notes.append(f"train_batch not set: planning for {batch} sequences per step "
                          f"(micro_batch {engine.micro_batch} x grad_accum {engine.grad_accum} x "
                          f"{batch // (engine.micro_batch * engine.grad_accum)} data-parallel ranks)")
    return plan


_FREE_NAME = {"zero_stage": "zero_stage", "offload.optimizer": "offload", "offload.params": "offload_params",
              "sequence_parallel": "sp", "activation_checkpointing": "activation_checkpointing",
              "micro_batch": "micro_batch", "grad_accum": "grad_accum"}


def spec_topology(spec_file: "SpecFile", override: str | None = None) -> HostTopology | None:
    """The topology a spec selects (`--topology` beats `resources.topology`), or None: probe."""
    from dsl.topology.probe import load_topology

    name = override or spec_file.spec.resources.topology
    if name is None:
        return None
    base = None if override else spec_file.path.parent
    key = (name, str(base))
    try:
        if key not in _TOPOLOGIES:
            _TOPOLOGIES[key] = load_topology(name, base=base)
        return _TOPOLOGIES[key]
    except UserError as exc:
        where = "--topology" if override else spec_file.where("resources", "topology")
        raise UserError(f"{where}: {exc}") from None


_TOPOLOGIES: dict[tuple[str, str], HostTopology] = {}


def recorded_hosts(spec_file: "SpecFile", topology: str | None = None,
                   visible: tuple[str, ...] | None = None) -> "tuple[list[Host], bool] | None":
    """(hosts, pin CUDA_VISIBLE_DEVICES) when a recorded topology decides them: local backend,
    no hostfile, procs_per_node auto -> one rank per recorded accelerator (a MIG instance is
    named by its UUID). Otherwise None, also when this shell's CUDA_VISIBLE_DEVICES lists
    devices (`visible`): those decide (launcher/launch.py), the topology only plans."""
    from dsl.launcher import hosts as hostlib

    res = spec_file.spec.resources
    if res.procs_per_node != "auto" or not backend_of(spec_file).runs_here or res.hostfile or visible:
        return None
    topo = spec_topology(spec_file, topology)
    if topo is None:
        return None
    # With MIG instances the indices are CUDA's, not the GPUs': name every device by its UUID then.
    mig = any((a.uuid or "").startswith("MIG-") for a in topo.accelerators)
    devices = [a.uuid if mig and a.uuid else str(a.index) for a in topo.accelerators]
    (host,) = hostlib.local_host(len(devices) or 1, devices=devices)
    host, note = hostlib.one_rank_per_mig(host, explicit=False)
    if note:
        log.warning(note)
    return [host], bool(topo.accelerators)


def resolve(spec_file: "SpecFile", hosts: "list[Host]", pin: bool, *, topology: str | None = None,
            refuse: bool = True, runnable: Callable[[EngineConfig], str | None] | None = None,
            probe: "Callable[[], HostTopology | None] | None" = None, probe_only_for_auto: bool = False,
            ) -> "tuple[SpecFile, list[Host], bool, Plan | None]":
    """Fill the spec's `auto` engine fields (and refuse what does not fit) before anything starts.

    Returns the spec with concrete engine fields, the hosts and whether to pin
    CUDA_VISIBLE_DEVICES (unchanged: see `recorded_hosts`), and the plan (None when there is
    nothing to plan: a script or module, or Slurm hosts not allocated yet and no auto field).
    A recorded topology (resources.topology, --topology) stands for every host; otherwise the
    local host is probed, and remote hosts by `probe` (launcher/remote_probe.py: every host over
    the backend, the weakest one), which returns None when the hosts are not known yet (sbatch).
    """
    spec = spec_file.spec
    if spec.run.train is None:
        return spec_file, hosts, pin, None
    if refuse:  # dsl launch: the trainer builds only the bundled Llama (dsl plan describes any model)
        from dsl.engine.validity import model_problems, refuse_located

        refuse_located(model_problems(spec.run.train.model, base=spec_file.path.resolve().parent),
                       spec_file.locations)
    topo = spec_topology(spec_file, topology)
    res = spec.resources
    auto = any(v == "auto" for v in (spec.engine.zero_stage, spec.engine.offload.optimizer,
                                    spec.engine.sequence_parallel, spec.engine.activation_checkpointing))
    if topo is None:
        if backend_of(spec_file).runs_here:
            from dsl.topology.probe import probe_local

            topo, _ = probe_local()
        elif probe is not None and (auto or not probe_only_for_auto) and (
                topo := _probe_remote(probe, required=auto or not refuse)) is not None:
            pass
        elif auto or not refuse:
            raise UserError(f"{spec_file.where('resources')}: backend {res.backend}'s hosts are not known "
                            "before Slurm allocates them; set resources.topology to a recorded machine "
                            "(dsl probe --list, or `dsl probe --record FILE` on one node) so the planner "
                            "can fill the auto fields, or run inside an allocation (salloc)")
        else:
            log.debug("hosts of backend %s not probed: memory not checked", res.backend)
            return spec_file, hosts, pin, None
    ranks = max(len(h.slots) for h in hosts)
    plan = plan_spec(spec_file, topo, hosts=len(hosts), ranks_per_host=ranks, runnable=runnable)
    if plan.launch_choice is None:
        if refuse:
            raise UserError(refusal(spec_file, plan))
        return spec_file, hosts, pin, plan
    engine = plan.engine_config(spec.engine)
    if engine.precision != "fp32" and not engine.low_precision_states and engine.precision_layout is None:
        # resolved.yaml says which layout ran (engine/config.py mixed_layout).
        engine = engine.model_copy(update={"precision_layout": mixed_layout(engine)})
    for name, old, new in (("zero_stage", spec.engine.zero_stage, engine.zero_stage),
                           ("offload.optimizer", spec.engine.offload.optimizer, engine.offload.optimizer),
                           ("sequence_parallel", spec.engine.sequence_parallel, engine.sequence_parallel),
                           ("activation_checkpointing", spec.engine.activation_checkpointing,
                            engine.activation_checkpointing),
                           ("micro_batch", spec.engine.micro_batch, engine.micro_batch),
                           ("grad_accum", spec.engine.grad_accum, engine.grad_accum),
                           ("precision_layout", spec.engine.precision_layout, engine.precision_layout)):
        if old != new:
            log.info("planner: engine.%s %s -> %s", name, old, new)
    new_spec = spec.model_copy(update={"engine": engine})
    return dataclasses.replace(spec_file, spec=new_spec), hosts, pin, plan


def _probe_remote(probe: "Callable[[], HostTopology | None]", required: bool) -> HostTopology | None:
    """The probed topology; when only a memory check needs it (nothing auto), a host that cannot
    be probed is left to preflight, which names it with the fix."""
    try:
        return probe()
    except UserError as exc:
        if required:
            raise
        log.info("memory not checked: %s", exc)
        return None


def refusal(spec_file: "SpecFile", plan: Plan) -> str:
    hw = plan.hardware
    closest = min(plan.candidates, key=lambda c: c.device_bytes, default=None)
    lines = [f"{spec_file.where('engine')}: {spec_file.spec.name} does not fit on {hw.describe()} "
             f"({hw.topology.source}):"]
    if plan.choice is not None and plan.choice.unsupported:
        lines.append(f"  it would fit with {plan.choice.label()}, but {plan.choice.unsupported}")
    elif closest is not None:
        lines.append(f"  closest: {closest.label()}: {closest.why_not}")
    if plan.suggestions:
        lines.append("  what would fit:")
        lines += [f"  - {s}" for s in plan.suggestions]
    return "\n".join(lines)
