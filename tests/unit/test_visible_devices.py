"""CUDA_VISIBLE_DEVICES of the shell that runs `dsl launch`: a local run without a hostfile runs on
exactly those devices (indices, GPU UUIDs and MIG ids passed through verbatim), as DeepSpeed reads
it as `--include localhost:<entries>`; a hostfile's slots win over it, with a log line.

The GPUs are faked as the other tests fake them: a recorded topology (`resources.topology`), or a
pynvml stand-in (topology/replay.py) put first on the PYTHONPATH of the `dsl` subprocess.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from dsl.topology.probe import FIXTURES
from tests.conftest import run_dsl

FAKE_PYNVML = '''"""pynvml answering from the NVML part of the recording at $DSL_FAKE_NVML (dsl.topology.replay)."""
import json
import os

from dsl.topology.replay import ReplayNvml

_fake = ReplayNvml(json.load(open(os.environ["DSL_FAKE_NVML"]))["nvml"])


def __getattr__(name):
    return getattr(_fake, name)
'''


def two_gpu_recording() -> dict:
    """A host with two A100s (the shipped 4-GPU machine cut down to GPUs 0 and 1)."""
    data = copy.deepcopy(json.loads((FIXTURES / "a100-pcie-4x-nvlink-pairs.json").read_text()))
    nvml = data["nvml"]
    nvml["nvmlDeviceGetCount"] = 2
    nvml["devices"] = nvml["devices"][:2]
    nvml["pairs"] = {"0,1": nvml["pairs"]["0,1"]}
    data["name"] = "two-a100"
    return data


TWO_GPUS = two_gpu_recording()
UUIDS = [d["nvmlDeviceGetUUID"] for d in TWO_GPUS["nvml"]["devices"]]
MIG = "MIG-4f1a2b3c-5d6e-5f70-8192-a3b4c5d6e7f8"
MIG_LEGACY = f"MIG-{UUIDS[1]}/1/0"


@pytest.fixture(autouse=True)
def _no_visible_devices_here(monkeypatch):
    """The `dsl` subprocesses get CUDA_VISIBLE_DEVICES only where a test sets it."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def fake_host(folder: Path, kind: str, data: dict | None = None) -> tuple[Path, dict, dict]:
    """(folder with s.py, the spec's `resources` fields, env) of a faked host (the 2-GPU one
    unless `data` is another recording): a recorded topology, or NVML itself answering from it."""
    (folder / "s.py").write_text("print('hi')\n")
    recording = folder / "two-a100.json"
    recording.write_text(json.dumps(data or TWO_GPUS))
    if kind == "topology":
        return folder, {"topology": "two-a100.json"}, {}
    (folder / "fakenvml").mkdir()
    (folder / "fakenvml" / "pynvml.py").write_text(FAKE_PYNVML)
    path = os.pathsep.join(p for p in (str(folder / "fakenvml"), os.environ.get("PYTHONPATH")) if p)
    return folder, {}, {"PYTHONPATH": path, "DSL_FAKE_NVML": str(recording)}


@pytest.fixture(params=["topology", "nvml"])
def host(request, tmp_path):
    return fake_host(tmp_path, request.param)


def _dry_run(folder: Path, resources: dict, env: dict, visible: str | None, *extra: str):
    """`CUDA_VISIBLE_DEVICES=visible dsl launch spec.yaml --dry-run` (visible None: unset). The
    spec's line 4 is resources.procs_per_node."""
    fields = {"procs_per_node": "auto", **resources}
    spec = folder / "spec.yaml"
    spec.write_text("name: t\nrun: {script: s.py}\nresources:\n"
                    + "".join(f"  {key}: {value}\n" for key, value in fields.items()))
    env = {**env, "COLUMNS": "400"}  # rich wraps log lines at the terminal width
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    return run_dsl("launch", str(spec), "--dry-run", *extra, env=env, cwd=folder)


