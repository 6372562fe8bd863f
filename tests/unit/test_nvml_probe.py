"""The NVML probe under MIG and with an older nvidia-ml-py, and count_gpus with CUDA_VISIBLE_DEVICES
given as indices, GPU UUIDs and MIG ids: all through the pynvml stand-in (topology/replay.py)."""

from __future__ import annotations

import copy
import json
import sys

import pytest

from dsl.topology import nvml as nvmllib
from dsl.topology.probe import FIXTURES
from dsl.topology.replay import ReplayNvml

MIB = 1 << 20


def _recording(name: str) -> dict:
    return copy.deepcopy(json.loads((FIXTURES / f"{name}.json").read_text())["nvml"])


def mig_recording(name: str = "h100-sxm-8x", instances: int = 2) -> dict:
    """A shipped machine with GPU 0 in MIG mode, holding `instances` 3g.40gb instances (of 7
    possible MIG device indices; the others answer NotFound, as NVML does)."""
    rec = _recording(name)
    device = rec["devices"][0]
    device["nvmlDeviceGetMigMode"] = [1, 1]
    device["nvmlDeviceGetMaxMigDeviceCount"] = 7
    migs = []
    for index in range(7):
        if index >= instances:
            migs.append({"nvmlDeviceGetMigDeviceHandleByIndex": {"error": "NotFound"}})
            continue
        total = 40192 * MIB
        migs.append({
            "nvmlDeviceGetMigDeviceHandleByIndex": None,
            "nvmlDeviceGetName": f"{device['nvmlDeviceGetName']} MIG 3g.40gb",
            "nvmlDeviceGetUUID": f"MIG-0b1d{index}e5c-76c0-5a2b-9b4f-1c2d3e4f5a6{index}",
            "nvmlDeviceGetMemoryInfo": {"total": total, "free": total - 13 * MIB, "used": 13 * MIB},
            "nvmlDeviceGetGpuInstanceId": 1 + index,
            "nvmlDeviceGetComputeInstanceId": 0,
        })
    device["migs"] = migs
    return rec


# MIG ---------------------------------------------------------------------------------------------


def test_mig_recording_replays_exactly():
    rec = mig_recording()
    fake = ReplayNvml(rec)
    # The probe asks a GPU in MIG mode for its MIG devices, and each MIG handle for its own
    # name, UUID, memory and instance ids: exactly what the recording holds.
    assert nvmllib.record(fake, cpu_count=224) == rec
    assert fake.shutdown_calls == 1 and not fake.initialized


def test_mig_instances_are_the_accelerators_with_their_own_memory():
    accs, links, reason, *_ = nvmllib.derive(mig_recording())
    # GPU 0 is replaced by its two MIG instances; GPUs 1-7 stay whole: 9 CUDA devices.
    assert len(accs) == 9 and [a.index for a in accs] == list(range(9))
    first, second, whole = accs[0], accs[1], accs[2]
    assert first.name == "NVIDIA H100 80GB HBM3 MIG 3g.40gb"
    assert first.memory_bytes == 40192 * MIB  # the instance's memory, not the GPU's 80 GB
    assert first.uuid.startswith("MIG-") and first.uuid != second.uuid
    assert (first.nvlink_links, first.nvswitch) == (0, False)
    assert first.compute_capability == (9, 0) and first.numa_node == 0  # the parent GPU's
    assert whole.name == "NVIDIA H100 80GB HBM3" and whole.memory_bytes == 81559 * MIB and whole.nvswitch
    assert "GPU 0 (NVIDIA H100 80GB HBM3) is in MIG mode: its 2 MIG instance(s) are listed instead" in reason
    assert reason.startswith("NVML: 8 GPU(s), driver 550.54.15")
    # No peer-to-peer for MIG instances; whole GPUs keep their NVSwitch link, re-indexed.
    assert len(links) == 9 * 8 // 2
    between = next(link for link in links if (link.a, link.b) == (0, 1))
    assert (between.kind, between.p2p, between.pcie_path) == ("pcie", False, "same board")
    assert next(link for link in links if (link.a, link.b) == (0, 2)).p2p is False
    assert next(link for link in links if (link.a, link.b) == (2, 3)).kind == "nvswitch"


def test_mig_topology_round_trips_and_plans(tmp_path):
    from dsl.launcher.hardware import hardware_of
    from dsl.topology.model import HostTopology
    from dsl.topology.probe import from_data

    data = json.loads((FIXTURES / "h100-sxm-8x.json").read_text())
    data["nvml"] = mig_recording()
    topo = from_data(data, "test")
    assert HostTopology.from_json(json.loads(json.dumps(topo.to_json()))) == topo
    assert "MIG mode" in topo.gpu_reason
    # The planner sees the smallest device: a MIG instance's 40 GB, not the GPU's 80 GB.
    assert hardware_of(topo).device_memory_bytes == 40192 * MIB


