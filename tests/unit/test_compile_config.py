"""`engine.compile` decisions (engine/compile.py) in one process, without compiling anything.

Compiled training itself is checked in tests/integration/test_compile.py.
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


def test_default_is_eager_and_dynamo_disabled_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Llama(CFG)
    assert EngineConfig().compile is False
    assert apply(model, EngineConfig(), CPU) == []
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    assert dynamo_disabled()
    assert apply(model, EngineConfig(compile=True), CPU) == []
    assert "forward" not in vars(model.layers[0])  # nothing was replaced


def test_compile_replaces_only_the_blocks_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    model = Llama(CFG)
    pre_hooks_before = dict(model.layers[0]._forward_pre_hooks)
    assert apply(model, EngineConfig(compile=True), CPU) == ["layers.0", "layers.1"]
    assert "forward" in vars(model.layers[0]) and "forward" in vars(model.layers[1])
    assert "forward" not in vars(model) and "forward" not in vars(model.lm_head)
    assert dict(model.layers[0]._forward_pre_hooks) == pre_hooks_before  # __call__ and hooks untouched


def test_auto_compiles_only_the_bundled_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    other = Blocks()
    assert any("bundled Llama" in r for r in blockers(other, EngineConfig(compile="auto"), CPU))
    assert apply(other, EngineConfig(compile="auto"), CPU) == []
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
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    assert apply(Llama(CFG), EngineConfig(compile="auto", **setting), CPU) == []
    with pytest.raises(UserError, match=f"engine.compile: true cannot be used with {words}"):
        apply(Llama(CFG), EngineConfig(compile=True, **setting), CPU)


def test_no_cxx_compiler_on_cpu_is_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    assert any("C++ compiler" in r for r in blockers(Llama(CFG), EngineConfig(compile="auto"), CPU))
    assert apply(Llama(CFG), EngineConfig(compile="auto"), CPU) == []


def test_compile_false_is_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    model = Llama(CFG)
    assert apply(model, EngineConfig(compile=False), CPU) == []
    assert "forward" not in vars(model.layers[0])
