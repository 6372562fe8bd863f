"""Activation checkpointing and its offload on any model (engine/long/blocks.py, engine/long/setup.py):
the repeated block list is found (or named by engine.checkpoint_module) and recomputed in backward,
which shrinks the bytes autograd saves and leaves the losses unchanged; a model with nothing to
recompute is a located error, never a silent no-op."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsl.engine.errors import UserError
from dsl.engine.train import main
from tests.hf_tiny import write_model

pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def _run(folder: Path, engine: dict, steps: int = 3) -> tuple[list[float], int, object]:
    """(losses, activation bytes saved by the last forward, the model) of `steps` one-process steps."""
    import torch

    from dsl.engine import hf_model, initialize
    from dsl.engine.train_config import ModelConfig

    model = hf_model.build(ModelConfig(hf=str(folder), seq_len=16), seed=0)
    engine = initialize(model, {"grad_clip": None, **engine})
    engine.state_summary()  # turns the saved-tensor accounting on
    tokens = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        loss = engine(tokens, (tokens * 7 + 3) % 128, positions=torch.arange(16))
        loss.backward()
        engine.step()
        engine.zero_grad()
        losses.append(loss.item())
    return losses, engine.state_summary()["activations_bytes"], model


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3_moe"])
@pytest.mark.parametrize("stage", [0, 3])
def test_checkpointing_an_hf_model_saves_fewer_bytes_and_changes_no_loss(tmp_path: Path, family: str,
                                                                        stage: int) -> None:
    folder = write_model(tmp_path / family, family)
    plain, plain_bytes, _ = _run(folder, {"zero_stage": stage})
    ckpt, ckpt_bytes, model = _run(folder, {"zero_stage": stage, "activation_checkpointing": True})
    assert model.activation_checkpointing
    assert ckpt == plain  # recomputation is exact: no dropout, same kernels
    # Only the 2 blocks' inputs ([4, 16, 32] fp32 = 8 KiB each) and what lies outside them stay.
    assert ckpt_bytes < plain_bytes / 4, (ckpt_bytes, plain_bytes)
    named, named_bytes, _ = _run(folder, {"zero_stage": stage, "activation_checkpointing": True,
                                          "checkpoint_module": type(model.lm.base_model.get_submodule(
                                              "h" if family == "gpt2" else "layers")[0]).__name__})
    assert (named, named_bytes) == (ckpt, ckpt_bytes)


def test_activation_offload_moves_the_blocks_inputs_to_host_memory(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "llama", "llama")
    ckpt, ckpt_bytes, _ = _run(folder, {"activation_checkpointing": True})
    offloaded, offloaded_bytes, model = _run(folder, {"activation_checkpointing": True, "activation_offload": True})
    assert offloaded == ckpt
    block_inputs = 2 * 4 * 16 * 32 * 4  # 2 blocks x [4, 16, 32] fp32
    assert model.activation_offload.offloaded_bytes == block_inputs
    assert ckpt_bytes - offloaded_bytes == block_inputs


def test_a_model_without_a_block_list_is_refused_not_silently_left_alone() -> None:
    import torch
    from torch import nn

    from dsl.engine import initialize

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(8, 8)
            self.second = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.second(torch.relu(self.first(x))).sum()

    for setting in ({"activation_checkpointing": True},
                    {"activation_checkpointing": True, "activation_offload": True}):
        with pytest.raises(UserError, match=rf"engine.{list(setting)[-1]}: true, but Net has no list of repeated "
                                            r"blocks .* name the class of its blocks with engine.checkpoint_module "
                                            r"\(its module classes: Linear\)"):
            initialize(Net(), setting)
    engine = initialize(Net(), {"activation_checkpointing": True, "checkpoint_module": "Linear"})
    engine(torch.ones(2, 8)).backward()  # both Linears recomputed: named, they are the blocks


def _spec(tmp_path: Path, engine: str) -> Path:
    write_model(tmp_path / "m", "llama")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"run:\n  train:\n    model: {{hf: m, seq_len: 16}}\n    steps: 2\nengine:\n{engine}"
                    f"output_dir: {tmp_path / 'out'}\n")
    return spec


def test_the_trainer_locates_a_block_class_the_model_does_not_have(tmp_path: Path, capsys) -> None:
    spec = _spec(tmp_path, "  micro_batch: 2\n  activation_checkpointing: true\n"
                           "  checkpoint_module: LlamaDecoderLayr\n")
    assert main([str(spec)]) == 2
    err = capsys.readouterr().err
    assert f"{spec}:8:22 engine.checkpoint_module: no module of class 'LlamaDecoderLayr' in the model (did you " \
           "mean 'LlamaDecoderLayer'?)" in err
    assert "Traceback" not in err


def test_the_trainer_checkpoints_an_hf_model_and_says_so(tmp_path: Path, capsys) -> None:
    assert main([str(_spec(tmp_path, "  micro_batch: 2\n  activation_checkpointing: true\n"))]) == 0
    assert "activation checkpointing" in capsys.readouterr().err


def test_checkpoint_module_without_checkpointing_is_refused(tmp_path: Path, capsys) -> None:
    spec = _spec(tmp_path, "  checkpoint_module: LlamaDecoderLayer\n")
    assert main([str(spec)]) == 2
    assert f"{spec}:6:22 engine.checkpoint_module: LlamaDecoderLayer names the blocks activation checkpointing " \
           "recomputes; it needs activation_checkpointing: true (or auto)" in capsys.readouterr().err


def test_the_bundled_llama_takes_checkpoint_module_too() -> None:
    import torch

    from dsl.engine import initialize
    from dsl.engine.model import Llama
    from dsl.engine.train_config import ModelConfig

    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    out = {}
    for name, extra in (("own", {}), ("named", {"checkpoint_module": "DecoderLayer"})):
        torch.manual_seed(0)
        model = Llama(ModelConfig())
        engine = initialize(model, {"activation_checkpointing": True, **extra})
        engine.state_summary()
        loss = engine(tokens, tokens.roll(-1, 1))
        loss.backward()
        out[name] = (loss.item(), engine.state_summary()["activations_bytes"], model.activation_checkpointing)
    assert out["own"][:2] == out["named"][:2]
    assert out["own"][2] and not out["named"][2]  # the engine's wrapping replaced the Llama's own