def test_mig_gpu_without_instances_shows_nothing():
    accs, _, reason, *_ = nvmllib.derive(mig_recording(instances=0))
    assert len(accs) == 7 and "its 0 MIG instance(s) are listed instead" in reason


# An older nvidia-ml-py ----------------------------------------------------------------------------


class OlderPynvml:
    """The pynvml stand-in as an older nvidia-ml-py: without the functions in `absent`."""

    def __init__(self, fake: ReplayNvml, absent: set[str]) -> None:
        self._fake, self._absent = fake, absent

    def __getattr__(self, name: str):
        if name in self._absent:
            raise AttributeError(f"module 'pynvml' has no attribute {name!r}")
        return getattr(self._fake, name)


def test_functions_missing_from_pynvml_become_unknowns_with_reasons():
    fake = ReplayNvml(_recording("h100-sxm-8x"))
    older = OlderPynvml(fake, {"nvmlDeviceGetNumaNodeId", "nvmlDeviceGetC2cModeInfoV", "nvmlDeviceGetMigMode"})
    recording, (accs, _, reason, _, _) = nvmllib.probe(older, cpu_count=224)
    assert len(accs) == 8 and fake.shutdown_calls == 1
    assert accs[0].numa_node is None
    assert accs[0].unknown["numa_node"] == ("nvmlDeviceGetNumaNodeId: not in the installed nvidia-ml-py "
                                            "(pip install -U nvidia-ml-py)")
    assert accs[0].host_link.kind == "pcie"
    assert accs[0].host_link.unknown["kind"].startswith("nvmlDeviceGetC2cModeInfoV: not in the installed")
    assert ("GPU 0, 1, 2, 3, 4, 5, 6, 7: MIG mode unknown (nvmlDeviceGetMigMode: not in the installed "
            "nvidia-ml-py") in reason
    assert recording["devices"][0]["nvmlDeviceGetNumaNodeId"] == {"error": "NotInPynvml"}


def test_a_recording_from_an_older_pynvml_replays_as_one():
    fake = ReplayNvml(_recording("gh200-1x"))
    recording, _ = nvmllib.probe(OlderPynvml(fake, {"nvmlDeviceGetC2cModeInfoV"}), cpu_count=72)
    again = ReplayNvml(recording)
    assert again.missing == {"nvmlDeviceGetC2cModeInfoV"}
    with pytest.raises(AttributeError):
        again.nvmlDeviceGetC2cModeInfoV  # noqa: B018 - absent, as from the module that was recorded
    assert nvmllib.record(again, cpu_count=72) == recording
    # On a GH200 the host link is then unknown to be NVLink-C2C, and says why.
    (acc,), *_ = nvmllib.derive(recording)
    assert acc.host_link.kind == "pcie" and "PCIe assumed" in acc.host_link.unknown["kind"]


def _count(monkeypatch, fake, visible: str | None = None):
    """count_gpus() with `fake` as the pynvml module and CUDA_VISIBLE_DEVICES=visible."""
    from dsl.topology.gpus import count_gpus

    monkeypatch.setitem(sys.modules, "pynvml", fake)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    return count_gpus()


def test_count_gpus_with_a_pynvml_missing_mig_functions(monkeypatch):
    fake = ReplayNvml(_recording("a100-pcie-4x-nvlink-pairs"))
    gpus = _count(monkeypatch, OlderPynvml(fake, {"nvmlDeviceGetMigMode"}))
    assert (gpus.count, gpus.devices) == (4, ("0", "1", "2", "3"))
    assert "GPU 0, 1, 2, 3: MIG mode unknown (nvmlDeviceGetMigMode: not in the installed nvidia-ml-py" in gpus.reason
    assert fake.shutdown_calls == 1


# count_gpus and CUDA_VISIBLE_DEVICES ------------------------------------------------------------------


def _uuids(rec: dict) -> list[str]:
    return [d["nvmlDeviceGetUUID"] for d in rec["devices"]]


def test_count_gpus_without_visible_devices_counts_mig_instances(monkeypatch):
    rec = mig_recording()
    gpus = _count(monkeypatch, ReplayNvml(rec))
    migs = [m["nvmlDeviceGetUUID"] for m in rec["devices"][0]["migs"][:2]]
    assert gpus.count == 9 and gpus.devices == (*migs, "1", "2", "3", "4", "5", "6", "7")
    assert "GPU 0 is in MIG mode with 2 MIG instance(s)" in gpus.reason


