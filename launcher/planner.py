"""The planner: fill every `auto` field of a spec's engine section from memory + topology.

    plan = search(shape, engine, hardware, target_batch, free=...)  # pure: candidates + choice

The pieces: launcher/hardware.py (what the hosts offer), this module (candidates, step time, the
search), launcher/planspec.py (`resolve`: a spec's free fields -> a plan, what `dsl launch` and
`dsl plan` call), launcher/planreport.py (`dsl plan`'s report).

For each combination of the free fields (ZeRO stage 0-3; optimizer offload none/cpu/nvme and, at
stage 3, parameter offload; sequence-parallel degree; activation checkpointing) it takes the
largest micro-batch whose memory fits, with train_batch = micro_batch x grad_accum x dp exactly,
and estimates the step time. The choice is the fastest candidate that fits with a 10% safety
margin; among candidates within 3% of it, the simplest (lower stage, no offload, no sp, no
checkpointing) wins, because the time model is rough and simple configurations fail less.

Fields the spec leaves out count as free too for micro_batch, grad_accum and offload.params
(they have no `auto` value; writing them fixes them). sequence_parallel must divide the query
heads, the sequence length and the host's ranks (an SP group never leaves a host: its
all-to-alls run on every layer), and the kv heads must divide it or be a multiple of it
(Ulysses replicates kv heads when there are fewer than sp). ZeRO shards over dp x sp ranks.

Step time (rough, to rank candidates, not to promise a number):
- compute: 6 x (parameters a token passes through) + 6 x layers x hidden x seq (causal
  attention) FLOPs per token, x 4/3 with checkpointing (one more forward), at MFU 40% of the
  accelerator's dense peak (topology/specs.py) for the precision;
- communication, ring volumes per rank: stage 0 all-reduces gradients once per step (2x);
  stage 1 reduce-scatters once and all-gathers the updated parameters; stage 2 reduce-scatters
  every micro-step; stage 3 all-gathers parameters twice (forward, backward) and reduce-scatters
  gradients every micro-step; Ulysses adds 4 all-to-alls per layer forward and backward. Each
  at the bus bandwidth of the slowest link class the group spans (NVSwitch / NVLink / PCIe with
  or without P2P / the network per rank), at 80% of nominal. Gradient reduction and stage-3
  gathers overlap compute; the parameter all-gather after the step and all-to-alls do not;
- offload: gradients out and parameters back over each GPU's host link (PCIe or NVLink-C2C),
  the optimizer step on the CPU at its memory bandwidth (28 + param bytes per parameter, at 50%),
  NVMe reads and writes of the optimizer state; not overlapped.
The largest of compute, communication and offload is named as the dominant term. The host link
is what makes offload cheap or not: over NVLink-C2C (GH200, ~450 GB/s) moving the optimizer to
Grace costs a few percent of a step and beats sharding across slower links; over PCIe it only
wins when nothing else fits.

On a CPU-only host the ranks are CPU processes: each one's "device" is its share of host RAM,
there is no offload, collectives run over gloo's shared memory and compute at a rough per-core
peak. `Plan.choice` is the best plan; `Plan.launch_choice` the best one this version of the
engine can run (`engine.config.unsupported_reason`), which `dsl launch` writes into the resolved
spec, or refuses the job, saying what would fit (more devices, more host RAM, bigger devices,
shorter sequences), before anything starts.
"""


from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from dsl.engine.long.degrees import placement_reason, sp_reason
from dsl.engine import memory, memory_reference
from dsl.engine.memory_nvme import nvme_param_step_bytes
from dsl.engine.config import EngineConfig
from dsl.engine.memory import Breakdown, ModelShape
from dsl.launcher.hardware import Hardware, allocator_notes, fmt_gb, fmt_gib, hardware_of

SAFETY_MARGIN = 0.10
"""Plans keep 10% of device and host memory free (allocator fragmentation, stray buffers)."""
MFU_GPU = 0.40
MFU_CPU = 0.30
CPU_OPTIMIZER_EFFICIENCY = 0.50
TIE_WINDOW = 0.03
MICRO_STEP_OVERHEAD_S = {True: 0.003, False: 0.002}
"""Launch and Python overhead per micro-step (GPU, CPU): favours fewer, larger micro-batches."""


