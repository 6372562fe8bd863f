"""What the planner knows about the hosts: one `Hardware` derived from a HostTopology.

Device memory and count, host RAM, the link classes between ranks (NVSwitch / NVLink / PCIe
with or without P2P / the network per rank, at 80% of nominal), each GPU's host
link (PCIe or NVLink-C2C), CPU memory bandwidth and NVMe bandwidth, with the assumptions used
where a figure was not measured. On a CPU-only host each rank's "device" is its share of RAM
and collectives run over gloo's shared memory (launcher/planner.py explains how they are used).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dsl.engine.memory import GB, GLIBC_EXCESS, GiB
from dsl.topology.model import HostTopology, ProcessBaseline
from dsl.topology.specs import accelerator_spec

LINK_EFFICIENCY = 0.80
ASSUMED_SOCKET_MEMORY_GB_S = 100.0
ASSUMED_NETWORK_GBIT_S = 100.0
ASSUMED_NVME_GB_S = (2.0, 1.0)
GLOO_SHM_GB_S = 1.0  # gloo between ranks of one CPU host moves 0.3-2 GB/s (measured on this project's 2-core VMs)


def fmt_gb(n: float) -> str:
    """Bytes as GB / MB / kB (decimal), for reports."""
    if n >= 0.95 * GB or n == 0:
        return f"{n / GB:,.1f} GB"
    if n >= 1e6:
        return f"{n / 1e6:,.1f} MB"
    return f"{n / 1e3:,.1f} kB"


def fmt_gib(n: float) -> str:
    return f"{n / GiB:,.1f} GiB"


@dataclass(frozen=True)
class Link:
    gb_s: float
    """Effective bus bandwidth per rank, per direction."""
    kind: str


@dataclass(frozen=True)
class Hardware:
    """What the planner needs to know about the hosts, derived from one HostTopology."""

    topology: HostTopology
    hosts: int
    ranks_per_host: int
    accelerator: bool
    device_name: str
    device_memory_bytes: int
    """Capacity per rank: the GPU's memory, or a CPU rank's share of host RAM."""
    host_ram_bytes: int
    peak_tflops: float
    peak_note: str
    host_link: Link | None
    network: Link | None
    """Network bandwidth per host (to other hosts); None on one host."""
    host_memory_gb_s: float
    nvme_free_bytes: int
    nvme_read_gb_s: float
    nvme_write_gb_s: float
    device_memory_gb_s: float | None
    notes: tuple[str, ...] = ()
    baseline: ProcessBaseline | None = None
    """The host's measured process baseline: the runtime term of its ranks (topology/baseline.py)."""
    jemalloc_on_host: bool = True
    """libjemalloc.so.2 is on the host, or it was not probed: `cpu_allocator: auto` runs with it."""
    _links: dict[int, Link] = field(default_factory=dict, compare=False, repr=False)

    @property
    def world(self) -> int:
        return self.hosts * self.ranks_per_host

    def group_link(self, size: int) -> Link:
        """Bus bandwidth of a collective over `size` consecutive ranks (ranks fill hosts in order)."""
        if size <= 1:
            return Link(math.inf, "none")
        cached = self._links.get(size)
        if cached is None:
            cached = self._links[size] = self._group_link(size)
        return cached

    def _group_link(self, size: int) -> Link:
        if not self.accelerator:
            intra = Link(GLOO_SHM_GB_S, "gloo over shared memory")
        else:
            intra = _intra_link(self.topology, list(range(min(size, self.ranks_per_host))))
        if size <= self.ranks_per_host or self.network is None:
            return intra
        per_rank = self.network.gb_s / self.ranks_per_host
        return intra if intra.gb_s <= per_rank else Link(per_rank, self.network.kind)

    def describe(self) -> str:
        per = f"{self.ranks_per_host} x {self.device_name} ({fmt_gib(self.device_memory_bytes)})" \
            if self.accelerator else f"{self.ranks_per_host} CPU rank(s) ({fmt_gib(self.device_memory_bytes)} RAM each)"
        hosts = f"{self.hosts} host(s) x " if self.hosts > 1 else ""
        link = f", host link {self.host_link.kind}" if self.host_link and self.accelerator else ""
        intra = self.group_link(self.ranks_per_host)
        between = f", {intra.kind} between ranks" if self.ranks_per_host > 1 else ""
        return f"{hosts}{per}, {fmt_gib(self.host_ram_bytes)} host RAM{between}{link}"


