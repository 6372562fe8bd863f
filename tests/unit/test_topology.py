"""Topology: the NVML probe against a fake pynvml replaying every shipped machine, the host probe
on a fake /sys, JSON round trips, the disk measurement, and `dsl probe` on this CPU-only host."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dsl.topology import nvml as nvmllib
from dsl.topology.host import parse_cpulist, probe_host
from dsl.topology.model import HostTopology
from dsl.topology.probe import FIXTURES, assemble, fixture_names, from_data, load_topology, probe_local
from dsl.topology.replay import ReplayNvml
from tests.conftest import run_dsl

MACHINES = ["a100-pcie-4x-nvlink-pairs", "cpu-only", "gh200-1x", "h100-sxm-8x", "l40s-8x-pcie", "workstation-4090"]


def _fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def test_every_required_machine_type_ships():
    assert set(MACHINES) <= set(fixture_names())


@pytest.mark.parametrize("name", MACHINES)
def test_probe_asks_exactly_what_was_recorded_and_shuts_nvml_down(name: str):
    fixture = _fixture(name)
    recording = fixture["nvml"]
    fake = ReplayNvml(recording)
    # The probe's questions, answered by the fake, reproduce the recording: every call and argument
    # the recording holds is one the probe makes on real hardware, and nothing else.
    assert nvmllib.record(fake, cpu_count=fixture["host"]["cpu"]["logical_cpus"]) == recording
    initialized = recording["nvmlInit"] is None
    assert fake.init_calls == 1
    assert fake.shutdown_calls == (1 if initialized else 0)
    assert not fake.initialized


def test_shutdown_happens_when_a_query_fails_midway():
    fake = ReplayNvml(_fixture("h100-sxm-8x")["nvml"])
    fake.fail["nvmlDeviceGetHandleByIndex"] = "GpuIsLost"
    with pytest.raises(fake.NVMLError):
        nvmllib.record(fake)
    assert fake.shutdown_calls == 1 and not fake.initialized
    # Through probe() the failure is an answer with its reason.
    fake = ReplayNvml(_fixture("h100-sxm-8x")["nvml"])
    fake.fail["nvmlDeviceGetHandleByIndex"] = "GpuIsLost"
    _, (accs, _, reason, _, _) = nvmllib.probe(fake)
    assert accs == [] and reason == "no GPUs: NVML failed (GpuIsLost: during the probe: GpuIsLost)"
    assert fake.shutdown_calls == 1


def test_unsupported_queries_become_unknowns_with_reasons():
    recording = json.loads(json.dumps(_fixture("h100-sxm-8x")["nvml"]))
    recording["devices"][0]["nvmlDeviceGetNumaNodeId"] = {"error": "NotSupported"}
    recording["devices"][0]["nvmlDeviceGetFieldValues"]["90"] = {"error": "NotSupported"}
    accs, *_ = nvmllib.derive(recording)
    assert accs[0].numa_node is None
    assert accs[0].unknown["numa_node"] == "nvmlDeviceGetNumaNodeId: NotSupported"
    # No speed field: the NVLink 4.0 table gives 25 GB/s per link, and says so.
    assert accs[0].nvlink_link_gb_s == 25.0 and "NVLink 4.0 table" in accs[0].unknown["nvlink_link_gb_s"]


def test_h100_sxm_nvswitch():
    topo = load_topology("h100-sxm-8x")
    assert len(topo.accelerators) == 8
    a = topo.accelerators[0]
    assert a.name == "NVIDIA H100 80GB HBM3" and a.memory_bytes == 81559 * 2**20
    assert a.compute_capability == (9, 0)
    assert (a.nvlink_links, a.nvlink_version, a.nvswitch) == (18, "4.0", True)
    assert a.nvlink_gb_s == pytest.approx(478.1)  # 18 x 26.562 GB/s per direction
    assert a.host_link.kind == "pcie" and a.host_link.describe() == "PCIe Gen5 x16 (63 GB/s)"
    assert len(topo.links) == 28 and {link.kind for link in topo.links} == {"nvswitch"}
    assert topo.link(0, 7).pcie_path == "system (across CPU sockets)"
    assert [g.numa_node for g in topo.accelerators] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert topo.accelerators[5].cpus[:2] == (56, 57)


def test_gh200_host_link_is_nvlink_c2c_and_hbm_is_not_host_ram():
    topo = load_topology("gh200-1x")
    a = topo.accelerators[0]
    assert a.host_link.kind == "nvlink-c2c" and a.host_link.bandwidth_gb_s == 450.0 and a.host_link.c2c_links == 10
    assert a.nvlink_links == 0  # its 18 NVLinks are unconnected in a single superchip
    assert a.memory_bytes == 97871 * 2**20
    # The driver onlines the HBM as a CPU-less NUMA node; it is not host RAM for offload.
    assert topo.usable_ram_bytes == 480 * 10**9 < topo.ram_bytes


def test_l40s_pcie_without_nvlink_and_p2p_only_behind_a_switch():
    topo = load_topology("l40s-8x-pcie")
    assert {a.nvlink_links for a in topo.accelerators} == {0}
    assert topo.accelerators[0].host_link.describe() == "PCIe Gen4 x16 (31.5 GB/s)"
    assert {link.kind for link in topo.links} == {"pcie"}
    assert topo.link(0, 1).p2p is True and topo.link(0, 1).pcie_path == "PCIe switch"
    assert topo.link(0, 2).p2p is False and topo.link(0, 5).pcie_path == "system (across CPU sockets)"


def test_a100_pcie_nvlink_bridges_join_pairs_only():
    topo = load_topology("a100-pcie-4x-nvlink-pairs")
    pair = topo.link(0, 1)
    assert (pair.kind, pair.nvlink_links, pair.bandwidth_gb_s) == ("nvlink", 12, pytest.approx(309.4))
    assert topo.link(2, 3).kind == "nvlink"
    assert {topo.link(a, b).kind for a, b in ((0, 2), (0, 3), (1, 2), (1, 3))} == {"pcie"}


def test_cpu_only_recording_says_plainly_there_are_no_gpus():
    topo = load_topology("cpu-only")
    assert topo.accelerators == () and topo.links == ()
    assert topo.gpu_reason == "no GPUs: no NVIDIA driver (NVML library not found)"


@pytest.mark.parametrize("name", MACHINES)
def test_topology_json_round_trip(name: str):
    topo = load_topology(name)
    data = json.loads(json.dumps(topo.to_json()))
    assert HostTopology.from_json(data) == topo
    assert from_data(data, "x") == topo


def test_load_topology_errors_name_the_fixtures(tmp_path):
    from dsl.engine.errors import UserError

    with pytest.raises(UserError, match="no such fixture or file; fixtures: a100-pcie"):
        load_topology("h100")
    bad = tmp_path / "t.json"
    bad.write_text('{"schema": "something/1"}')
    with pytest.raises(UserError, match="neither a recording"):
        load_topology(str(bad))


def test_pcie_bandwidth_by_generation():
    assert nvmllib.pcie_gb_s(3, 16) == 15.8
    assert nvmllib.pcie_gb_s(4, 16) == 31.5
    assert nvmllib.pcie_gb_s(5, 16) == 63.0
    assert nvmllib.pcie_gb_s(4, 8) == 15.8
    assert nvmllib.pcie_gb_s(None, 16) is None


def test_real_pynvml_without_driver_is_an_answer_not_an_exception():
    rec, (accs, links, reason, driver, _) = nvmllib.probe()
    if rec["nvmlInit"] is None:
        pytest.skip("this machine has an NVIDIA driver")
    assert accs == [] and links == [] and driver is None
    assert reason.startswith("no GPUs: ")


# Host probe -------------------------------------------------------------------------------------


def _fake_sys(root):
    def put(rel: str, text: str) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    put("devices/system/node/node0/cpulist", "0-3,8-11\n")
    put("devices/system/node/node0/meminfo", "Node 0 MemTotal:       1048576 kB\n")
    put("devices/system/node/node1/cpulist", "4-7,12-15\n")
    put("devices/system/node/node1/meminfo", "Node 1 MemTotal:       1048576 kB\n")
    put("block/nvme0n1/size", "7501476528\n")
    put("block/nvme0n1/device/model", "SAMSUNG MZQL27T6HBLA-00A07\n")
    put("class/infiniband/mlx5_0/ports/1/rate", "400 Gb/sec (4X NDR)\n")
    put("class/infiniband/mlx5_0/ports/1/state", "4: ACTIVE\n")
    put("class/net/eth0/speed", "100000\n")
    (root / "class/net/eth0/device").mkdir(parents=True)
    put("class/net/docker0/speed", "-1\n")  # virtual: no device link, skipped
    put("bus/pci/devices/0000:18:00.0/vendor", "0x10de\n")
    put("bus/pci/devices/0000:18:00.0/class", "0x030200\n")
    put("bus/pci/devices/0000:19:00.0/vendor", "0x10de\n")
    put("bus/pci/devices/0000:19:00.0/class", "0x068000\n")  # an NVSwitch bridge, not a GPU
    put("fs/cgroup/cpu.max", "150000 100000\n")


def test_host_probe_reads_numa_nvme_nics_pci_and_cgroup(tmp_path):
    _fake_sys(tmp_path)
    host = probe_host(sys_root=tmp_path)
    assert [(n["id"], n["cpus"][:5], n["memory_bytes"]) for n in host["numa_nodes"]] == [
        (0, [0, 1, 2, 3, 8], 2**30), (1, [4, 5, 6, 7, 12], 2**30)]
    (disk,) = host["nvme"]
    assert (disk["name"], disk["model"], disk["size_bytes"]) == ("nvme0n1", "SAMSUNG MZQL27T6HBLA-00A07", 7501476528 * 512)
    assert disk["read_gb_s"] is None and "dsl probe --measure-nvme" in disk["unknown"]["read_gb_s"]
    assert host["nics"] == [{"name": "mlx5_0/1", "kind": "infiniband", "speed_gbit_s": 400.0},
                            {"name": "eth0", "kind": "ethernet", "speed_gbit_s": 100.0}]
    assert host["nvidia_pci_devices"] == 1
    assert host["cpu"]["usable_cpus"] == 1  # a 1.5-CPU cgroup quota leaves 1 whole CPU
    topo = assemble(host, {"nvmlInit": {"error": "LibraryNotFound"}}, "test")
    assert topo.gpu_reason.endswith("; 1 NVIDIA device(s) are on the PCI bus")


def test_parse_cpulist():
    assert parse_cpulist("0-2,5,7-8") == (0, 1, 2, 5, 7, 8)
    assert parse_cpulist("") == ()


def test_probe_of_this_host_matches_psutil():
    import psutil

    topo, recording = probe_local()
    assert topo.ram_bytes == psutil.virtual_memory().total
    assert topo.cpu.logical_cpus == psutil.cpu_count()
    assert recording["schema"] == "dsl.topology.recording/1"
    assert from_data(json.loads(json.dumps(recording)), "again").cpu == topo.cpu


def test_disk_measurement_writes_bounded_file_and_cleans_up(tmp_path):
    from dsl.topology.disk import measure

    result = measure(tmp_path, size_mib=16, block_mib=4, time_limit_s=2)
    assert list(tmp_path.iterdir()) == []  # the probe file is gone
    if result.reason:  # a filesystem without O_DIRECT says so instead of measuring the page cache
        assert "O_DIRECT" in result.reason and result.read_gb_s is None
    else:
        assert 0 < result.bytes_written <= 16 * 2**20
        assert result.read_gb_s > 0 and result.write_gb_s > 0


# dsl probe ---------------------------------------------------------------------------------------


def test_dsl_probe_on_this_host_prints_a_summary_without_traceback():
    proc = run_dsl("probe")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "CPU:" in proc.stdout and "RAM:" in proc.stdout
    topo, _ = probe_local()
    if not topo.accelerators:
        assert "GPUs: none — no NVIDIA driver" in proc.stdout


def test_dsl_probe_json_record_and_replay(tmp_path):
    rec = tmp_path / "me.json"
    proc = run_dsl("probe", "--json", "--record", str(rec))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)  # stdout is data only
    assert data["schema"] == "dsl.topology/1" and data["source"] == "probe"
    again = run_dsl("probe", "--json", "--topology", str(rec))
    assert json.loads(again.stdout)["cpu"] == data["cpu"]


def test_dsl_probe_shows_a_fixture_and_lists_them():
    proc = run_dsl("probe", "--topology", "gh200-1x")
    assert proc.returncode == 0, proc.stderr
    assert "NVLink-C2C (10 links, 450 GB/s)" in proc.stdout and "NVIDIA GH200 480GB" in proc.stdout
    listing = run_dsl("probe", "--list")
    assert all(name in listing.stdout for name in MACHINES)


def test_probe_never_imports_torch():
    code = ("import sys; sys.argv = ['dsl', 'probe', '--json']\n"
            "from dsl.launcher.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO_TORCH', file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stderr.strip().splitlines()[-1] == "NO_TORCH", proc.stderr


def test_count_gpus_still_answers_without_a_driver():
    from dsl.topology.gpus import count_gpus

    gpus = count_gpus()
    assert gpus.count >= 0 and gpus.reason


def test_dsl_probe_measures_a_disk_only_when_asked(tmp_path):
    proc = run_dsl("probe", "--json", "--measure-nvme", str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # the probe file is deleted
    if proc.returncode == 2:  # no O_DIRECT here: said plainly, no traceback
        assert "O_DIRECT" in proc.stderr and "Traceback" not in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    disks = json.loads(proc.stdout)["nvme"]
    measured = [d for d in disks if d["read_gb_s"] is not None]
    assert measured and measured[0]["write_gb_s"] > 0
