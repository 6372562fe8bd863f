"""Synthetic Markov-chain data: determinism per (seed, rank, step, micro_step) and learnability."""

from __future__ import annotations

import math

import torch

from dsl.engine.train_config import DataConfig
from dsl.engine.data import SyntheticData


def _data(rank: int = 0, seed: int = 1234, vocab: int = 256, micro_batch: int = 8) -> SyntheticData:
    return SyntheticData(DataConfig(seed=seed), vocab_size=vocab, seq_len=64, micro_batch=micro_batch, rank=rank)


def test_batch_shapes_and_shifted_targets() -> None:
    tokens, targets = _data().batch(3, 1)
    assert tokens.shape == targets.shape == (8, 64)
    assert tokens.dtype == targets.dtype == torch.int64
    assert torch.equal(tokens[:, 1:], targets[:, :-1])
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 256


def test_same_seed_rank_step_gives_same_batch() -> None:
    a, b = _data().batch(5, 2), _data().batch(5, 2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_ranks_steps_micro_steps_and_seeds_give_different_batches() -> None:
    base = _data().batch(5, 0)[0]
    for other in (
        _data(rank=1).batch(5, 0)[0],
        _data().batch(6, 0)[0],
        _data().batch(5, 1)[0],
        _data(seed=99).batch(5, 0)[0],
    ):
        assert (other != base).float().mean() > 0.5


def test_every_bigram_is_a_transition_of_the_chain() -> None:
    data = _data()
    p = data.transition_matrix()
    torch.testing.assert_close(p.sum(1), torch.ones(256, dtype=torch.float64))
    tokens, targets = data.batch(1, 0)
    assert bool((p[tokens, targets] > 0).all())


def test_chain_is_learnable_entropy_well_below_ln_vocab() -> None:
    data = _data()
    vocab = data.vocab_size
    # Exact conditional entropy of each row of the chain.
    p = data.transition_matrix()
    row_entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(1)
    assert float(row_entropy.max()) <= 1.1
    # Empirical bigram entropy H(next | current) of the sampled data: what a model can reach.
    counts = torch.zeros(vocab, vocab, dtype=torch.float64)
    for step in range(40):
        tokens, targets = data.batch(step, 0)
        counts.index_put_((tokens.flatten(), targets.flatten()), torch.ones(tokens.numel(), dtype=torch.float64), accumulate=True)
    joint = counts / counts.sum()
    cond = counts / counts.sum(1, keepdim=True).clamp(min=1)
    h = -(joint * torch.where(cond > 0, cond.log(), torch.zeros_like(cond))).sum()
    assert float(h) < 0.25 * math.log(vocab)  # ~1.0 nats against ln(256) = 5.55
    # ... and the data is not degenerate: it visits most of the vocabulary.
    assert int((counts.sum(1) > 0).sum()) > vocab // 2