# Candidates ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    communication_s: float
    """All collective time; `exposed_s` of it is not hidden behind compute."""
    exposed_s: float
    offload_s: float
    total_s: float
    dominant: str
    detail: str


@dataclass(frozen=True)
class Candidate:
    zero_stage: int
    offload: str
    """Optimizer-state offload: none, cpu or nvme."""
    offload_params: str
    sp: int
    dp: int
    micro_batch: int
    grad_accum: int
    activation_checkpointing: bool
    breakdown: Breakdown
    device_bytes: int
    """Per rank, on its device (for CPU ranks: its RAM)."""
    host_bytes: int
    """Per host: every rank's host RAM at the worst moment."""
    nvme_bytes: int
    """Per host."""
    fits: bool
    why_not: str | None
    step: StepTime
    unsupported: str | None = None
    """Why this version of the engine cannot run it yet (it may still be the best plan)."""

    def label(self) -> str:
        off = (self.offload if self.offload_params == "none" else f"{self.offload}+params"
               + ("" if self.offload_params == "cpu" else f" {self.offload_params}"))
        return (f"zero_stage {self.zero_stage}, offload {off}, sp {self.sp}, micro_batch {self.micro_batch}, "
                f"grad_accum {self.grad_accum}, activation_checkpointing {str(self.activation_checkpointing).lower()}")

    def simplicity(self) -> tuple[int, int]:
        return (self.zero_stage + (2 if self.offload != "none" else 0) + (1 if self.offload == "nvme" else 0)
                + (2 if self.offload_params != "none" else 0) + (1 if self.offload_params == "nvme" else 0)
                + (2 if self.sp > 1 else 0)
                + (1 if self.activation_checkpointing else 0), -self.micro_batch)

    def to_json(self) -> dict[str, Any]:
        return {
            "zero_stage": self.zero_stage, "offload": self.offload, "offload_params": self.offload_params,
            "sp": self.sp, "dp": self.dp, "micro_batch": self.micro_batch, "grad_accum": self.grad_accum,
            "activation_checkpointing": self.activation_checkpointing,
            "device_bytes": self.device_bytes, "host_bytes": self.host_bytes, "nvme_bytes": self.nvme_bytes,
            "fits": self.fits, "why_not": self.why_not, "unsupported": self.unsupported,
            "step_time_s": round(self.step.total_s, 4),
            "step": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self.step).items()},
            "terms": [t.to_json() for t in self.breakdown.terms],
            "peak": self.breakdown.peak.to_json(), "device_sum_bytes": self.breakdown.device_sum_bytes,
        }


@dataclass(frozen=True)
class Free:
    """Which engine fields the planner may choose (the others are taken from the spec)."""

    zero_stage: bool = True
    offload: bool = True
    offload_params: bool = True
    sp: bool = True
    activation_checkpointing: bool = True
    micro_batch: bool = True
    grad_accum: bool = True

    def any(self) -> bool:
        return any(dataclasses.astuple(self))


def valid_sp(shape: ModelShape, sp: int, ranks_per_host: int, world: int) -> str | None:
    """Why `sp` cannot be the sequence-parallel degree, or None (the engine's own rules:
    engine/long/degrees.py)."""
    return (sp_reason(sp, heads=shape.heads, kv_heads=shape.kv_heads, seq_len=shape.seq_len)
            or placement_reason(sp, world_size=world, ranks_per_host=ranks_per_host))


