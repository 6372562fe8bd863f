"""One home for config validity (issue 13, deliverable 6): every invalid engine configuration is
refused by `dsl validate`, `dsl.engine.initialize()` and `dsl launch --dry-run` with the same
`engine.<field>: <message>` text; the two commands put `file:line:col` in front of it (the
field's line in the spec) and exit 2 without a traceback. Valid configurations pass all three.

Each configuration runs in one spec with one local rank (procs_per_node: 1, so `dsl validate`
knows the world size) and the tiny preset, and through initialize() in this process (one rank)
with the bundled Llama of the same preset. The commands run as real `dsl` processes, once per
configuration, before the cases compare their output."""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from dsl.engine.errors import UserError
from tests.conftest import run_dsl
from tests.unit.test_cli import NO_TORCH

NVME = "/tmp/dsl-validity-nvme"  # never created: every case using it is refused or only validated

# (id, engine section, the fields the message names: engine.<path> for each problem)
INVALID: list[tuple[str, dict[str, Any], list[str]]] = [
    ("cpu-offload-at-stage-0", {"zero_stage": 0, "offload": {"optimizer": "cpu"}}, ["offload.optimizer"]),
    ("nvme-offload-at-stage-0", {"offload": {"optimizer": "nvme", "nvme_path": NVME}}, ["offload.optimizer"]),
    ("nvme-without-path", {"zero_stage": 2, "offload": {"optimizer": "nvme"}}, ["offload.optimizer"]),
    ("param-offload-at-stage-2", {"zero_stage": 2, "offload": {"optimizer": "cpu", "params": "cpu"}},
     ["offload.params"]),
    ("param-offload-without-optimizer-offload", {"zero_stage": 3, "offload": {"params": "cpu"}}, ["offload.params"]),
    ("param-offload-nvme-without-path", {"zero_stage": 3, "offload": {"optimizer": "cpu", "params": "nvme"}},
     ["offload.params"]),
    ("param-offload-nvme-at-stage-1", {"zero_stage": 1, "offload": {"optimizer": "nvme", "params": "nvme",
                                                                    "nvme_path": NVME}}, ["offload.params"]),
    ("stage3-gather-at-stage-2", {"zero_stage": 2, "stage3": {"gather": "module"}}, ["stage3.gather"]),
    ("stage3-cap-at-stage-0", {"stage3": {"max_live_params": 1000}}, ["stage3.max_live_params"]),
    ("ratio-without-offload", {"zero_stage": 2, "offload": {"ratio": 0.5}}, ["offload.ratio"]),
    ("ratio-with-param-offload", {"zero_stage": 3, "offload": {"optimizer": "cpu", "params": "cpu", "ratio": 0.5}},
     ["offload.ratio"]),
    ("ratio-with-nvme", {"zero_stage": 2, "offload": {"optimizer": "nvme", "nvme_path": NVME, "ratio": 0.25}},
     ["offload.ratio"]),
    ("low-precision-states-in-fp32", {"low_precision_states": True}, ["low_precision_states"]),
    ("layout-with-fp32", {"precision_layout": "master"}, ["precision_layout"]),
    ("layout-with-low-precision-states",
     {"precision": "bf16", "low_precision_states": True, "precision_layout": "autocast"}, ["precision_layout"]),
    ("activation-offload-without-checkpointing", {"activation_offload": True}, ["activation_offload"]),
    ("onebit-adam-at-stage-2", {"zero_stage": 2, "optimizer": {"type": "onebit_adam"}}, ["optimizer"]),
    ("onebit-adam-in-fp16", {"precision": "fp16", "optimizer": {"type": "onebit_adam"}}, ["optimizer"]),
    ("onebit-adam-with-offload", {"zero_stage": "auto", "optimizer": {"type": "onebit_adam"},
                                  "offload": {"optimizer": "cpu"}}, ["offload.optimizer"]),
    ("quantized-gradients-at-stage-1", {"zero_stage": 1, "comm": {"quantize_gradients": True}}, ["comm"]),
    ("bf16-reduction-with-quantized-gradients",
     {"zero_stage": 2, "comm": {"quantize_gradients": True, "reduce_dtype": "bf16"}}, ["comm.reduce_dtype"]),
    ("train-batch-arithmetic", {"micro_batch": 4, "grad_accum": 2, "train_batch": 16}, ["train_batch"]),
    ("compile-with-tiled-mlp", {"compile": True, "tiled_mlp": {"enabled": True}}, ["compile"]),
    ("compile-with-activation-offload",
     {"compile": True, "activation_checkpointing": True, "activation_offload": True}, ["compile"]),
    ("sp-not-dividing-heads", {"sequence_parallel": 3}, ["sequence_parallel"]),
    ("sp-not-dividing-ranks", {"sequence_parallel": 2}, ["sequence_parallel"]),
    ("sp-zero", {"sequence_parallel": 0}, ["sequence_parallel"]),
    ("two-rules-at-once", {"zero_stage": 0, "offload": {"optimizer": "cpu"}, "activation_offload": True},
     ["offload.optimizer", "activation_offload"]),
    ("micro-batch-zero", {"micro_batch": 0}, ["micro_batch"]),
    ("unknown-field", {"bucket_mb": 4}, ["bucket_mb"]),
    ("choice-typo", {"zero_stage": 2, "offload": {"optimizer": "cpuu"}}, ["offload.optimizer"]),
]

