"""`python -m dsl.engine.hf_export` (engine/hf_export.py): a trainer's checkpoint of a Hugging Face
model becomes a folder transformers loads; what it cannot export is refused with exit 2. (The
2-rank ZeRO-3 export against the engine's logits is tests/integration/test_hf_parity.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dsl.engine.hf_export import main as export_main
from dsl.engine.train import main as train_main
from tests.hf_tiny import write_model

pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def _train(tmp_path: Path, model: str) -> Path:
    """A run folder trained 3 steps with a checkpoint, holding the resolved.yaml dsl launch writes."""
    out = tmp_path / "run"
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"run:\n  train:\n    model: {model}\n    steps: 3\n    checkpoint_every: 3\n"
                    f"engine: {{zero_stage: 2, micro_batch: 2}}\noutput_dir: {out}\n")
    assert train_main([str(spec)]) == 0
    shutil.copyfile(spec, out / "resolved.yaml")
    return out


def test_the_export_of_a_trained_run_loads_with_the_trained_weights(tmp_path: Path, capsys) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from dsl.engine.checkpoint import load_full

    folder = write_model(tmp_path / "m", "qwen3")  # tied embedding: saved once
    run = _train(tmp_path, f"{{hf: {folder}, seq_len: 16}}")
    assert export_main([str(run / "checkpoints"), "--out", str(tmp_path / "hf")]) == 0  # config from resolved.yaml
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    model, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    saved = load_full(run / "checkpoints")["param"]
    for name, p in model.named_parameters():
        assert torch.equal(p, saved[f"lm.{name}"]), name
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_checkpoint_of_the_bundled_llama_is_refused(tmp_path: Path, capsys) -> None:
    run = _train(tmp_path, "{preset: tiny}")
    capsys.readouterr()
    assert export_main([str(run / "checkpoints"), "--out", str(tmp_path / "hf"), "--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not a Hugging Face model's parameter" in err and "Traceback" not in err


def test_without_a_config_and_a_resolved_spec_the_export_says_what_to_give(tmp_path: Path, capsys) -> None:
    folder = write_model(tmp_path / "m", "gpt2")
    run = _train(tmp_path, f"{{hf: {folder}, seq_len: 16}}")
    (run / "resolved.yaml").unlink()
    assert export_main([str(run / "checkpoints"), "--out", str(tmp_path / "hf")]) == 2
    assert "give it with --config" in capsys.readouterr().err


def test_dsl_export_is_the_command_users_run(tmp_path: Path) -> None:
    """`dsl export CHECKPOINT --format hf --out DIR`, as the README says; another format exits 2."""
    from tests.conftest import run_dsl

    folder = write_model(tmp_path / "m", "llama")
    run = _train(tmp_path, f"{{hf: {folder}, seq_len: 16}}")
    proc = run_dsl("export", str(run / "checkpoints"), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "hf" / "config.json").exists() and "wrote 1 weight file(s)" in proc.stderr
    bad = run_dsl("export", str(run / "checkpoints"), "--format", "gguf", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "writes hf" in bad.stderr and "Traceback" not in bad.stderr
