"""The topology of one host as plain data: accelerators, their links, CPU, RAM, NUMA, NVMe, NICs.

Everything here is a frozen dataclass that round-trips through JSON (`to_json` / `from_json`), so a
probe on a GPU machine can be recorded and replayed on a laptop (`topology/fixtures/*.json`).

Units are in the names: `_bytes`, `_gb_s` (gigabytes per second, 1e9 B/s, per direction),
`_gbit_s` (network line rate). A value the probe could not learn is None, and the object's
`unknown` map says why (`{"numa_node": "nvmlDeviceGetNumaNodeId: NotSupported"}`): an unknown is
an answer with a reason, never a swallowed exception.

No I/O and no third-party imports happen at import time (the planner runs on login nodes).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

SCHEMA = "dsl.topology/1"


@dataclass(frozen=True)
class HostLink:
    """How one accelerator reaches host memory: PCIe, or NVLink-C2C (Grace Hopper)."""

    kind: str
    """"pcie" or "nvlink-c2c"."""
    bandwidth_gb_s: float | None
    """Nominal bandwidth per direction (PCIe: generation x width after line encoding)."""
    pcie_generation: int | None = None
    pcie_width: int | None = None
    c2c_links: int | None = None
    unknown: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        if self.kind == "nvlink-c2c":
            links = f"{self.c2c_links} links, " if self.c2c_links else ""
            return f"NVLink-C2C ({links}{_gb(self.bandwidth_gb_s)})"
        gen = f"Gen{self.pcie_generation}" if self.pcie_generation else "Gen?"
        width = f" x{self.pcie_width}" if self.pcie_width else ""
        return f"PCIe {gen}{width} ({_gb(self.bandwidth_gb_s)})"


@dataclass(frozen=True)
class Accelerator:
    """One GPU as NVML reports it."""

    index: int
    name: str
    memory_bytes: int | None
    """Total device memory (nvmlDeviceGetMemoryInfo().total)."""
    compute_capability: tuple[int, int] | None
    host_link: HostLink
    uuid: str | None = None
    pci_bus_id: str | None = None
    numa_node: int | None = None
    cpus: tuple[int, ...] | None = None
    """CPUs close to this GPU (nvmlDeviceGetCpuAffinity)."""
    nvlink_links: int = 0
    """Active NVLink links."""
    nvlink_version: str | None = None
    nvlink_link_gb_s: float | None = None
    """Bandwidth of one NVLink link per direction."""
    nvswitch: bool = False
    """Its NVLinks end at NVSwitches (every GPU reaches every other at full NVLink bandwidth)."""
    unknown: dict[str, str] = field(default_factory=dict)

    @property
    def nvlink_gb_s(self) -> float | None:
        """All active NVLinks together, per direction."""
        if not self.nvlink_links or self.nvlink_link_gb_s is None:
            return None
        return round(self.nvlink_links * self.nvlink_link_gb_s, 1)


@dataclass(frozen=True)
class PeerLink:
    """The fastest path between two accelerators of a host."""

    a: int
    b: int
    kind: str
    """"nvswitch" (through NVSwitches), "nvlink" (direct links or a bridge) or "pcie"."""
    bandwidth_gb_s: float | None
    """Nominal per direction: NVLink links x link speed, or the narrower PCIe host link."""
    nvlink_links: int = 0
    pcie_path: str | None = None
    """NVML's common ancestor: board, switch, switches, host bridge, numa node, system."""
    p2p: bool | None = None
    """Peer-to-peer reads work (nvmlDeviceGetP2PStatus); without it traffic bounces through host memory."""
    unknown: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Cpu:
    model: str | None
    sockets: int | None
    physical_cores: int | None
    logical_cpus: int | None
    usable_cpus: int | None
    """CPUs this process may run on (affinity mask and cgroup quota)."""
    flags: tuple[str, ...] = ()
    """The vector features that matter for CPU training (avx512f, avx512_bf16, amx_bf16, sve2, ...)."""
    unknown: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NumaNode:
    id: int
    cpus: tuple[int, ...]
    memory_bytes: int | None


@dataclass(frozen=True)
class Nvme:
    name: str
    """Block device, e.g. nvme0n1."""
    model: str | None
    size_bytes: int | None
    mountpoint: str | None = None
    free_bytes: int | None = None
    read_gb_s: float | None = None
    """Sequential O_DIRECT read bandwidth, measured (`dsl probe --measure-nvme`)."""
    write_gb_s: float | None = None
    unknown: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Nic:
    name: str
    kind: str
    """"infiniband" or "ethernet"."""
    speed_gbit_s: float | None


