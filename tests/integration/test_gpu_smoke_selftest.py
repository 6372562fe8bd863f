"""tests/gpu/smoke.py (the GPU smoke checks) proves its own harness on this CPU machine.

- `--list` names every check the issue asks for, runs nothing and imports no torch;
- `--device cpu` runs every part-1 check end to end (gloo, GPUs hidden): summary.json and one
  JSON per check, every check passed or skipped with a reason, exit code 0;
- isolation: checks made to raise, abort (SIGABRT) and hang (killed at the timeout) fail alone,
  with the reason, while the check after them still passes; nothing is left running;
- part 2 under `torchrun --standalone --nproc_per_node 2 ... --multi --device cpu` (2 gloo ranks,
  each check in a torchrun of its own): every check passed.

Time here (2 cores): ~1.5-3 min for `--device cpu` (the compile check's first torch.compile is
~30 s of it), ~1 min for part 2, ~25 s for the isolation run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import processes_with

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "tests" / "gpu" / "smoke.py"
SINGLE = ["env", "triton_adam", "nvml_probe", "engine_fp32", "engine_bf16", "engine_fp16",
          "engine_low_precision_states", "offload", "activation_checkpointing", "tiled", "compile", "checkpoint",
          "memory_model", "onebit_adam", "quantize_gradients"]
MULTI = ["multi_engine_fp32", "multi_engine_bf16", "multi_engine_fp16", "multi_engine_low_precision_states",
         "multi_quantize_gradients", "multi_onebit_adam", "multi_sequence_parallel", "multi_user_group",
         "launch_visible_devices"]
STATUSES = {"pass", "fail", "skip"}


def _env(out: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DSL_SMOKE_INJECT")}
    return {**env, "DSL_SMOKE_OUT": str(out), "PYTHONUNBUFFERED": "1", **extra}


def _smoke(out: Path, *args: str, timeout: float, torchrun: bool = False, **env: str) -> subprocess.CompletedProcess:
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun \
        else [sys.executable]
    return subprocess.run([*prefix, str(SMOKE), *args], cwd=out.parent, env=_env(out, **env), capture_output=True,
                          text=True, timeout=timeout)


def _failures(folder: Path) -> str:
    """What failed, for an assertion message: each failing check's reason and cases."""
    lines = []
    for f in sorted(folder.glob("*.json")):
        data = json.loads(f.read_text())
        if data.get("status") == "fail":
            cases = [f"{c['name']}: {c.get('reason')}" for c in data.get("cases", []) if c["status"] == "fail"]
            lines.append(f"{data['name']}: {data['reason']} {cases} {data.get('error') or ''}")
    return "\n".join(lines)


def _check_folder(folder: Path, names: list[str]) -> dict:
    summary = json.loads((folder / "summary.json").read_text())
    assert [c["name"] for c in summary["checks"]] == names
    for name in names:
        data = json.loads((folder / f"{name}.json").read_text())
        assert data["name"] == name and data["status"] in STATUSES, data
        assert isinstance(data["duration_s"], float) and (folder / data["log"]).is_file()
        if data["status"] == "skip":
            assert data["reason"], data
        for case in data["cases"]:
            assert case["status"] in STATUSES and (case["status"] == "pass" or case.get("reason")), case
    counts = {s: sum(c["status"] == s for c in summary["checks"]) for s in STATUSES}
    assert summary["counts"] == counts
    return summary


def test_list_names_every_check_and_imports_no_torch() -> None:
    proc = subprocess.run([sys.executable, "-X", "importtime", str(SMOKE), "--list"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    listed = [line.split()[0] for line in proc.stdout.splitlines()]
    assert listed == SINGLE + MULTI
    assert all(len(line.split(None, 2)) == 3 for line in proc.stdout.splitlines())  # name, part, description
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert not [m for m in imported if re.match(r"torch(\.|$)", m)], "--list imported torch"


def test_unknown_check_is_a_usage_error(tmp_path: Path) -> None:
    proc = _smoke(tmp_path / "out", "--only", "engine_fp23", "--device", "cpu", timeout=60)
    assert proc.returncode == 2
    assert "did you mean 'engine_fp32'" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_device_cpu_runs_every_check_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = _smoke(out, "--device", "cpu", timeout=540)
    summary = _check_folder(out, SINGLE)
    assert proc.returncode == (0 if summary["ok"] else 1)
    assert summary["ok"], _failures(out) + "\n" + proc.stdout
    assert summary["device"] == "cpu" and summary["part"] == "single"
    # One stdout line per check, then the total.
    lines = proc.stdout.strip().splitlines()
    assert [ln.split()[1] for ln in lines[:-1]] == SINGLE
    assert lines[-1].startswith(f"{summary['counts']['pass']} passed, 0 failed")
    engine = json.loads((out / "engine_fp32.json").read_text())
    assert engine["details"]["process_group"]["backend"] == "gloo"
    assert [c["name"] for c in engine["cases"]] == ["stage0", "stage1", "stage2", "stage3", "stage0-tf32"]
    assert all(c["max_abs_diff"] <= c["tol"] for c in engine["cases"])


def test_a_check_that_raises_aborts_or_hangs_fails_alone(tmp_path: Path) -> None:
    out = tmp_path / "results"
    names = ["env", "nvml_probe", "onebit_adam", "quantize_gradients"]  # the order they run in
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = _smoke(out, "--device", "cpu", "--only", ",".join(reversed(names)), "--timeout-s", "onebit_adam=10",
                  timeout=420, DSL_SMOKE_INJECT="env=raise,nvml_probe=abort,onebit_adam=hang", TMPDIR=str(scratch))
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    summary = _check_folder(out, names)
    status = {c["name"]: c for c in summary["checks"]}
    assert status["env"]["status"] == "fail" and "deliberate failure" in status["env"]["reason"]
    assert json.loads((out / "env.json").read_text())["error"].startswith("Traceback")
    assert status["nvml_probe"]["status"] == "fail" and "SIGABRT" in status["nvml_probe"]["reason"]
    assert status["onebit_adam"]["status"] == "fail" and "timed out" in status["onebit_adam"]["reason"]
    # The check after the three failures runs in a clean process and passes.
    assert status["quantize_gradients"]["status"] == "pass", _failures(out)
    assert summary["counts"] == {"pass": 1, "fail": 3, "skip": 0}
    assert not processes_with(str(out)), "a check's process outlived the harness"
    assert not list(scratch.iterdir()), "a killed check's scratch folder was left behind"


def test_multi_part_under_torchrun_on_two_gloo_ranks(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = _smoke(out, "--multi", "--device", "cpu", timeout=420, torchrun=True)
    folder = out / "multi"
    summary = _check_folder(folder, MULTI)
    assert summary["ok"], _failures(folder) + "\n" + proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary["world_size"] == 2
    matrix = json.loads((folder / "multi_engine_fp32.json").read_text())
    assert [r["rank"] for r in matrix["ranks"]] == [0, 1]
    assert matrix["details"]["process_group"] == {"backend": "gloo", "world_size": 2, "device": "cpu"}
