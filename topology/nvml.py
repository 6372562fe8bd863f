"""Ask NVML about the GPUs of this host, in two steps: `record` the answers, then `derive` facts.

`record(nvml)` calls pynvml (nvidia-ml-py) and writes down every answer exactly as the API gives
it (bytes, enum values, PCI bus ids) or the NVML error it raised; it always calls nvmlShutdown
after a successful nvmlInit, and it never touches CUDA (NVML is the driver's management
library: no context, no device memory, safe on a login node and next to running jobs).
`derive(recording)` turns a recording into `Accelerator`s and `PeerLink`s. A probe is the two
in a row; a fixture is a recording made elsewhere, replayed through `replay.ReplayNvml`, so the
code that reads a real machine and the code that reads a fixture are the same code.

Calls (all in nvidia-ml-py 12+):
- nvmlDeviceGetMemoryInfo(h).total/.free/.used: bytes.
- nvmlDeviceGetCudaComputeCapability(h) -> (major, minor).
- nvmlDeviceGetMaxPcieLinkGeneration / MaxPcieLinkWidth: the link's capability (the *current*
  generation drops at idle to save power, so it is recorded but not used for bandwidth).
- nvmlDeviceGetNvLinkState(h, link) for link = 0.. until NVML answers InvalidArgument (past the
  last link) or NotSupported (no NVLink); for active links nvmlDeviceGetNvLinkVersion (an
  NVML_NVLINK_VERSION_* enum: 4 = 3.0, 6 = 4.0), nvmlDeviceGetNvLinkRemoteDeviceType (0 GPU,
  2 NVSwitch) and nvmlDeviceGetNvLinkRemotePciInfo(h, link).busId (which GPU is at the far end).
- nvmlDeviceGetFieldValues(h, [...]): NVML_FI_DEV_NVLINK_SPEED_MBPS_COMMON (90, MB/s per link
  per direction), NVML_FI_DEV_NVLINK_LINK_COUNT (91), NVML_FI_DEV_C2C_LINK_COUNT (170) and
  NVML_FI_DEV_C2C_LINK_GET_MAX_BW (172, MB/s per C2C link, scope = link).
- nvmlDeviceGetC2cModeInfoV(h).isC2cEnabled: 1 on Grace Hopper (host memory over NVLink-C2C).
- nvmlDeviceGetTopologyCommonAncestor(a, b): NVML_TOPOLOGY_INTERNAL 0 / SINGLE 10 / MULTIPLE 20 /
  HOSTBRIDGE 30 / NODE 40 / SYSTEM 50 (nvidia-smi topo's PIX/PXB/PHB/NODE/SYS).
- nvmlDeviceGetP2PStatus(a, b, NVML_P2P_CAPS_INDEX_READ = 0): 0 = NVML_P2P_STATUS_OK.
- nvmlDeviceGetNumaNodeId(h), nvmlDeviceGetCpuAffinity(h, words): NUMA placement.
- nvmlDeviceGetMigMode(h) -> [current, pending] (1 = NVML_DEVICE_MIG_ENABLE); in MIG mode
  nvmlDeviceGetMaxMigDeviceCount(h) and, for each index below it,
  nvmlDeviceGetMigDeviceHandleByIndex(h, i) (NotFound: no instance there), whose MIG handle
  answers nvmlDeviceGetName/UUID/MemoryInfo (the instance's own memory) and
  nvmlDeviceGetGpuInstanceId/ComputeInstanceId. CUDA shows the MIG instances of such a GPU,
  not the GPU, so `derive` lists them as the accelerators (and says so in gpu_reason).

A function the installed nvidia-ml-py lacks (older releases miss newer calls) is recorded as
{"error": "NotInPynvml"}: the value becomes unknown with that reason, like any refused query.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from dsl.topology.model import Accelerator, HostLink, PeerLink

# NVML field ids (nvml.h); pynvml names them NVML_FI_DEV_*.
FI_NVLINK_SPEED_MBPS_COMMON = 90
FI_NVLINK_LINK_COUNT = 91
FI_C2C_LINK_COUNT = 170
FI_C2C_LINK_GET_MAX_BW = 172
FIELDS: tuple[Any, ...] = (FI_NVLINK_SPEED_MBPS_COMMON, FI_NVLINK_LINK_COUNT, FI_C2C_LINK_COUNT,
                           (FI_C2C_LINK_GET_MAX_BW, 0))
P2P_CAPS_INDEX_READ = 0  # pynvml spells NVML_P2P_CAPS_INDEX_READ as the tuple (0,) by a stray comma
NVLINK_DEVICE_TYPE_SWITCH = 2
MAX_NVLINKS = 36  # NVML_NVLINK_MAX_LINKS of recent drivers; older ones stop earlier with InvalidArgument
MIG_ENABLED = 1  # NVML_DEVICE_MIG_ENABLE: nvmlDeviceGetMigMode(h) -> [current, pending]
NOT_IN_PYNVML = "NotInPynvml"  # a recorded "error": the installed nvidia-ml-py lacks the function

NVLINK_VERSIONS = {1: "1.0", 2: "2.0", 3: "2.2", 4: "3.0", 5: "3.1", 6: "4.0", 7: "5.0", 8: "6.0"}
# Per link, per direction, GB/s, when NVML does not report the speed field (NVLink 2-4: 25 GB/s,
# NVLink 5: 50 GB/s; NVIDIA architecture whitepapers).
NVLINK_LINK_GB_S = {"1.0": 20.0, "2.0": 25.0, "2.2": 25.0, "3.0": 25.0, "3.1": 25.0, "4.0": 25.0,
                    "5.0": 50.0}
TOPOLOGY_LEVELS = {0: "same board", 10: "PCIe switch", 20: "PCIe switches", 30: "host bridge",
                   40: "NUMA node", 50: "system (across CPU sockets)"}
# PCIe per-lane transfer rate (GT/s) and line-code efficiency by generation.
PCIE_GT_S = {1: 2.5, 2: 5.0, 3: 8.0, 4: 16.0, 5: 32.0, 6: 64.0}


def pcie_gb_s(generation: int | None, width: int | None) -> float | None:
    """Nominal per-direction PCIe bandwidth: Gen4 x16 = 31.5 GB/s, Gen5 x16 = 63 GB/s."""
    if not generation or not width or generation not in PCIE_GT_S:
        return None
    encoding = 0.8 if generation <= 2 else (128 / 130 if generation <= 5 else 242 / 256)
    return round(PCIE_GT_S[generation] * encoding * width / 8, 1)


# Recording -------------------------------------------------------------------------------------


def _error_name(nvml: Any, exc: BaseException) -> str:
    return type(exc).__name__.removeprefix("NVMLError_") or "Unknown"


def ask(nvml: Any, name: str, *args: Any, convert: Callable[[Any], Any] = lambda v: v) -> Any:
    """The answer of the NVML call `name`, or {"error": name} when NVML refused, or
    {"error": "NotInPynvml"} when the installed nvidia-ml-py has no such function (older
    releases lack newer calls; the driver may well support it)."""
    fn = getattr(nvml, name, None)
    if fn is None:
        return {"error": NOT_IN_PYNVML}
    try:
        return convert(fn(*args))
    except nvml.NVMLError as exc:
        return {"error": _error_name(nvml, exc)}


def is_error(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"error"}


def why(key: str, error: str) -> str:
    """The reason an unknown value gives, from the call and the error a recording holds."""
    if error == NOT_IN_PYNVML:
        return f"{key}: not in the installed nvidia-ml-py (pip install -U nvidia-ml-py)"
    return f"{key}: {error}"


def _field_dict(nvml: Any, values: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for spec, value in zip(FIELDS, values):
        key = f"{spec[0]}@{spec[1]}" if isinstance(spec, tuple) else str(spec)
        if value.nvmlReturn != 0:
            out[key] = {"error": _error_name(nvml, nvml.NVMLError(value.nvmlReturn))}
            continue
        member = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal",
                  6: "usVal"}.get(value.valueType, "ullVal")
        out[key] = getattr(value.value, member)
    return out


def _memory(m: Any) -> dict[str, int]:
    return {"total": m.total, "free": m.free, "used": m.used}


def _device(nvml: Any, handle: Any, cpu_words: int) -> dict[str, Any]:
    d: dict[str, Any] = {}
    d["nvmlDeviceGetName"] = ask(nvml, "nvmlDeviceGetName", handle)
    d["nvmlDeviceGetUUID"] = ask(nvml, "nvmlDeviceGetUUID", handle)
    d["nvmlDeviceGetPciInfo"] = ask(nvml, "nvmlDeviceGetPciInfo", handle, convert=lambda p: {"busId": p.busId})
    d["nvmlDeviceGetMemoryInfo"] = ask(nvml, "nvmlDeviceGetMemoryInfo", handle, convert=_memory)
    d["nvmlDeviceGetCudaComputeCapability"] = ask(nvml, "nvmlDeviceGetCudaComputeCapability", handle,
                                                  convert=list)
    for name in ("nvmlDeviceGetMaxPcieLinkGeneration", "nvmlDeviceGetMaxPcieLinkWidth",
                 "nvmlDeviceGetCurrPcieLinkGeneration", "nvmlDeviceGetCurrPcieLinkWidth",
                 "nvmlDeviceGetNumaNodeId"):
        d[name] = ask(nvml, name, handle)
    d["nvmlDeviceGetCpuAffinity"] = ask(nvml, "nvmlDeviceGetCpuAffinity", handle, cpu_words,
                                        convert=lambda words: [int(w) for w in words])
    d["nvmlDeviceGetC2cModeInfoV"] = ask(nvml, "nvmlDeviceGetC2cModeInfoV", handle,
                                         convert=lambda c: {"isC2cEnabled": c.isC2cEnabled})
    d["nvmlDeviceGetFieldValues"] = ask(nvml, "nvmlDeviceGetFieldValues", handle, list(FIELDS),
                                        convert=lambda values: _field_dict(nvml, values))
    d["nvmlDeviceGetMigMode"] = ask(nvml, "nvmlDeviceGetMigMode", handle, convert=list)
    if not is_error(d["nvmlDeviceGetMigMode"]) and d["nvmlDeviceGetMigMode"][0] == MIG_ENABLED:
        d.update(record_migs(nvml, handle))
    links: list[dict[str, Any]] = []
    for link in range(MAX_NVLINKS):
        state = ask(nvml, "nvmlDeviceGetNvLinkState", handle, link)
        entry: dict[str, Any] = {"nvmlDeviceGetNvLinkState": state}
        links.append(entry)
        if is_error(state):
            break  # InvalidArgument: past the last link; NotSupported: no NVLink at all
        if state:
            entry["nvmlDeviceGetNvLinkVersion"] = ask(nvml, "nvmlDeviceGetNvLinkVersion", handle, link)
            entry["nvmlDeviceGetNvLinkRemoteDeviceType"] = ask(
                nvml, "nvmlDeviceGetNvLinkRemoteDeviceType", handle, link)
            entry["nvmlDeviceGetNvLinkRemotePciInfo"] = ask(
                nvml, "nvmlDeviceGetNvLinkRemotePciInfo", handle, link, convert=lambda p: {"busId": p.busId})
    d["nvlinks"] = links
    return d


def record_migs(nvml: Any, handle: Any) -> dict[str, Any]:
    """The MIG instances of a GPU in MIG mode: nvmlDeviceGetMaxMigDeviceCount, and under "migs"
    one entry per index below it: NotFound where no instance exists, else what the MIG handle
    answers (name, UUID, memory, GPU and compute instance ids)."""
    count = ask(nvml, "nvmlDeviceGetMaxMigDeviceCount", handle)
    migs: list[dict[str, Any]] = []
    out = {"nvmlDeviceGetMaxMigDeviceCount": count, "migs": migs}
    if is_error(count):
        return out
    for index in range(count):
        mig = ask(nvml, "nvmlDeviceGetMigDeviceHandleByIndex", handle, index)
        if is_error(mig):
            migs.append({"nvmlDeviceGetMigDeviceHandleByIndex": mig})
            continue
        migs.append({
            "nvmlDeviceGetMigDeviceHandleByIndex": None,
            "nvmlDeviceGetName": ask(nvml, "nvmlDeviceGetName", mig),
            "nvmlDeviceGetUUID": ask(nvml, "nvmlDeviceGetUUID", mig),
            "nvmlDeviceGetMemoryInfo": ask(nvml, "nvmlDeviceGetMemoryInfo", mig, convert=_memory),
            "nvmlDeviceGetGpuInstanceId": ask(nvml, "nvmlDeviceGetGpuInstanceId", mig),
            "nvmlDeviceGetComputeInstanceId": ask(nvml, "nvmlDeviceGetComputeInstanceId", mig),
        })
    return out


def record(nvml: Any, cpu_count: int | None = None) -> dict[str, Any]:
    """Every NVML answer this host gives, as JSON-able data (see the module docstring).

    `nvml` is the pynvml module or a stand-in with the same functions (`replay.ReplayNvml`).
    nvmlShutdown is called whenever nvmlInit succeeded, also when a query raises.
    """
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return {"nvmlInit": {"error": _error_name(nvml, exc), "message": str(exc)}}
    try:
        rec: dict[str, Any] = {"nvmlInit": None}
        rec["nvmlSystemGetDriverVersion"] = ask(nvml, "nvmlSystemGetDriverVersion")
        rec["nvmlSystemGetCudaDriverVersion"] = ask(nvml, "nvmlSystemGetCudaDriverVersion")
        count = nvml.nvmlDeviceGetCount()
        rec["nvmlDeviceGetCount"] = count
        cpu_words = max(1, -(-(cpu_count or os.cpu_count() or 1) // 64))
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        rec["devices"] = [_device(nvml, h, cpu_words) for h in handles]
        pairs: dict[str, Any] = {}
        for i in range(count):
            for j in range(i + 1, count):
                pairs[f"{i},{j}"] = {
                    "nvmlDeviceGetTopologyCommonAncestor": ask(
                        nvml, "nvmlDeviceGetTopologyCommonAncestor", handles[i], handles[j]),
                    "nvmlDeviceGetP2PStatus": ask(
                        nvml, "nvmlDeviceGetP2PStatus", handles[i], handles[j], P2P_CAPS_INDEX_READ),
                }
        rec["pairs"] = pairs
        return rec
    finally:
        nvml.nvmlShutdown()


# Deriving --------------------------------------------------------------------------------------


def _value(d: dict[str, Any], key: str, unknown: dict[str, str], field_name: str) -> Any:
    value = d.get(key, {"error": "NotRecorded"})
    if is_error(value):
        unknown[field_name] = why(key, value["error"])
        return None
    return value


def _cpus(words: list[int]) -> tuple[int, ...]:
    return tuple(w * 64 + bit for w, word in enumerate(words) for bit in range(64) if word >> bit & 1)


def _norm_bus(bus_id: str | None) -> str | None:
    # NVML pads the PCI domain to 8 hex digits in one call and 4 in another; compare the tail.
    return bus_id.lower()[-12:] if bus_id else None


def derive(rec: dict[str, Any]) -> tuple[list[Accelerator], list[PeerLink], str, str | None, str | None]:
    """(accelerators, links, gpu_reason, driver_version, cuda_driver_version) of a recording."""
    init = rec.get("nvmlInit")
    if is_error(init) or (isinstance(init, dict) and "error" in init):
        name = init["error"]
        plain = {
            "LibraryNotFound": "no NVIDIA driver (NVML library not found)",
            "DriverNotLoaded": "the NVIDIA driver is not loaded",
            "NoPermission": "no permission to query the NVIDIA driver",
        }.get(name, f"NVML failed ({name}{': ' + init['message'] if init.get('message') else ''})")
        return [], [], f"no GPUs: {plain}", None, None
    driver = rec.get("nvmlSystemGetDriverVersion")
    driver = None if is_error(driver) else driver
    cuda = rec.get("nvmlSystemGetCudaDriverVersion")
    cuda_text = None if cuda is None or is_error(cuda) else f"{cuda // 1000}.{cuda % 1000 // 10}"
    devices = rec.get("devices", [])
    physical = [_accelerator(i, d) for i, d in enumerate(devices)]
    accelerators, links, notes = _cuda_view(devices, physical, _links(rec, devices, physical))
    reason = (f"NVML: {len(physical)} GPU(s), driver {driver or '?'}" if physical
              else "no GPUs: NVML answers but lists no devices")
    return accelerators, links, "; ".join([reason, *notes]), driver, cuda_text


def _accelerator(index: int, d: dict[str, Any]) -> Accelerator:
    unknown: dict[str, str] = {}
    name = _value(d, "nvmlDeviceGetName", unknown, "name") or f"GPU {index}"
    memory = _value(d, "nvmlDeviceGetMemoryInfo", unknown, "memory_bytes")
    cc = _value(d, "nvmlDeviceGetCudaComputeCapability", unknown, "compute_capability")
    pci = _value(d, "nvmlDeviceGetPciInfo", unknown, "pci_bus_id")
    numa = _value(d, "nvmlDeviceGetNumaNodeId", unknown, "numa_node")
    if numa is not None and numa < 0:
        unknown["numa_node"] = f"nvmlDeviceGetNumaNodeId: {numa} (no NUMA affinity)"
        numa = None
    words = _value(d, "nvmlDeviceGetCpuAffinity", unknown, "cpus")
    fields = d.get("nvmlDeviceGetFieldValues")
    fields = {} if fields is None or is_error(fields) else fields

    def field_value(key: str) -> Any:
        v = fields.get(key)
        return None if v is None or is_error(v) else v

    # Host link: NVLink-C2C when enabled (Grace Hopper), else PCIe at the link's capability.
    c2c = d.get("nvmlDeviceGetC2cModeInfoV")
    link_unknown: dict[str, str] = {}
    if is_error(c2c) and c2c["error"] != "NotSupported":  # NotSupported: no C2C on this GPU
        link_unknown["kind"] = why("nvmlDeviceGetC2cModeInfoV", c2c["error"]) + "; PCIe assumed"
    if isinstance(c2c, dict) and c2c.get("isC2cEnabled"):
        count = field_value(str(FI_C2C_LINK_COUNT))
        per_link = field_value(f"{FI_C2C_LINK_GET_MAX_BW}@0")
        bandwidth = round(count * per_link / 1000, 1) if count and per_link else None
        if bandwidth is None:
            link_unknown["bandwidth_gb_s"] = "NVML field C2C_LINK_COUNT / C2C_LINK_GET_MAX_BW not reported"
        host_link = HostLink("nvlink-c2c", bandwidth, c2c_links=count, unknown=link_unknown)
    else:
        gen = _value(d, "nvmlDeviceGetMaxPcieLinkGeneration", link_unknown, "pcie_generation")
        width = _value(d, "nvmlDeviceGetMaxPcieLinkWidth", link_unknown, "pcie_width")
        bandwidth = pcie_gb_s(gen, width)
        if bandwidth is None:
            link_unknown.setdefault("bandwidth_gb_s", "PCIe generation or width unknown")
        host_link = HostLink("pcie", bandwidth, pcie_generation=gen, pcie_width=width, unknown=link_unknown)

    active = [entry for entry in d.get("nvlinks", [])
              if not is_error(entry.get("nvmlDeviceGetNvLinkState")) and entry.get("nvmlDeviceGetNvLinkState")]
    version = None
    link_gb_s = None
    nvswitch = False
    if active:
        versions = {e.get("nvmlDeviceGetNvLinkVersion") for e in active}
        raw = max((v for v in versions if isinstance(v, int)), default=None)
        version = NVLINK_VERSIONS.get(raw) if raw is not None else None
        speed = field_value(str(FI_NVLINK_SPEED_MBPS_COMMON))
        if speed:
            link_gb_s = round(speed / 1000, 3)
        elif version in NVLINK_LINK_GB_S:
            link_gb_s = NVLINK_LINK_GB_S[version]
            unknown["nvlink_link_gb_s"] = f"NVLink speed field not reported; {link_gb_s} GB/s from the NVLink {version} table"
        nvswitch = any(e.get("nvmlDeviceGetNvLinkRemoteDeviceType") == NVLINK_DEVICE_TYPE_SWITCH for e in active)
    return Accelerator(
        index=index,
        name=name,
        memory_bytes=memory["total"] if memory else None,
        compute_capability=tuple(cc) if cc else None,  # type: ignore[arg-type]
        host_link=host_link,
        uuid=_value(d, "nvmlDeviceGetUUID", unknown, "uuid"),
        pci_bus_id=pci["busId"] if pci else None,
        numa_node=numa,
        cpus=_cpus(words) if words else None,
        nvlink_links=len(active),
        nvlink_version=version,
        nvlink_link_gb_s=link_gb_s,
        nvswitch=nvswitch,
        unknown=unknown,
    )


def mig_mode_notes(modes: list[Any]) -> list[str]:
    """A note per error nvmlDeviceGetMigMode gave (GPUs by index), but NotSupported, which is
    simply a GPU without MIG: such a GPU is listed whole, which is wrong if it is in MIG mode."""
    failed: dict[str, list[str]] = {}
    for index, mode in enumerate(modes):
        if is_error(mode) and mode["error"] != "NotSupported":
            failed.setdefault(mode["error"], []).append(str(index))
    return [f"GPU {', '.join(gpus)}: MIG mode unknown ({why('nvmlDeviceGetMigMode', error)}); listed whole"
            for error, gpus in failed.items()]


def _is_mig(d: dict[str, Any]) -> bool:
    mode = d.get("nvmlDeviceGetMigMode")
    return isinstance(mode, list) and bool(mode) and mode[0] == MIG_ENABLED


def _cuda_view(devices: list[dict[str, Any]], physical: list[Accelerator], links: list[PeerLink],
               ) -> tuple[list[Accelerator], list[PeerLink], list[str]]:
    """The accelerators CUDA shows, with notes: a GPU in MIG mode is replaced by its MIG
    instances, each with its own memory, no NVLink and no peer-to-peer access (their traffic goes
    through host memory); indices are then CUDA's, in order."""
    notes = mig_mode_notes([d.get("nvmlDeviceGetMigMode") for d in devices])
    if not any(_is_mig(d) for d in devices):
        return physical, links, notes
    accs: list[Accelerator] = []
    parents: list[tuple[int, bool]] = []  # (physical index, is a MIG instance) per accelerator
    for acc, d in zip(physical, devices):
        if not _is_mig(d):
            parents.append((acc.index, False))
            accs.append(dataclasses.replace(acc, index=len(accs)))
            continue
        instances = [m for m in d.get("migs", [])
                     if not is_error(m.get("nvmlDeviceGetMigDeviceHandleByIndex"))]
        note = (f"GPU {acc.index} ({acc.name}) is in MIG mode: its {len(instances)} MIG instance(s) "
                "are listed instead")
        count = d.get("nvmlDeviceGetMaxMigDeviceCount")
        if is_error(count):
            note += f" ({why('nvmlDeviceGetMaxMigDeviceCount', count['error'])})"
        notes.append(note + "; MIG instances have no NVLink and no peer-to-peer access")
        # The parent's placement (PCIe, NUMA, CPUs, compute capability) holds for its instances.
        carried = {k: v for k, v in acc.unknown.items()
                   if k not in ("name", "memory_bytes", "uuid", "nvlink_link_gb_s")}
        for mig in instances:
            unknown = dict(carried)
            name = _value(mig, "nvmlDeviceGetName", unknown, "name") or f"{acc.name} MIG"
            memory = _value(mig, "nvmlDeviceGetMemoryInfo", unknown, "memory_bytes")
            uuid = _value(mig, "nvmlDeviceGetUUID", unknown, "uuid")
            parents.append((acc.index, True))
            accs.append(dataclasses.replace(
                acc, index=len(accs), name=name, memory_bytes=memory["total"] if memory else None, uuid=uuid,
                nvlink_links=0, nvlink_version=None, nvlink_link_gb_s=None, nvswitch=False, unknown=unknown))
    by_pair = {(link.a, link.b): link for link in links}
    view = []
    for x in range(len(accs)):
        for y in range(x + 1, len(accs)):
            (p, p_mig), (q, q_mig) = parents[x], parents[y]
            physical_link = by_pair.get((min(p, q), max(p, q)))
            if not p_mig and not q_mig:
                if physical_link is not None:
                    view.append(dataclasses.replace(physical_link, a=x, b=y))
                continue
            path = TOPOLOGY_LEVELS[0] if p == q else physical_link.pcie_path if physical_link else None
            known = [bw for bw in (accs[x].host_link.bandwidth_gb_s, accs[y].host_link.bandwidth_gb_s) if bw]
            view.append(PeerLink(x, y, "pcie", min(known) if len(known) == 2 else None, pcie_path=path, p2p=False))
    return accs, view, notes