VALID: list[tuple[str, dict[str, Any]]] = [
    ("defaults", {}),
    ("cpu-offload-at-stage-2", {"zero_stage": 2, "offload": {"optimizer": "cpu"}}),
    ("partial-offload", {"zero_stage": 1, "offload": {"optimizer": "cpu", "ratio": 0.5}}),
    ("param-offload", {"zero_stage": 3, "precision": "bf16", "offload": {"optimizer": "cpu", "params": "cpu"}}),
    ("train-batch", {"micro_batch": 4, "grad_accum": 2, "train_batch": 8}),
    ("quantized-gradients-at-stage-2", {"zero_stage": 2, "comm": {"quantize_gradients": True}}),
    ("onebit-adam-at-stage-0", {"optimizer": {"type": "onebit_adam"}}),
]

LOCATED = re.compile(r"^(?P<file>\S+\.yaml):(?P<line>\d+):(?P<col>\d+) (?P<text>engine\..*)$")


def _spec_text(engine: dict[str, Any], out: Path) -> str:
    spec = {"name": "validity", "run": {"train": {"model": {"preset": "tiny"}, "steps": 2}},
            "resources": {"procs_per_node": 1}, "engine": engine, "output_dir": str(out)}
    return yaml.safe_dump(spec, sort_keys=False, default_flow_style=False)