@pytest.mark.parametrize("visible", ["4,5", f"{UUIDS[1]},{UUIDS[0]}"], ids=["indices", "gpu-uuids"])
def test_ranks_run_on_the_devices_of_the_callers_cuda_visible_devices(host, visible):
    folder, resources, env = host
    proc = _dry_run(folder, resources, env, visible)
    assert proc.returncode == 0, proc.stderr
    assert f"env NODE_RANK=0 CUDA_VISIBLE_DEVICES={visible} " in proc.stdout
    assert "--nproc-per-node=2" in proc.stdout
    assert f"slots [0, 1], devices {visible}" in proc.stdout
    assert f"2 rank(s) on CUDA_VISIBLE_DEVICES={visible} of this shell" in " ".join(proc.stderr.split())
    plan = json.loads(_dry_run(folder, resources, env, visible, "--json").stdout)
    (launch,) = plan["hosts"]
    assert launch["env"]["CUDA_VISIBLE_DEVICES"] == visible
    assert launch["devices"] == visible.split(",") and launch["slots"] == [0, 1]
    assert plan["world_size"] == 2


@pytest.mark.parametrize("visible", [MIG, MIG_LEGACY], ids=["mig-uuid", "mig-gpu-gi-ci"])
def test_a_mig_id_passes_through_verbatim(host, visible):
    folder, resources, env = host
    proc = _dry_run(folder, resources, env, visible)
    assert proc.returncode == 0, proc.stderr
    assert f"CUDA_VISIBLE_DEVICES={visible} " in proc.stdout and "--nproc-per-node=1" in proc.stdout