def _divisors(n: int) -> list[int]:
    return sorted({d for i in range(1, int(math.isqrt(n)) + 1) if n % i == 0 for d in (i, n // i)})


def _config(engine: EngineConfig, stage: int, offload: str, offload_params: str, sp: int, ckpt: bool,
            micro: int, accum: int) -> EngineConfig:
    return engine.model_copy(update={
        "zero_stage": stage, "sequence_parallel": sp, "activation_checkpointing": ckpt,
        "micro_batch": micro, "grad_accum": accum,
        "offload": engine.offload.model_copy(update={"optimizer": offload, "params": offload_params}),
    })


def step_time(shape: ModelShape, engine: EngineConfig, hw: Hardware, *, stage: int, offload: str,
              offload_params: str, sp: int, micro: int, accum: int, ckpt: bool, target_batch: int) -> StepTime:
    world = hw.world
    shards = world
    p = shape.params
    sb = memory.state_bytes(engine.precision, engine.low_precision_states, engine.optimizer.type,
                            engine.precision_layout, stage)
    tokens = target_batch * shape.seq_len
    flops_per_token = 6 * shape.flop_params + 6 * shape.layers * shape.hidden * shape.seq_len
    flops = tokens * flops_per_token * (4 / 3 if ckpt else 1.0)
    # Tiled loss recomputes the logits in backward; a tiled MLP recomputes its forward (already
    # counted by checkpointing's extra forward when both are on).
    if engine.tiled_loss.enabled:
        flops += tokens * 2 * shape.vocab * shape.hidden
    if engine.tiled_mlp.enabled and not ckpt:
        flops += tokens * 2 * 3 * shape.hidden * shape.ffn * shape.layers
    mfu = MFU_GPU if hw.accelerator else MFU_CPU
    compute = flops / (world * hw.peak_tflops * 1e12 * mfu) + accum * MICRO_STEP_OVERHEAD_S[hw.accelerator]
    ring = (shards - 1) / shards if shards > 1 else 0.0
    zero_link = hw.group_link(shards)
    grad_full, param_full = sb.grad * p, sb.param * p
    gather = sb.compute if sb.autocast else sb.param
    overlapped = exposed = 0.0
    if ring:
        if stage == 0:
            overlapped = 2 * grad_full * ring
        elif stage == 1:
            overlapped, exposed = grad_full * ring, param_full * ring
        elif stage == 2:
            overlapped, exposed = accum * grad_full * ring, param_full * ring
        else:
            overlapped = accum * (2 * gather * p + grad_full) * ring
    overlapped_s = overlapped / (zero_link.gb_s * 1e9)
    exposed_s = exposed / (zero_link.gb_s * 1e9)
    a2a_s = 0.0
    if sp > 1:
        local = micro * shape.seq_len // sp * shape.hidden * sb.compute
        # q, out; k, v (replicated up to sp heads when there are fewer kv heads than sp)
        per_layer = local * (2 + 2 * max(shape.kv_heads, sp) / shape.heads)
        a2a = 2 * shape.layers * per_layer * (sp - 1) / sp * accum
        a2a_s = a2a / (hw.group_link(sp).gb_s * 1e9)
        exposed_s += a2a_s
    offload_s = 0.0
    shard_params = p / shards
    opt_bytes = (28 + sb.param) * shard_params
    parts = []
    if offload != "none":
        link = hw.host_link.gb_s if hw.host_link else math.inf
        transfer = (4 + sb.param) * shard_params / (link * 1e9)
        cpu_step = hw.ranks_per_host * opt_bytes / (hw.host_memory_gb_s * CPU_OPTIMIZER_EFFICIENCY * 1e9)
        offload_s += transfer + cpu_step
        parts.append(f"host link {transfer:.2f} s, CPU optimizer {cpu_step:.2f} s")
        if offload == "nvme":
            state = (sb.master + sb.optimizer) * shard_params * hw.ranks_per_host
            nvme_s = state / (hw.nvme_read_gb_s * 1e9) + state / (hw.nvme_write_gb_s * 1e9)
            offload_s += nvme_s
            parts.append(f"NVMe {nvme_s:.2f} s")
    elif hw.accelerator and hw.device_memory_gb_s:
        offload_s = 0.0
        compute += opt_bytes / (hw.device_memory_gb_s * 0.7 * 1e9)
    else:
        compute += hw.ranks_per_host * opt_bytes / (hw.host_memory_gb_s * CPU_OPTIMIZER_EFFICIENCY * 1e9)
    if offload_params != "none":
        link = hw.host_link.gb_s if hw.host_link else math.inf
        fetch = accum * 2 * (sb.work or sb.param) * shard_params / (link * 1e9)
        offload_s += fetch
        parts.append(f"parameter fetches {fetch:.2f} s")
    if offload_params == "nvme":  # engine/memory_nvme.py: every gather reads, every update writes
        read, written = nvme_param_step_bytes(p, shards=shards, elem=sb.work or sb.param, micro_steps=accum)
        nvme_p = hw.ranks_per_host * (read / (hw.nvme_read_gb_s * 1e9) + written / (hw.nvme_write_gb_s * 1e9))
        offload_s += nvme_p
        parts.append(f"parameter NVMe I/O {nvme_p:.2f} s")
    comm = overlapped_s + exposed_s
    total = max(compute, overlapped_s) + exposed_s + offload_s
    terms = {"compute": compute, "communication": comm, "offload": offload_s}
    dominant = max(terms, key=terms.__getitem__)
    detail = (f"compute {compute:.2f} s at {mfu:.0%} MFU of {hw.peak_note}; communication {comm:.2f} s over "
              f"{zero_link.kind if ring else 'nothing (one rank)'}"
              + (f" ({exposed_s:.2f} s not overlapped)" if exposed_s else "")
              + (f"; offload {offload_s:.2f} s ({', '.join(parts)})" if offload_s else ""))
    return StepTime(compute, comm, exposed_s, offload_s, total, dominant, detail)


def evaluate(shape: ModelShape, engine: EngineConfig, hw: Hardware, *, stage: int, offload: str,
             offload_params: str, sp: int, micro: int, accum: int, ckpt: bool, target_batch: int,
             flash_attention: bool = True) -> Candidate:
    dp = hw.world // sp
    b = memory.breakdown(shape, stage=stage, dp=dp, sp=sp, micro_batch=micro, precision=engine.precision,
                         low_precision_states=engine.low_precision_states, optimizer=engine.optimizer.type,
                         offload_optimizer=offload, offload_params=offload_params, checkpointing=ckpt,
                         bucket_mib=engine.bucket_mib, sub_group_mib=engine.offload.sub_group_mib,
                         accelerator=hw.accelerator, flash_attention=flash_attention,
                         layout=engine.precision_layout,
                         offload_ratio=engine.offload.ratio if offload == "cpu" else 1.0,
                         allocator=memory.planned_allocator(engine.cpu_allocator, hw.jemalloc_on_host),
                         baseline=hw.baseline,
                         **memory.long_context(engine))  # tiled loss/MLP, activation offload
    device = b.device_bytes
    host = hw.ranks_per_host * b.host_peak_bytes
    nvme = hw.ranks_per_host * b.nvme_bytes
    why = []
    dev_cap = hw.device_memory_bytes * (1 - SAFETY_MARGIN)
    host_cap = hw.host_ram_bytes * (1 - SAFETY_MARGIN)
    what = "device" if hw.accelerator else "each CPU rank"
    if device > dev_cap:
        why.append(f"{what} needs {fmt_gb(device)} > {fmt_gb(dev_cap)} usable ({fmt_gib(hw.device_memory_bytes)} - "
                   f"{SAFETY_MARGIN:.0%})")
    if hw.accelerator and host > host_cap:
        why.append(f"host needs {fmt_gb(host)} > {fmt_gb(host_cap)} usable RAM ({hw.ranks_per_host} rank(s) x "
                   f"{fmt_gb(b.host_peak_bytes)})")
    if nvme and nvme > hw.nvme_free_bytes * (1 - SAFETY_MARGIN):
        why.append(f"NVMe needs {fmt_gb(nvme)} > {fmt_gb(hw.nvme_free_bytes * (1 - SAFETY_MARGIN))} free")
    st = step_time(shape, engine, hw, stage=stage, offload=offload, offload_params=offload_params, sp=sp,
                   micro=micro, accum=accum, ckpt=ckpt, target_batch=target_batch)
    return Candidate(stage, offload, offload_params, sp, dp, micro, accum, ckpt, b, device, host, nvme,
                     not why, "; ".join(why) or None, st)


# The search ----------------------------------------------------------------------------------


@dataclass
class Plan:
    """The planner's answer: every candidate, the choice and why, or what would fit."""

    shape: ModelShape
    hardware: Hardware
    target_batch: int
    fixed: dict[str, Any]
    candidates: list[Candidate]
    choice: Candidate | None
    """The best plan that fits (it may need engine features not built yet: `unsupported`)."""
    launch_choice: Candidate | None = None
    """The best plan that fits and this version of the engine can run: what `dsl launch` uses."""
    reasons: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    precision: str = "bf16"
    """The engine's precision (decides accelerate's dtype row in `references`)."""

    def engine_config(self, base: EngineConfig, candidate: Candidate | None = None) -> EngineConfig:
        c = candidate or self.launch_choice
        if c is None:
            raise ValueError("no configuration fits")
        return _config(base, c.zero_stage, c.offload, c.offload_params, c.sp, c.activation_checkpointing,
                       c.micro_batch, c.grad_accum)

    def deepspeed_comparison(self) -> dict[str, Any] | None:
        c = self.choice
        if c is None or not self.hardware.accelerator:
            return None
        return memory_reference.deepspeed_estimate(
            self.shape.params, self.shape.largest_unit_params, c.zero_stage,
            gpus_per_node=self.hardware.ranks_per_host, nodes=self.hardware.hosts,
            offload_optimizer=c.offload != "none", offload_params=c.offload_params != "none")

    def references(self, c: Candidate) -> dict[str, Any]:
        """DeepSpeed's estimator, the ZeRO paper's split and accelerate's estimate for candidate `c`
        (engine/memory_reference.py `candidate_references`): model states only, for comparison."""
        return memory_reference.candidate_references(
            self.shape.params, self.shape.largest_unit_params, stage=c.zero_stage, offload_optimizer=c.offload,
            offload_params=c.offload_params, gpus_per_node=self.hardware.ranks_per_host, nodes=self.hardware.hosts,
            shards=self.hardware.world, precision=self.precision)

    def _candidate_json(self, c: Candidate | None) -> dict[str, Any] | None:
        return None if c is None else {**c.to_json(), "references": self.references(c)}

    def to_json(self) -> dict[str, Any]:
        hw = self.hardware
        return {
            "model": {"params": self.shape.params, **dataclasses.asdict(self.shape)},
            "hardware": {
                "topology": hw.topology.source, "hosts": hw.hosts, "ranks_per_host": hw.ranks_per_host,
                "accelerator": hw.device_name if hw.accelerator else None,
                "device_memory_bytes": hw.device_memory_bytes, "host_ram_bytes": hw.host_ram_bytes,
                "peak_tflops": hw.peak_tflops, "mfu": MFU_GPU if hw.accelerator else MFU_CPU,
                "between_ranks": hw.group_link(hw.ranks_per_host).kind,
                "host_link": hw.host_link.kind if hw.host_link else None,
            },
            "target_batch": self.target_batch,
            "fixed": self.fixed,
            "safety_margin": SAFETY_MARGIN,
            "choice": self._candidate_json(self.choice),
            "launch_choice": self._candidate_json(self.launch_choice),
            "reasons": self.reasons,
            "suggestions": self.suggestions,
            "notes": self.notes,
            "deepspeed": self.deepspeed_comparison(),
            "candidates": [self._candidate_json(c) for c in self.candidates],
        }


def _options(engine: EngineConfig, free: Free, shape: ModelShape, hw: Hardware) -> dict[str, list[Any]]:
    stages = [0, 1, 2, 3] if free.zero_stage else [engine.zero_stage]
    if free.offload:
        offloads = ["none"]
        if hw.accelerator:
            offloads.append("cpu")
            if hw.topology.nvme:
                offloads.append("nvme")
    else:
        offloads = [engine.offload.optimizer]
    if free.sp:
        # Groups over several hosts too: their all-to-alls are costed over the network (step_time).
        sps = [s for s in _divisors(hw.world) if valid_sp(shape, s, hw.ranks_per_host, hw.world) is None]
    else:
        sps = [engine.sequence_parallel]
    ckpts = [False, True] if free.activation_checkpointing else [bool(engine.activation_checkpointing)]
    return {"stage": stages, "offload": offloads, "sp": sps, "ckpt": ckpts}


def search(shape: ModelShape, engine: EngineConfig, hw: Hardware, target_batch: int, free: Free, *,
           runnable: Callable[[EngineConfig], str | None] | None = None, suggest: bool = True,
           flash_attention: bool = True) -> Plan:
    """Every candidate over the free fields, and the choice (see the module docstring)."""
    opts = _options(engine, free, shape, hw)
    candidates: list[Candidate] = []
    skipped: list[str] = []
    for stage in opts["stage"]:
        for offload in opts["offload"]:
            if offload != "none" and stage == 0:
                continue  # offload needs a partitioned optimizer (ZeRO >= 1), as in DeepSpeed
            param_opts = ((["none", "cpu"] + (["nvme"] if hw.topology.nvme else [])) if free.offload_params
                          and stage == 3 and hw.accelerator and offload != "none" else
                          [engine.offload.params if not free.offload_params else "none"])
            for offload_params in param_opts:
                if offload_params != "none" and stage != 3:
                    continue
                for sp in opts["sp"]:
                    dp = hw.world // sp
                    if target_batch % dp:
                        skipped.append(f"sp {sp}: train_batch {target_batch} is not divisible by dp {dp}")
                        continue
                    per_rank = target_batch // dp
                    if not free.micro_batch:
                        micros = [engine.micro_batch] if per_rank % engine.micro_batch == 0 and (
                            free.grad_accum or per_rank == engine.micro_batch * engine.grad_accum) else []
                    elif not free.grad_accum:
                        micros = [per_rank // engine.grad_accum] if per_rank % engine.grad_accum == 0 else []
                    else:
                        micros = [m for m in _divisors(per_rank)][::-1]
                    if not micros:
                        skipped.append(f"sp {sp}: train_batch {target_batch} = micro_batch x grad_accum x dp "
                                       f"({dp}) has no solution with micro_batch {engine.micro_batch}, "
                                       f"grad_accum {engine.grad_accum}")
                        continue
                    for ckpt in opts["ckpt"]:
                        def at(micro: int) -> Candidate:
                            return evaluate(shape, engine, hw, stage=stage, offload=offload,
                                            offload_params=offload_params, sp=sp, micro=micro,
                                            accum=per_rank // micro, ckpt=ckpt, target_batch=target_batch,
                                            flash_attention=flash_attention)
                        candidates.append(_largest_fitting(micros, at))
    if runnable is not None:
        candidates = [dataclasses.replace(c, unsupported=runnable(_config(
            engine, c.zero_stage, c.offload, c.offload_params, c.sp, c.activation_checkpointing,
            c.micro_batch, c.grad_accum))) for c in candidates]
    fitting = sorted((c for c in candidates if c.fits), key=lambda c: c.step.total_s)
    choice = _choose(fitting)
    others = sorted((c for c in candidates if not c.fits),
                    key=lambda c: (c.device_bytes / hw.device_memory_bytes, c.step.total_s))
    plan = Plan(shape, hw, target_batch, {}, fitting + others, choice,
                launch_choice=_choose([c for c in fitting if c.unsupported is None]),
                notes=list(hw.notes) + allocator_notes(engine.cpu_allocator, hw) + sorted(set(skipped)),
                precision=engine.precision)
    if choice is not None:
        plan.reasons = _reasons(plan, choice)
    if choice is None and suggest:
        plan.suggestions = _suggestions(shape, engine, hw, target_batch, free, flash_attention)
    return plan


def _largest_fitting(micros: list[int], at: Callable[[int], Candidate]) -> Candidate:
    """The candidate at the largest micro-batch that fits (memory grows with it: bisect), else
    the smallest micro-batch's (which says why it does not fit). `micros` is descending."""
    smallest = at(micros[-1])
    if not smallest.fits or len(micros) == 1:
        return smallest
    lo, hi = 0, len(micros) - 1  # micros[hi] fits; find the first index that fits
    best = smallest
    while lo < hi:
        mid = (lo + hi) // 2
        cand = at(micros[mid])
        if cand.fits:
            best, hi = cand, mid
        else:
            lo = mid + 1
    return best


def _choose(fitting: list[Candidate]) -> Candidate | None:
    if not fitting:
        return None
    fastest = fitting[0].step.total_s
    near = [c for c in fitting if c.step.total_s <= fastest * (1 + TIE_WINDOW)]
    return min(near, key=lambda c: c.simplicity())


def _reasons(plan: Plan, choice: Candidate) -> list[str]:
    hw = plan.hardware
    out = [f"fits: {fmt_gb(choice.device_bytes)} of {fmt_gb(hw.device_memory_bytes * (1 - SAFETY_MARGIN))} usable per "
           f"{'device' if hw.accelerator else 'rank'}"
           + (f", {fmt_gb(choice.host_bytes)} of {fmt_gb(hw.host_ram_bytes * (1 - SAFETY_MARGIN))} host RAM"
              if hw.accelerator else "")]
    st = choice.step
    out.append(f"step ~{st.total_s:.2f} s, dominated by {st.dominant}: {st.detail}")
    # Why not something simpler: the best candidate of each simpler family that was rejected.
    families: dict[str, list[Candidate]] = {}
    for c in plan.candidates:
        if c is choice:
            continue
        if c.zero_stage < choice.zero_stage and c.offload == "none":
            families.setdefault(f"ZeRO stage {c.zero_stage}", []).append(c)
        if choice.offload != "none" and c.offload == "none":
            families.setdefault("no offload", []).append(c)
        if choice.offload == "none" and c.offload == "cpu":
            families.setdefault("CPU offload", []).append(c)
        if choice.activation_checkpointing and not c.activation_checkpointing:
            families.setdefault("no activation checkpointing", []).append(c)
        if not choice.activation_checkpointing and c.activation_checkpointing:
            families.setdefault("activation checkpointing", []).append(c)
        if choice.sp > 1 and c.sp == 1:
            families.setdefault("no sequence parallelism", []).append(c)
        if choice.sp == 1 and c.sp > 1:
            families.setdefault("sequence parallelism", []).append(c)
    for name, members in families.items():
        fit = [c for c in members if c.fits]
        if fit:
            best = min(fit, key=lambda c: c.step.total_s)
            slower = best.step.total_s / st.total_s - 1 if st.total_s else 0.0
            if slower > TIE_WINDOW:
                out.append(f"{name} fits too ({best.label()}) but its step is {slower:.0%} slower "
                           f"(~{best.step.total_s:.2f} s, {best.step.dominant}-bound)")
            else:
                out.append(f"{name} ({best.label()}) is within {TIE_WINDOW:.0%} in time; the simpler plan wins")
        else:
            closest = min(members, key=lambda c: c.device_bytes)
            out.append(f"{name} does not fit: {closest.why_not} (at {closest.label()})")
    if choice.offload != "none" and hw.host_link is not None:
        share = st.offload_s / st.total_s if st.total_s else 0.0
        out.append(f"offload goes over {hw.host_link.kind}: {st.offload_s:.2f} s per step ({share:.0%} of it)")
    return out


def _summary(c: Candidate) -> str:
    return f"{c.label()} (~{c.step.total_s:.2f} s/step)"


def _suggestions(shape: ModelShape, engine: EngineConfig, hw: Hardware, target_batch: int, free: Free,
                 flash_attention: bool) -> list[str]:
    """What would make a job that fits nowhere fit: one change at a time, then two together."""
    out = []
    every = Free()  # with every engine field free: the user can set them to auto
    topo = hw.topology
    kind = "GPUs" if hw.accelerator else "CPU ranks"

    def bigger(factor: int) -> tuple[Hardware, int]:
        more = hardware_of(topo, hosts=hw.hosts * factor, ranks_per_host=hw.ranks_per_host,
                           precision=engine.precision)
        return more, -(-target_batch // more.world) * more.world  # the batch rounded up to the world

    seqs = [shape.seq_len // d for d in (2, 4, 8) if shape.seq_len // d >= 128]
    factors = (2, 4, 8, 16, 32, 64, 128)
    for factor in factors:
        more, batch = bigger(factor)
        p = search(shape, engine, more, batch, every, suggest=False, flash_attention=flash_attention)
        if p.choice is not None:
            extra = f", train_batch {batch}" if batch != target_batch else ""
            out.append(f"more devices: {more.hosts} hosts like this one ({more.world} {kind}{extra}) fit with "
                       f"{_summary(p.choice)}")
            break
    else:
        found = None
        for seq in seqs:
            for factor in factors:
                more, batch = bigger(factor)
                p = search(shape.with_seq_len(seq), engine, more, batch, every, suggest=False,
                           flash_attention=flash_attention)
                if p.choice is not None:
                    found = (seq, more, p.choice)
                    break
            if found:
                break
        if found:
            seq, more, choice = found
            out.append(f"more devices and shorter sequences: {more.hosts} hosts like this one ({more.world} {kind}) "
                       f"with seq_len {seq} fit with {_summary(choice)}")
        else:
            out.append(f"more devices: even {hw.hosts * factors[-1]} hosts like this one do not fit")
    full = search(shape, engine, hw, target_batch, every, suggest=False, flash_attention=flash_attention)
    if full.choice is not None and free != every:
        out.append(f"freeing the fixed engine fields (set them to auto) fits: {_summary(full.choice)}")
    dev_cap = hw.device_memory_bytes * (1 - SAFETY_MARGIN)
    host_cap = hw.host_ram_bytes * (1 - SAFETY_MARGIN)
    device_ok = [c for c in full.candidates if c.device_bytes <= dev_cap]
    if hw.accelerator and device_ok:
        need = min(device_ok, key=lambda c: c.host_bytes)
        out.append(f"more host RAM: {fmt_gb(need.host_bytes / (1 - SAFETY_MARGIN))} per host (have "
                   f"{fmt_gb(hw.host_ram_bytes)}) fits {_summary(need)}")
    host_ok = [c for c in full.candidates if not hw.accelerator or c.host_bytes <= host_cap]
    if host_ok:
        need = min(host_ok, key=lambda c: c.device_bytes)
        out.append(f"bigger devices: {fmt_gib(need.device_bytes / (1 - SAFETY_MARGIN))} per "
                   f"{'device' if hw.accelerator else 'rank'} (have {fmt_gib(hw.device_memory_bytes)}) fit "
                   f"{_summary(need)}")
    if hw.accelerator and not device_ok and full.candidates:
        need = min(full.candidates, key=lambda c: (c.device_bytes, c.host_bytes))
        out.append(f"a bigger machine: {fmt_gib(need.device_bytes / (1 - SAFETY_MARGIN))} per device and "
                   f"{fmt_gb(need.host_bytes / (1 - SAFETY_MARGIN))} of host RAM fit {_summary(need)}")
    for seq in seqs:
        p = search(shape.with_seq_len(seq), engine, hw, target_batch, every, suggest=False,
                   flash_attention=flash_attention)
        if p.choice is not None:
            out.append(f"shorter sequences: seq_len {seq} fits with {_summary(p.choice)}")
            break
    else:
        common = dict(stage=3, shards=hw.world, precision=engine.precision,
                      low_precision_states=engine.low_precision_states, optimizer=engine.optimizer.type)
        on_device = sum(t.device_bytes for t in memory.model_states(shape.params, **common))
        on_host = hw.ranks_per_host * sum(t.host_bytes for t in memory.model_states(
            shape.params, offload_optimizer="cpu", offload_params="cpu", **common))
        out.append(f"shorter sequences alone do not help: the model states (ZeRO-3 over {hw.world} rank(s)) need "
                   f"{fmt_gb(on_device)} per device, or {fmt_gb(on_host)} of host RAM with CPU offload")
    return out