def _intra_link(topo: HostTopology, slots: list[int]) -> Link:
    if len(slots) < 2 or len(topo.accelerators) < 2:
        return Link(math.inf, "none")
    pairs = [topo.link(a, b) for i, a in enumerate(slots) for b in slots[i + 1:]]
    if any(p is None for p in pairs):
        return Link(10.0, "unknown links (assumed 10 GB/s)")
    kinds = {p.kind for p in pairs}  # type: ignore[union-attr]
    if kinds <= {"nvswitch", "nvlink"}:
        bw = min(p.bandwidth_gb_s or 25.0 for p in pairs)  # type: ignore[union-attr]
        name = "NVSwitch" if kinds == {"nvswitch"} else "NVLink"
        return Link(bw * LINK_EFFICIENCY, f"{name} {bw:g} GB/s")
    pcie = [p for p in pairs if p.kind == "pcie"]  # type: ignore[union-attr]
    bw = min(p.bandwidth_gb_s or 16.0 for p in pcie)
    if any(p.p2p is False for p in pcie):
        # Without P2P, NCCL stages every transfer through host memory: about half the link.
        return Link(bw * LINK_EFFICIENCY / 2, f"PCIe {bw:g} GB/s without P2P (through host memory)")
    return Link(bw * LINK_EFFICIENCY, f"PCIe {bw:g} GB/s P2P")


