"""`dsl launch` writes the planner's per-rank prediction into plan.json, and the ranks report the
same figure next to their measured peaks (metrics.jsonl): the plan and the run agree on what
they compare (engine/peak.py, launcher/launch.py write_run_folder)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_dsl

pytestmark = pytest.mark.integration


def test_plan_json_carries_the_prediction_the_ranks_report(tmp_path):
    out = tmp_path / "out"
    spec = tmp_path / "job.yaml"
    spec.write_text("name: pred\nrun:\n  train: {model: {preset: tiny}, steps: 2, log_every: 1}\n"
                    "resources: {procs_per_node: 2}\n"
                    "engine: {zero_stage: 2, micro_batch: 2, grad_accum: 1, optimizer: {lr: 0.001}}\n"
                    f"output_dir: {out}\n")
    run_dsl("launch", str(spec), check=True, timeout=180)
    memory = json.loads((out / "plan.json").read_text())["memory"]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert memory["predicted_peak_bytes"] == row["predicted_peak_bytes"] > 0
    assert memory["predicted_peak_phase"] == row["predicted_peak_phase"]
    assert sum(memory["live"].values()) == memory["predicted_peak_bytes"]