@pytest.mark.parametrize("visible, expected", [
    ("3,1", ("3", "1")),
    (" 3 , 1 ,", ("3", "1")),  # spaces trimmed; an empty entry ends the list
    ("2,-1,3", ("2",)),  # CUDA stops at the first invalid entry
    ("1,9,2", ("1",)),  # no GPU 9 on this host
    ("-1", ()),
    ("", ()),
])
def test_count_gpus_with_visible_indices(monkeypatch, visible, expected):
    gpus = _count(monkeypatch, ReplayNvml(_recording("h100-sxm-8x")), visible)
    assert gpus.count == len(expected), gpus.reason
    assert gpus.devices == expected


def test_count_gpus_with_visible_gpu_uuids(monkeypatch):
    rec = _recording("h100-sxm-8x")
    uuids = _uuids(rec)
    for visible, expected in [
        (f"{uuids[5]},GPU-00000000-dead-beef-0000-000000000000,{uuids[2]}", (uuids[5],)),
        (f"{uuids[5]},{uuids[2]}", (uuids[5], uuids[2])),
        (f"{uuids[5][:12]},{uuids[2]}", (uuids[5][:12], uuids[2])),  # a unique prefix is enough
    ]:
        gpus = _count(monkeypatch, ReplayNvml(rec), visible)
        assert gpus.count == len(expected), gpus.reason
        assert gpus.devices == expected
    gpus = _count(monkeypatch, ReplayNvml(rec), f"{uuids[5]},GPU-00000000-dead-beef-0000-000000000000")
    assert "'GPU-00000000-dead-beef-0000-000000000000' names no device here" in gpus.reason


def test_count_gpus_with_visible_mig_ids(monkeypatch):
    rec = mig_recording("gh200-1x", instances=3)  # one GPU, three MIG instances
    migs = [m["nvmlDeviceGetUUID"] for m in rec["devices"][0]["migs"][:3]]
    gpu_uuid = rec["devices"][0]["nvmlDeviceGetUUID"]
    legacy = f"MIG-{gpu_uuid}/2/0"  # GPU instance 2, compute instance 0: the second MIG device
    for visible, expected in [
        (f"{migs[2]},{migs[0]}", (migs[2], migs[0])),
        (f"{legacy},{migs[0]}", (legacy, migs[0])),
        (f"{migs[1]},MIG-{gpu_uuid}/9/0,{migs[0]}", (migs[1],)),
    ]:
        gpus = _count(monkeypatch, ReplayNvml(rec), visible)
        assert gpus.count == len(expected), gpus.reason
        assert gpus.devices == expected


def test_count_gpus_answers_when_a_gpu_is_lost_midway(monkeypatch):
    fake = ReplayNvml(_recording("h100-sxm-8x"))
    fake.fail["nvmlDeviceGetHandleByIndex"] = "GpuIsLost"
    gpus = _count(monkeypatch, fake)
    assert gpus.count == 0 and "NVML failed while listing GPUs (NVMLError_GpuIsLost" in gpus.reason
    assert fake.shutdown_calls == 1 and not fake.initialized


def test_a_cpu_host_without_jemalloc_gets_a_plan_note_and_the_probe_finds_the_library():
    """topology/host.py probes libjemalloc.so.2 (a CPU rank's default malloc, engine/cpu_alloc.py);
    a CPU host where the probe found none gets a note in the plan, a fixture (not probed) none."""
    import dataclasses

    from dsl.launcher.hardware import hardware_of
    from dsl.topology.model import HostTopology
    from dsl.topology.probe import load_topology, probe_local

    local, _ = probe_local()
    assert local.jemalloc and local.jemalloc.endswith("libjemalloc.so.2")  # make test installs libjemalloc2
    cpu = load_topology("cpu-only")
    assert cpu.jemalloc is None and not any("jemalloc" in n for n in hardware_of(cpu).notes)
    missing = dataclasses.replace(cpu, jemalloc="", hostname="n7")
    assert [n for n in hardware_of(missing).notes if "jemalloc" in n] == [
        "libjemalloc.so.2 is not on n7: engine.cpu_allocator auto (the default) falls back to glibc keeping freed "
        "blocks, whose heap holes can put each rank's peak resident set 10-100% above this plan (apt install "
        "libjemalloc2; engine/cpu_alloc.py)"]
    assert not any("jemalloc" in n for n in hardware_of(dataclasses.replace(local, accelerators=())).notes)
    assert HostTopology.from_json(missing.to_json()).jemalloc == ""
