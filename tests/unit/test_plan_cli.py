"""`dsl plan` and `dsl launch` as a user meets them: the report, the JSON contract, exit codes,
refusals that say what would fit, and no torch on these paths."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_dsl
from tests.unit.test_cli import NO_TORCH

SEVEN_B = str(ROOT / "configs/plan-7b.yaml")
IMPOSSIBLE = str(ROOT / "configs/plan-70b-workstation.yaml")
CANDIDATE_KEYS = {"zero_stage", "offload", "sp", "micro_batch", "grad_accum", "activation_checkpointing",
                  "device_bytes", "host_bytes", "fits"}


@pytest.mark.parametrize("args", [
    ["plan", SEVEN_B, "--topology", "h100-sxm-8x"],
    ["plan", SEVEN_B, "--topology", "gh200-1x", "--json"],
    ["plan", IMPOSSIBLE],
    ["launch", IMPOSSIBLE],
    ["probe"],
], ids=lambda a: " ".join(a[:1] + a[2:]))
def test_plan_probe_and_refusal_never_import_torch(args):
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, timeout=60)
    assert proc.stderr.strip().splitlines()[-1].startswith("NO_TORCH"), proc.stderr


@pytest.mark.parametrize(("fixture", "expected"), [
    ("h100-sxm-8x", "offload none"),
    ("gh200-1x", "offload cpu"),
    ("l40s-8x-pcie", "activation_checkpointing true"),
])
def test_plan_report_on_recorded_machines(fixture: str, expected: str):
    proc = run_dsl("plan", SEVEN_B, "--topology", fixture)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    choice = next(line for line in out.splitlines() if line.startswith("choice:"))
    assert expected in choice
    assert "why:" in out and "• fits:" in out and "dominated by" in out
    assert "memory per device:" in out and "parameters" in out and "activations" in out and "█" in out
    assert "candidates (fitting first, fastest first)" in out
    assert f"fixture:{fixture}" in out
    assert "Traceback" not in proc.stderr


def test_plan_json_contract():
    proc = run_dsl("plan", SEVEN_B, "--topology", "l40s-8x-pcie", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert CANDIDATE_KEYS <= set(data["choice"])
    assert data["choice"]["fits"] is True
    assert len(data["candidates"]) > 10
    for cand in data["candidates"]:
        assert CANDIDATE_KEYS <= set(cand)
        assert cand["micro_batch"] * cand["grad_accum"] * cand["dp"] == data["target_batch"]
    names = [t["name"] for t in data["choice"]["terms"]]
    assert names[:4] == ["parameters", "gradients", "master weights", "optimizer states"]
    assert data["launch"]["world_size"] == 8  # the dry run of the same spec
    assert data["hardware"]["ranks_per_host"] == 8 and data["deepspeed"]["function"].startswith("estimate_zero")


def test_plan_shows_the_commands_launch_would_run(write):
    spec = write("tiny.yaml", """\
name: tiny-plan
run: {train: {model: {preset: tiny}, steps: 5}}
resources: {procs_per_node: 2}
engine: {zero_stage: auto, activation_checkpointing: auto}
""")
    proc = run_dsl("plan", str(spec))
    assert proc.returncode == 0, proc.stderr
    assert "commands (what dsl launch runs; dsl launch --dry-run):" in proc.stdout
    assert "-m dsl.launcher.host.elastic" in proc.stdout and "--nproc-per-node=2" in proc.stdout
    assert "(probe)" in proc.stdout  # this host, probed


def test_impossible_job_is_refused_by_launch_with_what_would_fit(tmp_path):
    proc = run_dsl("launch", IMPOSSIBLE, cwd=tmp_path)
    assert proc.returncode == 2
    err = proc.stderr
    assert "does not fit on 1 x GeForce RTX 4090 (24.0 GiB), 63.0 GiB host RAM" in err
    # Under CPU offload the device keeps only 16-bit parameters (engine/zero/base.py host_states),
    # so host RAM alone is what this machine lacks.
    assert "what would fit:" in err and "more host RAM:" in err
    assert "Traceback" not in err and proc.stdout == ""
    assert not (tmp_path / "runs").exists()  # refused before anything was written or started


def test_plan_of_impossible_job_exits_1_and_explains():
    proc = run_dsl("plan", IMPOSSIBLE)
    assert proc.returncode == 1
    assert "nothing fits." in proc.stdout and "what would fit:" in proc.stdout


def test_plan_of_a_script_spec_is_a_user_error(write):
    spec = write("s.yaml", "name: s\nrun: {script: s.py}\n")
    write("s.py", "")
    proc = run_dsl("plan", str(spec))
    assert proc.returncode == 2 and "dsl plan needs run.train" in proc.stderr


def test_plan_with_unknown_topology_lists_fixtures():
    proc = run_dsl("plan", SEVEN_B, "--topology", "dgx-z")
    assert proc.returncode == 2
    assert "--topology: topology 'dgx-z': no such fixture or file; fixtures: a100-pcie-4x-nvlink-pairs" in proc.stderr