def _links(rec: dict[str, Any], devices: list[dict[str, Any]], accs: list[Accelerator]) -> list[PeerLink]:
    by_bus = {_norm_bus(a.pci_bus_id): a.index for a in accs if a.pci_bus_id}
    direct: dict[tuple[int, int], int] = {}
    for acc, d in zip(accs, devices):
        for entry in d.get("nvlinks", []):
            if is_error(entry.get("nvmlDeviceGetNvLinkState")) or not entry.get("nvmlDeviceGetNvLinkState"):
                continue
            if entry.get("nvmlDeviceGetNvLinkRemoteDeviceType") != 0:  # not a GPU at the far end
                continue
            remote = entry.get("nvmlDeviceGetNvLinkRemotePciInfo")
            peer = by_bus.get(_norm_bus(remote.get("busId"))) if isinstance(remote, dict) else None
            if peer is not None and peer != acc.index:
                key = (min(acc.index, peer), max(acc.index, peer))
                direct[key] = direct.get(key, 0) + 1
    links = []
    for key, pair in rec.get("pairs", {}).items():
        a, b = (int(x) for x in key.split(","))
        unknown: dict[str, str] = {}
        level = pair.get("nvmlDeviceGetTopologyCommonAncestor")
        path = None
        if is_error(level):
            unknown["pcie_path"] = why("nvmlDeviceGetTopologyCommonAncestor", level["error"])
        else:
            path = TOPOLOGY_LEVELS.get(level, f"level {level}")
        status = pair.get("nvmlDeviceGetP2PStatus")
        p2p = None
        if is_error(status):
            unknown["p2p"] = why("nvmlDeviceGetP2PStatus", status["error"])
        else:
            p2p = status == 0
        A, B = accs[a], accs[b]
        if A.nvswitch and B.nvswitch:
            bw = min(x for x in (A.nvlink_gb_s, B.nvlink_gb_s) if x is not None) \
                if A.nvlink_gb_s and B.nvlink_gb_s else None
            links.append(PeerLink(a, b, "nvswitch", bw, nvlink_links=min(A.nvlink_links, B.nvlink_links),
                                  pcie_path=path, p2p=p2p, unknown=unknown))
        elif (a, b) in direct:
            n = direct[(a, b)] // 2 if direct[(a, b)] > 1 else 1  # each link was seen from both ends
            speed = A.nvlink_link_gb_s or B.nvlink_link_gb_s
            links.append(PeerLink(a, b, "nvlink", round(n * speed, 1) if speed else None, nvlink_links=n,
                                  pcie_path=path, p2p=p2p, unknown=unknown))
        else:
            bws = [x.host_link.bandwidth_gb_s for x in (A, B) if x.host_link.kind == "pcie"]
            bw = min(bws) if len(bws) == 2 and None not in bws else None
            links.append(PeerLink(a, b, "pcie", bw, pcie_path=path, p2p=p2p, unknown=unknown))
    return links


def probe(nvml: Any = None, cpu_count: int | None = None) -> tuple[dict[str, Any], tuple]:
    """(recording, derive(recording)) of this host. Imports pynvml only when `nvml` is None."""
    if nvml is None:
        try:
            import pynvml as nvml  # type: ignore[no-redef]
        except ImportError:
            rec = {"nvmlInit": {"error": "LibraryNotFound",
                                "message": "pynvml (package nvidia-ml-py) is not installed"}}
            return rec, derive(rec)
    try:
        rec = record(nvml, cpu_count)
    except nvml.NVMLError as exc:  # a GPU lost mid-probe: an answer with the reason, not a traceback
        rec = {"nvmlInit": {"error": _error_name(nvml, exc), "message": f"during the probe: {exc}"}}
    return rec, derive(rec)