def test_several_mig_ids_give_one_rank_with_a_reason(host):
    # CUDA shows a process one MIG instance, and all ranks of a host share CUDA_VISIBLE_DEVICES:
    # a second rank would find no device. auto runs one rank and says why.
    folder, resources, env = host
    proc = _dry_run(folder, resources, env, f"{MIG},{MIG_LEGACY}")
    assert proc.returncode == 0, proc.stderr
    assert f"CUDA_VISIBLE_DEVICES={MIG} " in proc.stdout and "--nproc-per-node=1" in proc.stdout
    assert "CUDA shows a process only one MIG instance" in " ".join(proc.stderr.split())
    # Asked for explicitly, two ranks on MIG instances are refused before anything starts.
    proc = _dry_run(folder, {**resources, "procs_per_node": 2}, env, f"{MIG},{MIG_LEGACY}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "resources.procs_per_node: procs_per_node is 2 on devices" in proc.stderr
    assert "set procs_per_node to 1" in proc.stderr


@pytest.mark.parametrize("kind", ["topology", "nvml"])
def test_a_host_in_mig_mode_runs_one_rank_on_its_first_mig_instance(tmp_path, kind):
    # GPU 0 of the two in MIG mode with two instances: CUDA shows three devices, the first two
    # MIG instances, which one process cannot both use.
    mig = copy.deepcopy(TWO_GPUS)
    gpu = mig["nvml"]["devices"][0]
    gpu.update({"nvmlDeviceGetMigMode": [1, 1], "nvmlDeviceGetMaxMigDeviceCount": 2, "migs": [
        {"nvmlDeviceGetMigDeviceHandleByIndex": None, "nvmlDeviceGetName": "NVIDIA A100 80GB PCIe MIG 3g.40gb",
         "nvmlDeviceGetUUID": uuid, "nvmlDeviceGetMemoryInfo": {"total": 40 << 30, "free": 40 << 30, "used": 0},
         "nvmlDeviceGetGpuInstanceId": gi, "nvmlDeviceGetComputeInstanceId": 0}
        for gi, uuid in ((1, MIG), (2, MIG.replace("4f1a", "5e2b")))]})
    folder, resources, env = fake_host(tmp_path, kind, mig)
    proc = _dry_run(folder, resources, env, None)
    assert proc.returncode == 0, proc.stderr
    assert f"CUDA_VISIBLE_DEVICES={MIG} " in proc.stdout and "--nproc-per-node=1" in proc.stdout
    assert "CUDA shows a process only one MIG instance" in " ".join(proc.stderr.split())
    if kind == "nvml":  # (an explicit procs_per_node asks this host, not the recorded topology)
        proc = _dry_run(folder, {**resources, "procs_per_node": 2}, env, None)
        assert proc.returncode == 2 and "resources.procs_per_node: procs_per_node is 2 on devices" in proc.stderr


def test_procs_per_node_beyond_the_visible_devices_is_a_located_error(host):
    folder, resources, env = host
    proc = _dry_run(folder, {**resources, "procs_per_node": 3}, env, "4,5")
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    message = " ".join(proc.stderr.split())
    assert f"{folder / 'spec.yaml'}:4:" in message
    assert ("resources.procs_per_node: procs_per_node is 3, but CUDA_VISIBLE_DEVICES=4,5 (the environment "
            "of dsl launch) lists 2 device(s); set procs_per_node to 2 or fewer") in message


def test_procs_per_node_below_the_visible_devices_takes_the_first(host):
    folder, resources, env = host
    proc = _dry_run(folder, {**resources, "procs_per_node": 1}, env, f"{UUIDS[1]},{UUIDS[0]}")
    assert proc.returncode == 0, proc.stderr
    assert f"CUDA_VISIBLE_DEVICES={UUIDS[1]} " in proc.stdout and "--nproc-per-node=1" in proc.stdout


def test_without_cuda_visible_devices_the_host_decides(host):
    folder, resources, env = host
    proc = _dry_run(folder, resources, env, None)
    assert proc.returncode == 0, proc.stderr
    assert "CUDA_VISIBLE_DEVICES=0,1 " in proc.stdout and "--nproc-per-node=2" in proc.stdout


@pytest.mark.parametrize("visible", ["", "-1"], ids=["empty", "minus-one"])
def test_cuda_visible_devices_hiding_every_gpu_gives_one_cpu_rank(tmp_path, visible):
    folder, resources, env = fake_host(tmp_path, "nvml")
    proc = _dry_run(folder, resources, env, visible)
    assert proc.returncode == 0, proc.stderr
    assert "CUDA_VISIBLE_DEVICES" not in proc.stdout and "--nproc-per-node=1" in proc.stdout
    assert "hides every GPU" in proc.stderr


def test_hostfile_slots_win_and_the_log_says_so(tmp_path):
    (tmp_path / "s.py").write_text("")
    (tmp_path / "hf").write_text("localhost slots=4\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: t\nrun: {script: s.py}\nresources: {hostfile: hf, include: 'localhost:1,3'}\n")
    proc = run_dsl("launch", str(spec), "--dry-run", cwd=tmp_path,
                   env={"CUDA_VISIBLE_DEVICES": "GPU-aaaa,GPU-bbbb", "COLUMNS": "400"})
    assert proc.returncode == 0, proc.stderr
    assert "CUDA_VISIBLE_DEVICES=1,3 " in proc.stdout and "slots [1, 3]\n" in proc.stdout
    message = " ".join(proc.stderr.split())
    assert "CUDA_VISIBLE_DEVICES=GPU-aaaa,GPU-bbbb of this shell is ignored: the hostfile's slots" in message
    quiet = run_dsl("launch", str(spec), "--dry-run", cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": ""})
    assert "is ignored" not in quiet.stderr


def test_the_specs_own_cuda_visible_devices_wins_on_every_backend(tmp_path):
    (tmp_path / "s.py").write_text("")
    (tmp_path / "hf").write_text("a slots=2\nb slots=2\n")
    env_block = "env: {vars: {CUDA_VISIBLE_DEVICES: '6,7'}}\n"
    mpi = tmp_path / "mpi.yaml"
    mpi.write_text("name: t\nrun: {script: s.py}\nresources: {backend: mpi, hostfile: hf}\n" + env_block)
    plan = json.loads(run_dsl("launch", str(mpi), "--dry-run", "--json", cwd=tmp_path).stdout)
    # mpirank would replace it by the slots on each host: it is not asked to.
    assert "--visible-devices" not in plan["submit"]["argv"]
    assert "CUDA_VISIBLE_DEVICES" in plan["submit"]["argv"]  # -x CUDA_VISIBLE_DEVICES: sent as set
    local = tmp_path / "local.yaml"
    local.write_text("name: t\nrun: {script: s.py}\nresources: {procs_per_node: 2}\n" + env_block)
    plan = json.loads(run_dsl("launch", str(local), "--dry-run", "--json", cwd=tmp_path,
                              env={"CUDA_VISIBLE_DEVICES": "4,5"}).stdout)
    assert plan["hosts"][0]["env"]["CUDA_VISIBLE_DEVICES"] == "6,7" and plan["hosts"][0]["devices"] == []


def test_sbatch_script_is_the_same_with_cuda_visible_devices_set(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: j\nrun: {{train: {{steps: 5}}}}\nresources: {{nodes: 2, procs_per_node: 2}}\n"
                    f"output_dir: {tmp_path / 'out'}\n")
    plain = run_dsl("sbatch", str(spec), cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": ""})
    narrowed = run_dsl("sbatch", str(spec), cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": "4,5"})
    assert plain.returncode == 0 and plain.stdout == narrowed.stdout
    assert "CUDA_VISIBLE_DEVICES" not in narrowed.stdout  # Slurm binds the GPUs of the job


# The pieces ---------------------------------------------------------------------------------------


def test_visible_host_keeps_entries_verbatim():
    from dsl.engine.errors import UserError
    from dsl.launcher.hosts import Host, visible_host

    assert visible_host(("4", "5")) == [Host("localhost", (0, 1), ("4", "5"))]
    assert visible_host((UUIDS[0], MIG), 1) == [Host("localhost", (0,), (UUIDS[0],))]
    with pytest.raises(UserError, match=r"procs_per_node is 3, .* lists 2 device\(s\); set procs_per_node to 2"):
        visible_host(("4", "5"), 3)


def test_host_devices_default_to_the_slot_numbers():
    from dsl.launcher.hosts import Host, local_host

    assert Host("a", (1, 3)).devices == ("1", "3")
    assert local_host(2, devices=(MIG, "1", "2")) == [Host("localhost", (0, 1), (MIG, "1"))]
    assert local_host(3, devices=("0",))[0].devices == ("0", "1", "2")  # more ranks than GPUs: by slot
    with pytest.raises(ValueError):
        Host("a", (0, 1), ("4",))


def test_render_writes_host_devices(write):
    from dsl.launcher.hosts import Host
    from dsl.launcher.plan import RenderInputs
    from dsl.launcher.render import render
    from dsl.launcher.spec import load_spec

    spec = load_spec(write("s.yaml", "name: t\nrun: {module: m}\n"))
    inputs = RenderInputs(python="/py", cwd="/w", master_port=1, env_values={}, set_visible_devices=True)
    plan = render(spec, [Host("localhost", (0, 1), (UUIDS[0], MIG))], inputs)
    assert plan.hosts[0].env["CUDA_VISIBLE_DEVICES"] == f"{UUIDS[0]},{MIG}"
    assert plan.hosts[0].devices == (UUIDS[0], MIG)
    unpinned = render(spec, [Host("localhost", (0, 1), ("4", "5"))],
                      RenderInputs(python="/py", cwd="/w", master_port=1, env_values={}, set_visible_devices=False))
    assert "CUDA_VISIBLE_DEVICES" not in unpinned.hosts[0].env and unpinned.hosts[0].devices == ()


def test_mpirank_says_when_it_replaces_the_hosts_cuda_visible_devices():
    from dsl.launcher.host.mpirank import replaced_devices_note

    assert replaced_devices_note(None, "0,1") is None
    assert replaced_devices_note("0,1", "0,1") is None
    note = replaced_devices_note("GPU-aaaa", "0,1")
    assert note.startswith("dsl: CUDA_VISIBLE_DEVICES=GPU-aaaa of this host is replaced by 0,1")
