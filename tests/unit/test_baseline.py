"""A host's measured process baseline: stored by `dsl probe --measure-baseline`, read back by
every probe, used as the CPU runtime term by `dsl plan` and by the ranks (topology/baseline.py,
engine/baseline.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from dsl.engine.config import EngineConfig
from dsl.engine.memory import CPU_RUNTIME_BYTES, MiB, RUNTIME, estimate
from dsl.engine.train_config import ModelConfig
from dsl.topology import baseline as baselib
from dsl.topology.model import HostTopology, ProcessBaseline
from tests.conftest import ROOT, run_dsl


def _baseline(**kw) -> ProcessBaseline:
    me = baselib.identity()
    return ProcessBaseline(**{"bytes": 300 * MiB, "checkpointing_bytes": 390 * MiB, "allocator": "jemalloc",
                              "python": me["python"], "torch": me["torch"], "dsl": me["dsl"],
                              "measured_at": "2026-12-06T12:00:00+00:00", **kw})


def test_a_stored_baseline_is_read_back_for_this_python_only(tmp_path: Path) -> None:
    env = {"DSL_CACHE_DIR": str(tmp_path)}
    found, why = baselib.load(env)
    assert found is None and "dsl probe --measure-baseline" in why
    other = _baseline(python="/opt/other/bin/python", bytes=1)
    baselib.save(other, env)
    assert baselib.load(env)[0] is None  # another interpreter's figure is not this one's
    mine = _baseline()
    path = baselib.save(mine, env)
    assert baselib.load(env) == (mine, "")
    assert set(json.loads(path.read_text())) == {other.python, mine.python}  # both kept


@pytest.mark.parametrize("field", ["torch", "dsl"])
def test_a_baseline_measured_under_another_version_is_not_used(tmp_path: Path, field: str) -> None:
    env = {"DSL_CACHE_DIR": str(tmp_path)}
    baselib.save(_baseline(**{field: "0.0.1"}), env)
    found, why = baselib.load(env)
    assert found is None
    assert f"{field} 0.0.1 -> " in why and "measure again" in why


def test_cache_folder_follows_xdg_and_home() -> None:
    assert baselib.cache_dir({"XDG_CACHE_HOME": "/x"}) == Path("/x/dsl")
    assert baselib.cache_dir({"HOME": "/h"}) == Path("/h/.cache/dsl")
    assert baselib.cache_dir({"DSL_CACHE_DIR": "/d", "HOME": "/h"}) == Path("/d")


def test_the_probe_reports_the_stored_baseline_and_why_there_is_none(tmp_path: Path, monkeypatch) -> None:
    from dsl.topology.probe import probe_local

    monkeypatch.setenv("DSL_CACHE_DIR", str(tmp_path))
    topo, recording = probe_local()
    assert topo.process_baseline is None and "measure-baseline" in topo.unknown["process_baseline"]
    baselib.save(_baseline(), {"DSL_CACHE_DIR": str(tmp_path)})
    topo, recording = probe_local()
    assert topo.process_baseline == _baseline() and "process_baseline" not in topo.unknown
    # through JSON (dsl probe --json, a remote probe's answer) and back
    assert HostTopology.from_json(json.loads(json.dumps(topo.to_json()))).process_baseline == _baseline()


def test_the_runtime_term_is_the_hosts_baseline_when_there_is_one() -> None:
    model, engine = ModelConfig(preset="bench"), EngineConfig(zero_stage=2, precision="fp32", micro_batch=4)
    ckpt = engine.model_copy(update={"activation_checkpointing": True})
    default = estimate(model, engine, dp=2, accelerator=False)
    assert default.term(RUNTIME).device_bytes == CPU_RUNTIME_BYTES
    assert "reference machine" in default.term(RUNTIME).formula
    measured = estimate(model, engine, dp=2, accelerator=False, baseline=_baseline())
    assert measured.term(RUNTIME).device_bytes == 300 * MiB
    assert "measured on this host 2026-12-06" in measured.term(RUNTIME).formula
    assert measured.device_bytes - default.device_bytes == 300 * MiB - CPU_RUNTIME_BYTES
    assert estimate(model, ckpt, dp=2, accelerator=False, baseline=_baseline()).term(RUNTIME).device_bytes == 390 * MiB
    # a GPU's runtime is the device's, not the host process's
    gpu = estimate(model, engine, dp=2, accelerator=True, baseline=_baseline())
    assert gpu.term(RUNTIME).device_bytes == estimate(model, engine, dp=2, accelerator=True).term(RUNTIME).device_bytes


def _cpu_topology(**changes) -> HostTopology:
    from dsl.topology.probe import probe_local

    return dataclasses.replace(probe_local()[0], accelerators=(), **changes)


def test_the_planner_plans_with_the_hosts_baseline_and_notes_its_absence() -> None:
    from dsl.launcher.hardware import hardware_of
    from dsl.launcher.planner import evaluate
    from dsl.engine.memory import ModelShape

    shape = ModelShape.of(ModelConfig(preset="bench"))
    engine = EngineConfig(zero_stage=2, precision="fp32", micro_batch=4)
    kw = dict(stage=2, offload="none", offload_params="none", sp=1, micro=4, accum=1, ckpt=False, target_batch=8)
    missing = hardware_of(_cpu_topology(process_baseline=None, unknown={"process_baseline": "not measured (x)"}),
                          ranks_per_host=2)
    assert any("process baseline not measured (x)" in n for n in missing.notes)
    measured = hardware_of(_cpu_topology(process_baseline=_baseline()), ranks_per_host=2)
    assert not any("process baseline" in n for n in measured.notes)
    a, b = evaluate(shape, engine, missing, **kw), evaluate(shape, engine, measured, **kw)
    assert b.breakdown.term(RUNTIME).device_bytes == 300 * MiB
    assert b.device_bytes - a.device_bytes == 300 * MiB - CPU_RUNTIME_BYTES


def test_the_planner_counts_glibc_where_auto_finds_no_jemalloc() -> None:
    from dsl.engine.memory import ALLOCATOR
    from dsl.launcher.hardware import hardware_of
    from dsl.launcher.planner import evaluate
    from dsl.engine.memory import ModelShape

    shape = ModelShape.of(ModelConfig(preset="bench"))
    engine = EngineConfig(zero_stage=2, precision="fp32", micro_batch=4)
    kw = dict(stage=2, offload="none", offload_params="none", sp=1, micro=4, accum=1, ckpt=False, target_batch=8)
    without = evaluate(shape, engine, hardware_of(_cpu_topology(jemalloc=""), ranks_per_host=2), **kw)
    with_lib = evaluate(shape, engine, hardware_of(_cpu_topology(jemalloc="/usr/lib/libjemalloc.so.2"),
                                                   ranks_per_host=2), **kw)
    assert with_lib.breakdown.term(ALLOCATOR).device_bytes > 0
    assert without.breakdown.term(ALLOCATOR).device_bytes == 0
    assert "not counted" in without.breakdown.term(ALLOCATOR).formula


def test_measure_baseline_runs_the_trainer_and_plans_and_ranks_use_it(tmp_path: Path) -> None:
    """The real measurement on this machine (~10 s: two short trainer runs), then `dsl plan`
    and a launched run on the same host plan with it."""
    env = {"DSL_CACHE_DIR": str(tmp_path / "cache")}
    proc = run_dsl("probe", "--measure-baseline", "--json", env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout)["process_baseline"]
    # what the project's machine measures: 161 MiB, 238 MiB with checkpointing (engine/baseline.py)
    assert 100 * MiB < found["bytes"] < 400 * MiB
    assert found["checkpointing_bytes"] > found["bytes"] + 30 * MiB
    assert found["allocator"] in ("jemalloc", "reuse")
    assert (tmp_path / "cache" / baselib.CACHE_NAME).is_file()
    plan = run_dsl("plan", str(ROOT / "configs" / "bench-cpu.yaml"), "--json", env=env, timeout=120)
    assert plan.returncode == 0, plan.stderr[-2000:]
    runtime = [t for t in json.loads(plan.stdout)["choice"]["terms"] if t["name"] == "runtime"][0]
    assert runtime["device_bytes"] == found["bytes"] and "measured on this host" in runtime["formula"]


def test_a_rank_predicts_its_peak_with_its_hosts_baseline(tmp_path: Path, write) -> None:
    """The ranks read the same stored figure: the prediction in metrics.jsonl and the summary
    carries it (a deliberately large one, so that it cannot be the default)."""
    import yaml

    cache = tmp_path / "cache"
    baselib.save(_baseline(bytes=500 * MiB), {"DSL_CACHE_DIR": str(cache)})
    out = tmp_path / "out"
    engine = {"zero_stage": 0, "precision": "fp32", "micro_batch": 2}
    spec = write("job.yaml", yaml.safe_dump({
        "name": "baseline", "run": {"train": {"model": {"preset": "tiny"}, "steps": 2, "log_every": 1}},
        "resources": {"backend": "local", "procs_per_node": 1}, "engine": engine, "output_dir": str(out)}))
    proc = run_dsl("launch", str(spec), env={"DSL_CACHE_DIR": str(cache)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    expected = estimate(ModelConfig(preset="tiny"), EngineConfig(**engine), dp=1, accelerator=False,
                        allocator=row["cpu_allocator"], baseline=_baseline(bytes=500 * MiB))
    assert row["predicted_peak_bytes"] == expected.device_bytes
    assert expected.term(RUNTIME).device_bytes == 500 * MiB


def test_a_measured_gpu_runtime_replaces_the_documented_figure() -> None:
    from dsl.engine.memory import GPU_RUNTIME_BYTES

    model, engine = ModelConfig(preset="bench"), EngineConfig(zero_stage=2, precision="bf16", micro_batch=4)
    documented = estimate(model, engine, dp=2, accelerator=True, baseline=_baseline())
    assert documented.term(RUNTIME).device_bytes == GPU_RUNTIME_BYTES
    assert "documented" in documented.term(RUNTIME).formula
    measured = estimate(model, engine, dp=2, accelerator=True, baseline=_baseline(cuda_runtime_bytes=700 * MiB))
    assert measured.term(RUNTIME).device_bytes == 700 * MiB and "NVML" in measured.term(RUNTIME).formula
    assert documented.device_bytes - measured.device_bytes == GPU_RUNTIME_BYTES - 700 * MiB


def test_without_a_gpu_the_cuda_child_reports_none() -> None:
    import subprocess
    import sys

    from dsl.engine.baseline import cuda_runtime

    assert cuda_runtime(sys.executable, {"CUDA_VISIBLE_DEVICES": ""}) is None
    out = subprocess.run([sys.executable, "-m", "dsl.engine.baseline", "--cuda-child"], capture_output=True,
                         text=True, env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""}, check=True)
    assert out.stdout.strip() == "null"


@pytest.mark.gpu
def test_the_cuda_runtime_is_measured_on_a_gpu() -> None:
    import subprocess
    import sys

    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    out = subprocess.run([sys.executable, "-m", "dsl.engine.baseline", "--cuda-child"], capture_output=True,
                         text=True, check=True, timeout=300)
    value = json.loads(out.stdout.strip().splitlines()[-1])
    # a CUDA context with cuBLAS and a one-rank NCCL communicator: hundreds of MiB, under 4 GiB
    assert 100 * MiB < value < 4 * 1024 * MiB


@pytest.mark.parametrize("setting", ["reuse", "system"])
def test_plan_says_a_glibc_allocators_holes_are_not_counted(tmp_path: Path, setting: str) -> None:
    """`cpu_allocator: reuse|system` on a CPU host: the table shows the retention row as not counted
    and the assumptions say how far above the plan the peak went (engine/memory_shape.py
    GLIBC_EXCESS); the default shows the retention it counts and no such note."""
    from tests.conftest import run_dsl

    spec = tmp_path / "job.yaml"
    text = (Path(__file__).resolve().parents[2] / "configs" / "bench-cpu.yaml").read_text()
    spec.write_text(text.replace("  zero_stage: 0\n", f"  zero_stage: 0\n  cpu_allocator: {setting}\n"))
    out = " ".join(run_dsl("plan", str(spec)).stdout.split())  # rich wraps long lines
    assert f"allocator retention ? not counted: {setting} (glibc keeping freed blocks)" in out
    assert "10-100% above the plan" in out
    assert (f"engine.cpu_allocator: {setting}: glibc's heap holes are not in this plan; they put each rank's peak "
            "resident set 10-100% above it") in out
    spec.write_text(text)
    default = " ".join(run_dsl("plan", str(spec)).stdout.split())
    assert "allocator retention" in default and "% of the live peak" in default and "heap holes" not in default