def _error_lines(stderr: str) -> list[str]:
    """The message lines of `dsl: error: ...` (one problem each)."""
    text = stderr.split("dsl: error:", 1)[1] if "dsl: error:" in stderr else ""
    return [line.strip() for line in text.strip().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> dict[str, dict[str, subprocess.CompletedProcess]]:
    """{case id: {"validate": proc, "launch": proc}}: each spec through both commands, as a user
    runs them (two at a time: the machine has two cores)."""
    root = tmp_path_factory.mktemp("validity")
    specs = {}
    for case_id, engine, *_ in INVALID + VALID:
        path = root / f"{case_id}.yaml"
        path.write_text(_spec_text(engine, root / "runs" / case_id))
        specs[case_id] = path
    jobs = [(case_id, command, path) for case_id, path in specs.items() for command in ("validate", "launch")]

    def run(job):
        case_id, command, path = job
        args = ("validate", str(path)) if command == "validate" else ("launch", str(path), "--dry-run")
        return case_id, command, run_dsl(*args, cwd=root)

    out: dict[str, dict[str, subprocess.CompletedProcess]] = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        for case_id, command, proc in pool.map(run, jobs):
            out.setdefault(case_id, {})[command] = proc
    assert not (root / "runs").exists()  # a dry run writes nothing
    return out


def _initialize(engine: dict[str, Any]):
    import dsl.engine
    from dsl.engine.model import Llama
    from dsl.engine.train_config import ModelConfig

    return dsl.engine.initialize(Llama(ModelConfig(preset="tiny")), engine)


def _field_line(spec: str, path: list[str]) -> set[int]:
    """The 1-based lines of `spec` (block-style YAML, 2-space indent) where the field `engine.<path>`
    is written: its key's line, and the next one when its value is a block mapping; the nearest
    written parent when the field is not written."""
    lines = spec.splitlines()
    at, depth, found = lines.index("engine:"), 1, lines.index("engine:")
    for key in path:
        prefix = "  " * depth + f"{key}:"
        nxt = next((i for i in range(at + 1, len(lines)) if lines[i].startswith(prefix)), None)
        if nxt is None:
            break
        at, depth, found = nxt, depth + 1, nxt
    return {found + 1, found + 2}


@pytest.mark.parametrize(("case_id", "engine", "fields"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_config_is_refused_with_the_same_message_by_all_three(cli, case_id, engine, fields):
    with pytest.raises(UserError) as info:
        _initialize(engine)
    from_initialize = str(info.value).splitlines()
    assert [line.split(":", 1)[0] for line in from_initialize] == [f"engine.{f}" for f in fields], from_initialize

    spec = _spec_text(engine, Path("x"))
    for command in ("validate", "launch"):
        proc = cli[case_id][command]
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
        lines = _error_lines(proc.stderr)
        located = [LOCATED.match(line) for line in lines]
        assert all(located), (command, lines)
        assert all(m["file"].endswith(f"{case_id}.yaml") for m in located)
        # The same words after the location, from each entry point.
        assert sorted(m["text"] for m in located) == sorted(from_initialize), command
        for m in located:  # the location is the field's line in the spec
            field = m["text"].split(":", 1)[0].removeprefix("engine.").split(".")
            assert int(m["line"]) in _field_line(spec, field), (command, m.group(0), spec)


@pytest.mark.parametrize(("case_id", "engine"), VALID, ids=[c[0] for c in VALID])
def test_valid_config_passes_all_three(cli, case_id, engine):
    from dsl.engine.validity import problems

    assert problems(_validated(engine), world_size=1, ranks_per_host=1) == []
    validate, launch = cli[case_id]["validate"], cli[case_id]["launch"]
    assert validate.returncode == 0 and validate.stdout.strip().endswith(": ok"), validate.stderr
    assert launch.returncode == 0 and "-m dsl.engine.train" in launch.stdout, launch.stderr
    _initialize(engine).close()


def _validated(engine: dict[str, Any]):
    from dsl.engine.config import EngineConfig

    return EngineConfig.model_validate(engine)


def test_the_rules_need_no_torch(write, tmp_path):
    """validate and launch refuse an invalid engine on a login node: torch is never imported."""
    spec = write("job.yaml", _spec_text({"zero_stage": 0, "offload": {"optimizer": "cpu"}}, tmp_path / "out"))
    for args in (["validate", str(spec)], ["launch", str(spec), "--dry-run"]):
        proc = subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, timeout=60)
        assert proc.stderr.strip().splitlines()[-1] == "NO_TORCH 2", proc.stderr


def test_launch_checks_the_world_its_hosts_give(write, tmp_path):
    """With procs_per_node auto `dsl validate` cannot know the ranks (it says ok); `dsl launch`
    counts them from the recorded machine and refuses with the rule's words."""
    engine = "engine: {precision: bf16, micro_batch: 1, grad_accum: 1, train_batch: 4}"
    spec = write("job.yaml", f"name: t\nrun: {{train: {{model: {{preset: tiny}}}}}}\n"
                             f"resources: {{topology: h100-sxm-8x}}\n{engine}\n")
    assert run_dsl("validate", str(spec)).returncode == 0
    proc = run_dsl("launch", str(spec), "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2
    col = engine.index("train_batch: 4") + len("train_batch: ") + 1
    assert f"{spec}:4:{col} engine.train_batch: train_batch (4) != micro_batch (1) x grad_accum (1) x " \
           "data-parallel size (8) = 8" in proc.stderr, proc.stderr


def test_fields_the_planner_fills_need_only_a_split_to_exist(write):
    """micro_batch left out: the planner picks it at launch, so validate asks only that
    train_batch be a multiple of grad_accum x dp."""
    text = "name: t\nrun: {train: {}}\nresources: {procs_per_node: 2}\nengine: {grad_accum: 2, train_batch: %d}\n"
    assert run_dsl("validate", str(write("ok.yaml", text % 8))).returncode == 0
    proc = run_dsl("validate", str(write("bad.yaml", text % 6)))
    assert proc.returncode == 2
    assert "engine.train_batch: train_batch (6) must be a multiple of grad_accum (2) x data-parallel size (2) = 4, " \
           "so that micro_batch is a whole number" in proc.stderr


def test_the_rank_prints_the_located_message_of_validate(write, tmp_path):
    """A rank re-validates its spec before torch: the same located line as `dsl validate`."""
    from dsl.engine.train import load_run_spec

    spec = write("job.yaml", _spec_text({"zero_stage": 0, "offload": {"optimizer": "cpu"}}, tmp_path / "out"))
    validate = run_dsl("validate", str(spec))
    with pytest.raises(UserError) as info:
        load_run_spec(spec, 1, 1)
    assert _error_lines(validate.stderr) == [str(info.value)]


def test_an_sp_group_that_would_split_a_host_unevenly_is_refused_by_validate_plan_and_launch(write, tmp_path):
    """Slurm, 3 nodes x 4 ranks: sp 6 would put a group over one host and half of another, which
    validate refuses as plan and launch do; sp 8 over 2 whole hosts of 2 ranks is accepted."""
    spec = write("job.yaml", "name: t\nrun: {train: {model: {vocab_size: 64, hidden_size: 48, num_hidden_layers: 1, "
                             "num_attention_heads: 12, seq_len: 48}}}\n"
                             "resources: {backend: slurm, nodes: 3, procs_per_node: 4, topology: cpu-only}\n"
                             "engine: {sequence_parallel: 6}\n")
    want = (f"{spec}:4:29 engine.sequence_parallel: sequence_parallel (6) and the ranks of one host (4) must divide "
            "one another: an SP group is part of one host or whole hosts")
    for args in (["validate", str(spec)], ["plan", str(spec)], ["launch", str(spec), "--dry-run"]):
        proc = run_dsl(*args, cwd=tmp_path)
        assert proc.returncode == 2 and _error_lines(proc.stderr) == [want], (args, proc.stderr)
