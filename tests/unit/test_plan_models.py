"""`dsl plan` for a user's real model (issue 15): a Hugging Face config (`hf: DIR`,
`hf_config: FILE`) or bare counts (`params`, `largest_layer_params`) in run.train.model, the
published estimators next to every candidate, located errors, and `dsl launch` refusing to train
what the engine cannot build yet."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsl.engine import memory_reference
from dsl.engine.modeldesc import describe_file
from tests.conftest import ROOT, run_dsl
from tests.unit.test_cli import NO_TORCH

FIXTURES = ROOT / "tests/fixtures/hf_configs"

SPEC = """name: {name}
run:
  train:
    model:
{model}
resources:
  backend: local
  procs_per_node: auto
  topology: {topology}
engine:
  precision: bf16
  train_batch: 64
  zero_stage: auto
  offload: {{optimizer: auto}}
  sequence_parallel: auto
  activation_checkpointing: auto
"""


def write_spec(tmp_path: Path, model: str, topology: str = "h100-sxm-8x", name: str = "job") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(SPEC.format(name=name, model="\n".join("      " + line for line in model.splitlines()),
                                topology=topology))
    return path


def plan_json(spec: Path) -> dict:
    proc = run_dsl("plan", str(spec), "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_plan_of_a_moe_hf_config_counts_it_exactly_and_references_every_candidate(tmp_path: Path):
    config = FIXTURES / "qwen3-30b-a3b.json"
    shutil.copy(config, tmp_path / "qwen.json")
    spec = write_spec(tmp_path, "hf_config: qwen.json\nseq_len: 4096")  # relative to the spec's folder
    data = plan_json(spec)
    expected = describe_file(config, "test")
    assert data["model"]["params"] == expected.params == 30_532_122_624
    assert data["model"]["experts"] == 128 and data["model"]["per_head"] == 128 and data["model"]["seq_len"] == 4096
    assert any("qwen3_moe" in note and "128 experts with 8 per token" in note for note in data["notes"])
    assert data["candidates"] and all(set(c["references"]) == {"deepspeed", "zero_paper", "accelerate"}
                                      for c in data["candidates"])
    for c in data["candidates"]:
        ds = c["references"]["deepspeed"]
        if c["zero_stage"] == 0:
            assert ds is None
            continue
        assert ds["gpu_bytes"] == memory_reference.deepspeed_estimate(
            expected.params, expected.largest_layer_params, c["zero_stage"], gpus_per_node=8,
            offload_optimizer=c["offload"] != "none", offload_params=c["offload_params"] != "none")["gpu_bytes"]


def test_hf_folder_reads_its_config_json_and_plans_at_its_longest_sequence(tmp_path: Path):
    model = tmp_path / "models" / "mixtral"
    model.mkdir(parents=True)
    shutil.copy(FIXTURES / "mixtral-8x7b-v0.1.json", model / "config.json")
    data = plan_json(write_spec(tmp_path, "hf: models/mixtral"))
    assert data["model"]["params"] == 46_702_792_704
    assert data["model"]["seq_len"] == 32768  # its max_position_embeddings, said in a note
    assert any("seq_len not set" in note and "32768" in note for note in data["notes"])


def test_counts_alone_give_deepspeeds_figures_and_say_model_states_only(tmp_path: Path):
    """Issue 15's acceptance: only params and largest_layer_params -> DeepSpeed's estimator
    figures exactly, and a verdict labelled as covering model states only."""
    spec = write_spec(tmp_path, "params: 2851000000\nlargest_layer_params: 32000000", topology="h100-sxm-8x")
    data = plan_json(spec)
    assert data["model"]["params"] == 2_851_000_000
    assert any("covers model states only" in note for note in data["notes"])
    zero3 = [c for c in data["candidates"] if c["zero_stage"] == 3 and c["offload"] == "none"]
    assert zero3
    ds = zero3[0]["references"]["deepspeed"]
    # DeepSpeed's docs (memory.rst) print 6.09 GB per GPU and 1.43 GB CPU for this model on 8 GPUs
    assert ds["gpu_bytes"] / 2**30 == pytest.approx(6.09, rel=5e-3)
    assert ds["cpu_bytes"] / 2**30 == pytest.approx(1.43, rel=5e-3)
    assert ds["flags"]["zero_init"] is True and ds["flags"]["additional_buffer_factor"] == 1.5
    # The terms the counts cannot give are reported as unknown, not as 0 bytes that fit.
    terms = {t["name"]: t for t in zero3[0]["terms"]}
    for name in ("activations", "logits", "recomputation peak", "autocast weight copies"):
        assert terms[name]["device_bytes"] == 0 and terms[name]["formula"].startswith("unknown"), name
    text = run_dsl("plan", str(spec)).stdout
    assert "covers model states only" in text and "ZeRO paper" in text and "accelerate estimate-memory" in text


@pytest.mark.parametrize("model", ["hf_config: gpt2.json", "params: 7000000000\nlargest_layer_params: 400000000"])
def test_plan_of_these_forms_never_imports_torch(tmp_path: Path, model: str):
    shutil.copy(FIXTURES / "gpt2.json", tmp_path / "gpt2.json")
    spec = write_spec(tmp_path, model)
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, "plan", str(spec), "--json"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert proc.stderr.strip().splitlines()[-1] == "NO_TORCH 0", proc.stderr


def test_file_errors_are_located_in_the_spec(tmp_path: Path):
    spec = write_spec(tmp_path, "hf: no-such-model")
    proc = run_dsl("plan", str(spec))
    assert proc.returncode == 2
    assert f"{spec}:5:11 run.train.model.hf: no such file: {tmp_path / 'no-such-model' / 'config.json'}" \
        in proc.stderr
    (tmp_path / "bad.json").write_text('{"model_type": "llama",\n "hidden_size": }\n')
    proc = run_dsl("plan", str(write_spec(tmp_path, "hf_config: bad.json", name="bad")))
    assert proc.returncode == 2 and "run.train.model.hf_config" in proc.stderr
    assert "bad.json:2:17: not valid JSON" in proc.stderr
    (tmp_path / "mamba.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 768}))
    proc = run_dsl("plan", str(write_spec(tmp_path, "hf_config: mamba.json", name="mamba")))
    assert proc.returncode == 2 and "model_type 'mamba' is not a family dsl describes" in proc.stderr
    assert "qwen3_moe" in proc.stderr and "Traceback" not in proc.stderr


def test_forms_are_alternatives_located_by_validate(tmp_path: Path):
    spec = write_spec(tmp_path, "hf: m\nhidden_size: 64")
    proc = run_dsl("validate", str(spec))
    assert proc.returncode == 2 and "run.train.model" in proc.stderr
    assert "hidden_size describe the bundled Llama; with hf the model comes from config.json" in proc.stderr
    proc = run_dsl("validate", str(write_spec(tmp_path, "params: 1000", name="p")))
    assert proc.returncode == 2 and "params needs largest_layer_params" in proc.stderr


def test_launch_refuses_to_train_what_the_engine_cannot_build(tmp_path: Path):
    """A model known by its counts has no weights: launching it must not train the default Llama
    in its place (engine/validity.py model_problems). Hugging Face models train (engine/hf_model.py)."""
    spec = write_spec(tmp_path, "params: 7000000000\nlargest_layer_params: 400000000")
    proc = run_dsl("launch", str(spec), "--dry-run")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{spec}:5:15 run.train.model.params: a model known only by its counts has no weights to train; " \
           "dsl plan describes it" in proc.stderr


@pytest.mark.parametrize("fixture", ["roberta-base.json", "t5-small.json"])
def test_launch_refuses_an_encoder_or_encoder_decoder_that_plan_describes(tmp_path: Path, fixture: str):
    """The trainer builds causal LMs: a BERT-family encoder or a T5 is planned, and refused at
    launch with the spec's location instead of failing on every rank."""
    shutil.copy(FIXTURES / fixture, tmp_path / "m.json")
    spec = write_spec(tmp_path, "hf_config: m.json")
    assert run_dsl("plan", str(spec), "--json").returncode in (0, 1)
    proc = run_dsl("launch", str(spec), "--dry-run")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    kind = "encoder" if fixture.startswith("roberta") else "encoder-decoder"
    assert f"{spec}:5:18 run.train.model.hf_config: a Hugging Face {kind} is described by `dsl plan`, not " \
           "trained" in proc.stderr


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("plan-*.yaml")), ids=lambda p: p.stem)
def test_every_candidate_of_the_shipped_plans_has_references(config: Path):
    proc = run_dsl("plan", str(config), "--json")  # exit 1 when nothing fits: the JSON is still there
    assert proc.returncode in (0, 1), proc.stderr
    data = json.loads(proc.stdout)
    assert data["candidates"]
    for c in data["candidates"]:
        refs = c["references"]
        assert refs["zero_paper"]["stage"] == c["zero_stage"] and refs["accelerate"]["total_bytes"] > 0
        assert (refs["deepspeed"] is None) == (c["zero_stage"] == 0)
