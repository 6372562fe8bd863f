"""The GPT model: shapes, loss at initialisation, causality, tied embeddings."""

from __future__ import annotations

import math

import pytest
import torch

from dsl.engine.train_config import ModelConfig
from dsl.engine.model import GPT

SMALL = ModelConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, seq_len=16)


def _model(cfg: ModelConfig = SMALL, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg)


def _tokens(b: int, t: int, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def test_logits_shape_and_dtype() -> None:
    logits = _model()(_tokens(3, 16, SMALL.vocab_size))
    assert logits.shape == (3, 16, SMALL.vocab_size)
    assert logits.dtype == torch.float32


def test_shorter_sequences_work_and_longer_are_refused() -> None:
    model = _model()
    assert model(_tokens(2, 5, SMALL.vocab_size)).shape == (2, 5, SMALL.vocab_size)
    with pytest.raises(ValueError, match="longer than seq_len"):
        model(_tokens(2, 17, SMALL.vocab_size))


def test_loss_at_init_is_about_ln_vocab_and_equals_cross_entropy_of_logits() -> None:
    model = _model()
    x, y = _tokens(4, 16, SMALL.vocab_size, 1), _tokens(4, 16, SMALL.vocab_size, 2)
    loss = model(x, y)
    assert loss.shape == ()
    # Small init: near-uniform predictions.
    assert abs(loss.item() - math.log(SMALL.vocab_size)) < 0.1
    expected = torch.nn.functional.cross_entropy(model(x).reshape(-1, SMALL.vocab_size), y.reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_attention_is_causal() -> None:
    model = _model()
    x = _tokens(2, 16, SMALL.vocab_size)
    changed = x.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % SMALL.vocab_size
    with torch.no_grad():
        a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-4


def test_tied_embeddings_share_one_parameter() -> None:
    tied = _model()
    untied = _model(SMALL.model_copy(update={"tie_word_embeddings": False}))
    assert tied.head.weight is tied.tok_emb.weight
    assert untied.head.weight is not untied.tok_emb.weight
    assert untied.num_params() - tied.num_params() == SMALL.vocab_size * SMALL.hidden_size
    # The tied weight gets gradient from both uses.
    x = _tokens(2, 16, SMALL.vocab_size)
    tied(x, x).backward()
    unused_rows = torch.ones(SMALL.vocab_size, dtype=torch.bool)
    unused_rows[x.unique()] = False
    assert tied.tok_emb.weight.grad[unused_rows].abs().sum() > 0  # only the head touches these


def test_ffn_size_sets_mlp_width() -> None:
    model = _model(SMALL.model_copy(update={"intermediate_size": 40}))
    assert model.blocks[0].mlp.fc.weight.shape == (40, SMALL.hidden_size)
    assert _model().blocks[0].mlp.fc.weight.shape == (SMALL.ffn_size, SMALL.hidden_size)


def test_same_seed_same_weights() -> None:
    a, b, c = _model(seed=3), _model(seed=3), _model(seed=4)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.tok_emb.weight, c.tok_emb.weight)


def test_bf16_autocast_gives_fp32_loss_close_to_fp32() -> None:
    model = _model()
    x, y = _tokens(4, 16, SMALL.vocab_size, 1), _tokens(4, 16, SMALL.vocab_size, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        loss = model(x, y)
    assert logits.dtype == torch.bfloat16
    assert loss.dtype == torch.float32
    assert abs(loss.item() - model(x, y).item()) < 0.02
