"""`engine.compile` decisions (engine/compile.py) in one process, without compiling anything.

The suite runs with TORCHDYNAMO_DISABLE=1 (tests/conftest.py); compiled training itself is
checked in tests/integration/test_compile.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsl.engine.compile import apply, blockers, dynamo_disabled
from dsl.engine.config import EngineConfig
from dsl.engine.errors import UserError
from dsl.engine.model import Llama
from dsl.engine.train_config import ModelConfig

CPU = torch.device("cpu")
CFG = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, seq_len=32)


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))


def test_the_suite_runs_with_dynamo_disabled() -> None:
    assert dynamo_disabled()
    model = Llama(CFG)
    assert apply(model, EngineConfig(), CPU) == []
    assert "forward" not in vars(model.layers[0])  # nothing was replaced


def test_compile_replaces_only_the_blocks_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHDYNAMO_DISABLE")
    model = Llama(CFG)
    pre_hooks_before = dict(model.layers[0]._forward_pre_hooks)
    assert apply(model, EngineConfig(compile=True), CPU) == ["layers.0", "layers.1"]
    assert "forward" in vars(model.layers[0]) and "forward" in vars(model.layers[1])
    assert "forward" not in vars(model) and "forward" not in vars(model.lm_head)
    assert dict(model.layers[0]._forward_pre_hooks) == pre_hooks_before  # __call__ and hooks untouched


def test_auto_compiles_only_the_bundled_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHDYNAMO_DISABLE")
    other = Blocks()
    assert any("bundled Llama" in r for r in blockers(other, EngineConfig(), CPU))
    assert apply(other, EngineConfig(), CPU) == []
    assert apply(Blocks(), EngineConfig(compile=True), CPU) == ["blocks.0", "blocks.1", "blocks.2"]


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ({"sequence_parallel": 2}, "sequence_parallel 2"),
        ({"tiled_mlp": {"enabled": True}}, "tiled_mlp"),
        ({"activation_checkpointing": True, "activation_offload": True}, "activation_offload"),
    ],
)
def test_features_with_their_own_autograd_keep_auto_eager_and_refuse_true(
    monkeypatch: pytest.MonkeyPatch, setting: dict, words: str
) -> None:
    monkeypatch.delenv("TORCHDYNAMO_DISABLE")
    assert apply(Llama(CFG), EngineConfig(**setting), CPU) == []
    with pytest.raises(UserError, match=f"engine.compile: true cannot be used with {words}"):
        apply(Llama(CFG), EngineConfig(compile=True, **setting), CPU)


def test_no_cxx_compiler_on_cpu_is_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHDYNAMO_DISABLE")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    assert any("C++ compiler" in r for r in blockers(Llama(CFG), EngineConfig(), CPU))
    assert apply(Llama(CFG), EngineConfig(), CPU) == []


def test_compile_false_is_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHDYNAMO_DISABLE")
    model = Llama(CFG)
    assert apply(model, EngineConfig(compile=False), CPU) == []
    assert "forward" not in vars(model.layers[0])