@dataclass(frozen=True)
class ProcessBaseline:
    """What a CPU rank's process holds before its model does: Python, torch, gloo, the trainer, as
    measured on this host by `dsl probe --measure-baseline` (engine/baseline.py; kept between runs
    by topology/baseline.py). The memory model's `runtime` term of a CPU rank."""

    bytes: int
    """The trainer's peak resident set less its file-backed pages, less the step's live bytes."""
    checkpointing_bytes: int
    """The same with activation checkpointing (which imports torch._dynamo)."""
    allocator: str
    """The malloc it was measured with (engine/cpu_alloc.py `effective`)."""
    python: str
    torch: str | None
    dsl: str | None
    measured_at: str
    """UTC, ISO 8601."""
    cuda_runtime_bytes: int | None = None
    """On a GPU host: what one rank's process holds on its device besides torch's allocations
    (CUDA context, cuBLAS workspace, NCCL's communicator), measured through NVML; None elsewhere."""


@dataclass(frozen=True)
class HostTopology:
    """One host: what `dsl probe` shows and the planner reads."""

    hostname: str
    source: str
    """Where this came from: "probe", "fixture:NAME" or "file:PATH"."""
    cpu: Cpu
    ram_bytes: int | None
    """Physical memory (psutil.virtual_memory().total)."""
    ram_limit_bytes: int | None = None
    """A cgroup memory limit below ram_bytes (containers), else None."""
    ram_available_bytes: int | None = None
    memory_bandwidth_gb_s: float | None = None
    """Host DRAM bandwidth (all sockets); drives the CPU optimizer step under offload."""
    numa_nodes: tuple[NumaNode, ...] = ()
    accelerators: tuple[Accelerator, ...] = ()
    links: tuple[PeerLink, ...] = ()
    nvme: tuple[Nvme, ...] = ()
    nics: tuple[Nic, ...] = ()
    gpu_reason: str = ""
    """How the accelerators were found, or plainly why there are none."""
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    nvidia_pci_devices: int | None = None
    """NVIDIA display/3D controllers on the PCI bus, seen without a driver."""
    jemalloc: str | None = None
    """Path of libjemalloc.so.2 on the host (a CPU rank's default malloc, engine/cpu_alloc.py);
    "" when the probe looked and found none; None when not probed (fixtures, files)."""
    process_baseline: ProcessBaseline | None = None
    """This host's measured CPU process baseline for the probing Python, or None (`unknown` says
    why: not measured yet, or measured for another torch or dsl)."""
    description: str | None = None
    unknown: dict[str, str] = field(default_factory=dict)

    # Derived views ---------------------------------------------------------------------------

    @property
    def usable_ram_bytes(self) -> int | None:
        """RAM this host's ranks can use: the cgroup limit when there is one, and without
        CPU-less NUMA nodes (Grace Hopper onlines the GPU's HBM as one; it is not host RAM)."""
        ram = self.ram_bytes
        device_nodes = [n for n in self.numa_nodes if not n.cpus and n.memory_bytes]
        if ram is not None and device_nodes:
            ram -= sum(n.memory_bytes or 0 for n in device_nodes)
        if ram is None:
            return self.ram_limit_bytes
        if self.ram_limit_bytes is not None:
            return min(ram, self.ram_limit_bytes)
        return ram

    def link(self, a: int, b: int) -> PeerLink | None:
        lo, hi = min(a, b), max(a, b)
        for link in self.links:
            if (link.a, link.b) == (lo, hi):
                return link
        return None

    def host_link(self) -> HostLink | None:
        """The slowest accelerator-to-host link (they are usually all alike)."""
        links = [a.host_link for a in self.accelerators]
        known = [h for h in links if h.bandwidth_gb_s is not None]
        if known:
            return min(known, key=lambda h: h.bandwidth_gb_s or 0.0)
        return links[0] if links else None

    def network_gbit_s(self) -> float | None:
        """Sum of the line rates of the host's fast NICs (what leaves the host for other hosts)."""
        speeds = [n.speed_gbit_s for n in self.nics if n.speed_gbit_s]
        return float(sum(speeds)) if speeds else None

    # JSON ------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **_to_json(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "HostTopology":
        data = {k: v for k, v in data.items() if k != "schema"}
        return _from_json(cls, data)


def _gb(value: float | None) -> str:
    return "? GB/s" if value is None else f"{value:g} GB/s"


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def _from_json(cls: type, data: dict[str, Any]) -> Any:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown_keys = sorted(set(data) - names)
    if unknown_keys:
        raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(unknown_keys)}")
    return cls(**{k: _convert(hints[k], v) for k, v in data.items()})


def _convert(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value) if len(inner) == 1 else value
    if dataclasses.is_dataclass(hint):
        return _from_json(hint, value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v) for v in value)
        return tuple(_convert(a, v) for a, v in zip(args, value))
    if origin is dict:
        return dict(value)
    if hint is float and isinstance(value, int):
        return float(value)
    return value