def hardware_of(topo: HostTopology, *, hosts: int = 1, ranks_per_host: int | None = None,
                precision: str = "bf16") -> Hardware:
    notes: list[str] = []
    gpus = list(topo.accelerators)
    accelerator = bool(gpus)
    ram = topo.usable_ram_bytes
    if ram is None:
        ram = 16 * GiB
        notes.append("host RAM unknown: assumed 16 GiB")
    if ranks_per_host is None:
        ranks_per_host = len(gpus) or 1
    if accelerator and ranks_per_host > len(gpus):
        notes.append(f"{ranks_per_host} ranks per host but {len(gpus)} GPU(s): ranks would share GPUs; "
                     "planned as one GPU per rank")
    sockets = topo.cpu.sockets or 1
    mem_bw = topo.memory_bandwidth_gb_s
    if mem_bw is None:
        mem_bw = ASSUMED_SOCKET_MEMORY_GB_S * sockets
        notes.append(f"host memory bandwidth unknown: assumed {mem_bw:g} GB/s")
    if not accelerator and topo.jemalloc == "":
        notes.append(f"libjemalloc.so.2 is not on {topo.hostname}: engine.cpu_allocator auto (the default) falls "
                     "back to glibc keeping freed blocks, whose heap holes can put each rank's peak resident set "
                     f"{GLIBC_EXCESS} above this plan (apt install libjemalloc2; engine/cpu_alloc.py)")
    if not accelerator and topo.process_baseline is None:
        why = topo.unknown.get("process_baseline") or "not probed (a recorded topology)"
        notes.append(f"{topo.hostname}: process baseline {why}; the runtime term is dsl's reference machine's")
    if accelerator:
        dev = gpus[0]
        mem = min((g.memory_bytes for g in gpus if g.memory_bytes), default=None)
        if mem is None:
            mem = 16 * GiB
            notes.append("GPU memory unknown: assumed 16 GiB")
        spec = accelerator_spec(dev.name)
        if spec is None:
            peak = 100.0 if precision != "fp32" else 20.0
            peak_note = f"{dev.name} is not in topology/specs.py: assumed {peak:g} TFLOP/s"
            notes.append(peak_note)
            device_bw = None
        else:
            peak = spec.bf16_tflops if precision != "fp32" else spec.fp32_tflops
            peak_note = f"{peak:g} TFLOP/s {'bf16' if precision != 'fp32' else 'fp32'} peak ({spec.family})"
            device_bw = spec.memory_bandwidth_gb_s
        hl = topo.host_link()
        if hl is None or hl.bandwidth_gb_s is None:
            host_link = Link(16.0 * LINK_EFFICIENCY, "unknown (assumed PCIe Gen4 x16 at half rate)")
            notes.append("GPU host link unknown: assumed 12.8 GB/s")
        else:
            host_link = Link(hl.bandwidth_gb_s * LINK_EFFICIENCY, hl.describe())
        name = dev.name.removeprefix("NVIDIA ")
    else:
        mem = ram // ranks_per_host
        cpus = (topo.cpu.usable_cpus or topo.cpu.logical_cpus or 1) / ranks_per_host
        flags = set(topo.cpu.flags)
        per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "sve", "sve2"} & flags else 16
        bf16 = precision != "fp32" and bool({"avx512_bf16", "amx_bf16", "bf16"} & flags)
        peak = cpus * 2.5e9 * per_cycle * (1.85 if bf16 else 1.0) / 1e12
        peak_note = (f"{peak:.2f} TFLOP/s: {cpus:g} CPU(s) per rank x 2.5 GHz x {per_cycle} FLOP/cycle"
                     + (" x 1.85 for bf16" if bf16 else "") + " (rough)")
        device_bw = None
        host_link = None
        name = "CPU"
    network = None
    if hosts > 1:
        gbit = topo.network_gbit_s()
        if gbit is None:
            gbit = ASSUMED_NETWORK_GBIT_S
            notes.append(f"network speed unknown: assumed {gbit:g} Gb/s per host")
        network = Link(gbit / 8 * LINK_EFFICIENCY, f"network {gbit:g} Gb/s per host")
    free_by_mount: dict[str, int] = {}
    read = write = 0.0
    measured = True
    for disk in topo.nvme:
        key = disk.mountpoint or disk.name
        if disk.free_bytes is not None:
            free_by_mount[key] = max(free_by_mount.get(key, 0), disk.free_bytes)
        if disk.read_gb_s is None or disk.write_gb_s is None:
            measured = False
        read += disk.read_gb_s or ASSUMED_NVME_GB_S[0]
        write += disk.write_gb_s or ASSUMED_NVME_GB_S[1]
    if topo.nvme and not measured:
        notes.append("NVMe bandwidth not measured (dsl probe --measure-nvme DIR): assumed "
                     f"{ASSUMED_NVME_GB_S[0]:g}/{ASSUMED_NVME_GB_S[1]:g} GB/s read/write per drive")
    return Hardware(topo, hosts, ranks_per_host, accelerator, name, int(mem), int(ram), peak, peak_note,
                    host_link, network, mem_bw, sum(free_by_mount.values()), read, write, device_bw,
                    tuple(notes), baseline=topo.process_baseline,
                    jemalloc_on_host=topo.jemalloc != "")


def allocator_notes(setting: str, hw: Hardware) -> list[str]:
    """A note when the spec asks a CPU rank for a glibc setting whose heap holes the model does not
    count (engine/memory_shape.py GLIBC_EXCESS; `auto` on a host without jemalloc gets its note
    from `hardware_of`)."""
    if hw.accelerator or setting not in ("reuse", "system"):
        return []
    return [f"engine.cpu_allocator: {setting}: glibc's heap holes are not in this plan; they put each rank's peak "
            f"resident set {GLIBC_EXCESS} above it on dsl's reference machine (docs/benchmarks.md \"Peak memory\"); "
            "auto (jemalloc) and return are within 10% of the plan"]
