"""run.train.init_from: {hf: DIR}: a Hugging Face model (hf_config) starts from another folder's
safetensors weights (engine/hf_model.py `build`); weights that do not fit are refused, never
filled in at random."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsl.engine.errors import UserError
from tests.hf_tiny import write_model


def _save_weights(folder: Path, family: str, seed: int, **overrides) -> Path:
    import torch
    import transformers

    write_model(folder, family, **overrides)
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(folder))
    return folder


def _losses(tmp_path: Path, name: str, model: str, init: str = "") -> list[float]:
    from dsl.engine.train import main

    spec = tmp_path / f"{name}.yaml"
    spec.write_text(f"run:\n  train:\n    model: {model}\n    steps: 3\n    log_every: 1\n{init}"
                    f"    data: {{kind: synthetic}}\nengine: {{micro_batch: 2}}\noutput_dir: {tmp_path / name}\n")
    assert main([str(spec)]) == 0
    return [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_init_from_hf_trains_from_that_folders_weights(tmp_path: Path, monkeypatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    _save_weights(tmp_path / "pretrained", "llama", seed=7)
    write_model(tmp_path / "arch", "llama")  # the same architecture, no weights
    from_folder = _losses(tmp_path, "a", "{hf: pretrained, seq_len: 16}")
    from_init = _losses(tmp_path, "b", "{hf_config: arch/config.json, seq_len: 16}", "    init_from: {hf: pretrained}\n")
    random_init = _losses(tmp_path, "c", "{hf_config: arch/config.json, seq_len: 16}")
    assert from_init == from_folder
    assert from_init[0] != random_init[0]


def test_weights_that_do_not_fit_the_model_are_refused_with_the_keys(tmp_path: Path, monkeypatch) -> None:
    from dsl.engine.hf_model import build
    from dsl.engine.train_config import ModelConfig

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    _save_weights(tmp_path / "small", "llama", seed=0, num_hidden_layers=1)
    arch = write_model(tmp_path / "arch", "llama", num_hidden_layers=2)
    model = ModelConfig(hf_config=str(arch / "config.json"), seq_len=16)
    with pytest.raises(UserError, match=r"run.train.init_from.hf: the weights in .*small do not fit the model of "
                                        r".*missing keys: model.layers.1"):
        build(model, seed=0, weights_from=str(tmp_path / "small"))
    with pytest.raises(UserError, match=r"run.train.init_from.hf: no \*.safetensors weights in"):
        build(model, seed=0, weights_from=str(tmp_path / "arch"))


def test_init_from_needs_exactly_one_source_and_hf_needs_a_hugging_face_model(tmp_path: Path) -> None:
    from dsl.engine.train import load_run_spec

    spec = tmp_path / "spec.yaml"
    for init, message in (("{}", "give exactly one of deepspeed"),
                          ("{deepspeed: a, hf: b}", "got deepspeed, hf"),
                          ("{hf: b, optimizer: false}", "optimizer applies to init_from.deepspeed only")):
        spec.write_text(f"run:\n  train:\n    init_from: {init}\noutput_dir: {tmp_path / 'out'}\n")
        with pytest.raises(UserError, match=r"spec.yaml:\d+:\d+ run.train.*" + message):
            load_run_spec(spec)
    (tmp_path / "b").mkdir()
    spec.write_text(f"run:\n  train:\n    init_from: {{hf: b}}\noutput_dir: {tmp_path / 'out'}\n")
    with pytest.raises(UserError, match=r"init_from.hf loads Hugging Face weights: it needs run.train.model hf"):
        load_run_spec(spec)
