"""Training data of the bundled engine: token sequences from a fixed random Markov chain.

The chain is the whole "dataset": every token has `SUCCESSORS` possible next tokens, drawn at
random from the vocabulary with `DataConfig.seed`, taken with the fixed probabilities
`SUCCESSOR_PROBS`. Its entropy rate is about 1.1 nats per token, far below the ln(vocab_size) of
an untrained model (5.5 nats for 256 tokens), so the loss visibly falls within a few hundred
steps, and it needs no files.

Determinism: the chain depends only on `DataConfig.seed`; the batch of (rank, step, micro_step)
depends only on (seed, rank, step, micro_step). Ranks therefore see different sequences of the
same chain, and a rerun (or a test's single-process reference) regenerates any rank's batch.
"""

from __future__ import annotations

import torch

from dsl.engine.train_config import DataConfig

__all__ = ["SyntheticData", "SUCCESSORS", "SUCCESSOR_PROBS"]

SUCCESSORS = 4
"""Possible next tokens of every token."""
SUCCESSOR_PROBS = (0.6, 0.2, 0.1, 0.1)
"""Probability of each successor slot; entropy 1.09 nats (fewer if two slots draw one token)."""

_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser), so nearby inputs give unrelated seeds."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) & _MASK64
        h = (h * 0xBF58476D1CE4E5B9) & _MASK64
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 29
    return h >> 1  # torch.Generator.manual_seed wants a value that fits in int64


class SyntheticData:
    """Batches of `micro_batch` sequences of `seq_len` tokens for one rank.

    `batch(step, micro_step) -> (tokens[B, T], targets[B, T])`, both int64 on `device`, where
    `targets[:, i] == tokens[:, i + 1]` and the last target continues the chain.
    """

    def __init__(
        self,
        cfg: DataConfig,
        *,
        vocab_size: int,
        seq_len: int,
        micro_batch: int,
        rank: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.micro_batch = micro_batch
        self.rank = rank
        self.device = torch.device(device)
        chain_rng = torch.Generator().manual_seed(_mix(cfg.seed))
        self.successors = torch.randint(
            vocab_size, (vocab_size, SUCCESSORS), generator=chain_rng
        )
        """[vocab_size, SUCCESSORS] int64: the possible next tokens of each token."""
        self.successor_probs = torch.tensor(SUCCESSOR_PROBS, dtype=torch.float64)
        """[SUCCESSORS] float64: probability of each successor slot."""
        # Inverse-CDF sampling: slot = number of inner bounds <= u for u ~ U[0, 1). Only the inner
        # bounds are kept, so no draw can fall past the last slot through rounding of the sum.
        self._slot_bounds = torch.cumsum(self.successor_probs, 0)[:-1].to(torch.float32)

    def transition_matrix(self) -> torch.Tensor:
        """[vocab_size, vocab_size] float64: P(next = j | current = i). Dense, for tests."""
        p = torch.zeros(self.vocab_size, self.vocab_size, dtype=torch.float64)
        p.scatter_add_(1, self.successors, self.successor_probs.expand(self.vocab_size, -1).clone())
        return p

    def batch(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        rng = torch.Generator().manual_seed(_mix(self.cfg.seed, self.rank, step, micro_step))
        b, t = self.micro_batch, self.seq_len
        seq = torch.empty(b, t + 1, dtype=torch.int64)
        seq[:, 0] = torch.randint(self.vocab_size, (b,), generator=rng)
        slots = torch.bucketize(torch.rand(b, t, generator=rng), self._slot_bounds, right=True)
        for i in range(t):
            seq[:, i + 1] = self.successors[seq[:, i], slots[:, i]]
        seq = seq.to(self.device)
        return seq[:, :-1], seq[:, 1:]
