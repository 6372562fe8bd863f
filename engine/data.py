"""Training data of the bundled engine: token sequences addressed by a global sample index.

Three sources, chosen by `DataConfig.kind` (the third, `text`, is engine/text_data.py):
- `synthetic` (`SyntheticData`): a fixed random Markov chain. Every token has `SUCCESSORS`
  possible next tokens, drawn from the vocabulary with `DataConfig.seed` and taken with the fixed
  probabilities `SUCCESSOR_PROBS`. Its entropy rate is about 1.1 nats per token, far below the
  ln(vocab_size) of an untrained model (5.5 nats for 256 tokens), so the loss visibly falls within
  a few hundred steps, and it needs no files. Sample i is drawn from a generator seeded with
  (seed, i) alone.
- `tokens` (`TokenFileData`): a flat binary file of token ids (`uint16` or `uint32`, native byte
  order, the format of nanoGPT's `train.bin`), read through `np.memmap` without loading it. The
  file is cut into `(n_tokens - 1) // seq_len` windows of `seq_len + 1` tokens, window w starting
  at token w * seq_len (neighbours share one token, so every token but the first is a target once
  per epoch). Sample i belongs to epoch i // windows; within an epoch the windows are read in file
  order (`order: sequential`) or in a permutation seeded with (seed, epoch) (`order: shuffle`),
  and the next epoch starts over (wrap-around).

Sample layout: everything is a function of the global sample index, never of the rank or the
number of ranks. With B = micro_batch x grad_accum x dp_size sequences per optimizer step, step s
(1-based) reads the global samples [(s - 1) * B, s * B), and micro-step m of data-parallel rank r
reads the `micro_batch` samples starting at

    (s - 1) * B + (m * dp_size + r) * micro_batch

(Megatron's order: each micro-step consumes the next dp_size x micro_batch samples, rank r taking
the r-th piece). Any split of a global batch over ranks and micro-steps therefore trains on the
same samples: 2 ranks x micro 4 and 1 rank x grad_accum 2 x micro 4 read samples [0, 8) at step
1. A run resumed from a checkpoint continues where the checkpoint's `samples_seen` left off, even
with another global batch (`resume_step`, `resume_sample`).

`batch(step, micro_step) -> (tokens[micro_batch, seq_len], targets[micro_batch, seq_len])`, both
int64 on `device`, `targets[:, i] == tokens[:, i + 1]`.

Sequence parallelism (`sp_size` > 1, Ulysses): the sp ranks of one group share a data-parallel
rank, so they read the same samples; each then keeps its contiguous slice of seq_len / sp
positions, `[sp_rank * seq_len / sp, (sp_rank + 1) * seq_len / sp)`, of both tokens and targets.
The shift happens before the split: the sequence is read as seq_len + 1 tokens, targets are
tokens shifted by one over the whole sequence, and only then both are cut, so the last target of
shard r is the first token of shard r + 1 (no position loses its target at a shard boundary).
`positions` is the shard's [seq_len / sp] int64 RoPE positions. Every run cuts at the same
positions: the slice depends on sp_rank and sp_size only. Positions outside the layout (a rank >=
dp_size, a micro-step >= grad_accum) are not refused: they address the samples of other slots,
which is what a single-process test that emulates several ranks wants. The trainer only asks for
positions inside its layout.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from dsl.engine.errors import UserError
from dsl.engine.train_config import DataConfig

__all__ = [
    "TokenBatches",
    "WindowOrder",
    "SyntheticData",
    "TokenFileData",
    "open_data",
    "SUCCESSORS",
    "SUCCESSOR_PROBS",
    "TOKEN_CHECK_SAMPLE",
]

SUCCESSORS = 4
"""Possible next tokens of every token."""
SUCCESSOR_PROBS = (0.6, 0.2, 0.1, 0.1)
"""Probability of each successor slot; entropy 1.09 nats (fewer if two slots draw one token)."""
TOKEN_CHECK_SAMPLE = 1 << 20
"""Tokens of a token file checked against vocab_size when it is opened (in 64 evenly spread
chunks); every batch is checked again as it is read."""

_MASK64 = (1 << 64) - 1
_PATH_FIELD = "run.train.data.path"


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


class WindowOrder:
    """Which window (0 <= w < windows) global sample i reads: i mod windows in file order
    (`sequential`), or a permutation per epoch i // windows seeded by (seed, epoch), the same on
    every rank and after any resume (token files here, engine/text_data.py's packed text)."""

    def __init__(self, order: str, seed: int, windows: int) -> None:
        self.order, self.seed, self.windows = order, seed, windows
        self._epoch = -1
        self._perm: torch.Tensor | None = None

    def __call__(self, sample: int) -> int:
        epoch, index = divmod(sample, self.windows)
        if self.order == "sequential":
            return index
        if epoch != self._epoch:
            rng = torch.Generator().manual_seed(_mix(self.seed, epoch))
            self._perm = torch.randperm(self.windows, generator=rng)
            self._epoch = epoch
        return int(self._perm[index])


class TokenBatches:
    """The layout (which global samples a rank reads when) shared by every source.

    Subclasses implement `sequences(start, count)`; this class turns (step, micro_step) into a
    sample range (see the module docstring).
    """

    def __init__(
        self,
        *,
        seq_len: int,
        micro_batch: int,
        rank: int = 0,
        dp_size: int = 1,
        grad_accum: int = 1,
        resume_step: int = 0,
        resume_sample: int = 0,
        device: torch.device | str = "cpu",
        sp_rank: int = 0,
        sp_size: int = 1,
    ) -> None:
        for name, value, low in (("seq_len", seq_len, 1), ("micro_batch", micro_batch, 1),
                                 ("dp_size", dp_size, 1), ("grad_accum", grad_accum, 1),
                                 ("rank", rank, 0), ("resume_step", resume_step, 0),
                                 ("resume_sample", resume_sample, 0), ("sp_size", sp_size, 1),
                                 ("sp_rank", sp_rank, 0)):  # fmt: skip
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if sp_rank >= sp_size or seq_len % sp_size:
            raise ValueError(f"sequence shard {sp_rank} of {sp_size}: sp_size must divide seq_len "
                             f"({seq_len}) and sp_rank lie in [0, sp_size)")
        self.seq_len = seq_len
        self.micro_batch = micro_batch
        self.rank = rank
        """Data-parallel rank (ranks of one sequence-parallel group share it)."""
        self.dp_size = dp_size
        self.grad_accum = grad_accum
        self.resume_step = resume_step
        """The optimizer step a resumed run continues after (0: a fresh run)."""
        self.resume_sample = resume_sample
        """Global samples consumed by the first `resume_step` steps."""
        self.device = torch.device(device)
        self.sp_rank = sp_rank
        """This rank's sequence shard."""
        self.sp_size = sp_size
        """Ranks one sequence is split over."""
        shard = seq_len // sp_size
        self.positions = torch.arange(sp_rank * shard, (sp_rank + 1) * shard, device=self.device)
        """[seq_len / sp_size] int64: positions of this rank's shard (RoPE's `positions`)."""

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step over all data-parallel ranks."""
        return self.micro_batch * self.grad_accum * self.dp_size

    def first_sample(self, step: int, micro_step: int = 0) -> int:
        """Global index of the first sample of (step, micro_step) on this rank (step is 1-based)."""
        if step <= self.resume_step:
            raise ValueError(f"step {step} is not after the resumed step {self.resume_step}")
        return (self.resume_sample + (step - self.resume_step - 1) * self.global_batch
                + (micro_step * self.dp_size + self.rank) * self.micro_batch)

    def samples_seen(self, step: int) -> int:
        """Global samples consumed by all ranks after optimizer step `step` (a data position)."""
        return self.resume_sample + (step - self.resume_step) * self.global_batch

    def sequences(self, start: int, count: int) -> torch.Tensor:
        """Global samples [start, start + count) as [count, seq_len + 1] int64 (CPU)."""
        raise NotImplementedError

    def batch(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        seq = self.sequences(self.first_sample(step, micro_step), self.micro_batch).to(self.device)
        tokens, targets = seq[:, :-1], seq[:, 1:]  # shifted over the whole sequence, then cut
        if self.sp_size == 1:
            return tokens, targets
        shard = slice(int(self.positions[0]), int(self.positions[-1]) + 1)
        return tokens[:, shard].contiguous(), targets[:, shard].contiguous()


class SyntheticData(TokenBatches):
    """Sequences of a fixed random Markov chain over `vocab_size` tokens (`kind: synthetic`)."""

    def __init__(self, cfg: DataConfig, *, vocab_size: int, **layout) -> None:
        super().__init__(**layout)
        self.cfg = cfg
        self.vocab_size = vocab_size
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

    def sequences(self, start: int, count: int) -> torch.Tensor:
        t = self.seq_len
        seq = torch.empty(count, t + 1, dtype=torch.int64)
        uniform = torch.empty(count, t)
        for row in range(count):
            # One generator per sample, seeded by (seed, global index) only.
            rng = torch.Generator().manual_seed(_mix(self.cfg.seed, start + row))
            seq[row, 0] = int(torch.randint(self.vocab_size, (1,), generator=rng))
            uniform[row] = torch.rand(t, generator=rng)
        slots = torch.bucketize(uniform, self._slot_bounds, right=True)
        for i in range(t):  # the chain, vectorised over the samples
            seq[:, i + 1] = self.successors[seq[:, i], slots[:, i]]
        return seq


class TokenFileData(TokenBatches):
    """Windows of a flat token-id file read through np.memmap (`kind: tokens`).

    Raises UserError naming `run.train.data.path` when the file is missing, its size is not a
    whole number of tokens, it holds fewer than seq_len + 1 tokens, or a token id is >= vocab_size
    (checked on `TOKEN_CHECK_SAMPLE` tokens at open and on every batch read).
    """

    def __init__(self, cfg: DataConfig, *, vocab_size: int, **layout) -> None:
        super().__init__(**layout)
        if cfg.path is None:
            raise UserError(f"{_PATH_FIELD}: required with kind: tokens")
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.path = Path(os.path.expanduser(cfg.path))
        dtype = np.dtype(cfg.dtype)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise UserError(f"{_PATH_FIELD}: no such file: {self.path} (relative paths start at "
                            f"the ranks' working directory, {Path.cwd()})") from None
        except OSError as err:
            raise UserError(f"{_PATH_FIELD}: cannot read {self.path}: {err.strerror}") from None
        if not self.path.is_file():
            raise UserError(f"{_PATH_FIELD}: {self.path} is not a regular file")
        if size % dtype.itemsize:
            raise UserError(
                f"{_PATH_FIELD}: {self.path} has {size:,} bytes, not a multiple of "
                f"{dtype.itemsize} (the size of run.train.data.dtype {cfg.dtype}); is the dtype right?")
        n_tokens = size // dtype.itemsize
        if n_tokens < self.seq_len + 1:
            raise UserError(
                f"{_PATH_FIELD}: {self.path} holds {n_tokens:,} tokens; one sequence needs "
                f"seq_len + 1 = {self.seq_len + 1}")
        self.tokens = np.memmap(self.path, dtype=dtype, mode="r")
        """[n_tokens] the whole file, mapped (pages are read on first touch, never copied whole)."""
        self.n_tokens = n_tokens
        self.windows = (n_tokens - 1) // self.seq_len
        """Sequences per epoch."""
        self.window = WindowOrder(self.cfg.order, self.cfg.seed, self.windows)
        """The window (0 <= w < windows) a global sample reads."""
        self._check_sample()

    def _check_sample(self) -> None:
        chunks = 64
        chunk = max(1, TOKEN_CHECK_SAMPLE // chunks)
        if self.n_tokens <= TOKEN_CHECK_SAMPLE:
            starts = [0]
            chunk = self.n_tokens
        else:
            starts = np.linspace(0, self.n_tokens - chunk, chunks).astype(np.int64).tolist()
        for start in starts:
            self._check_ids(np.asarray(self.tokens[start : start + chunk]), start,
                            f"checked {min(self.n_tokens, len(starts) * chunk):,} of "
                            f"{self.n_tokens:,} tokens, sampled evenly; every batch is checked "
                            f"again when read")

    def _check_ids(self, ids: np.ndarray, first_token: int, note: str) -> None:
        top = int(ids.max())
        if top >= self.vocab_size:
            at = first_token + int(np.argmax(ids >= self.vocab_size))
            raise UserError(
                f"{_PATH_FIELD}: {self.path} holds token id {top} at token {at:,}, but "
                f"run.train.model.vocab_size is {self.vocab_size} ({note})")

    def sequences(self, start: int, count: int) -> torch.Tensor:
        t = self.seq_len
        rows = []
        for sample in range(start, start + count):
            first = self.window(sample) * t
            ids = np.asarray(self.tokens[first : first + t + 1])
            self._check_ids(ids, first, f"in the window of sample {sample:,}")
            rows.append(ids.astype(np.int64))  # copies just this window
        return torch.from_numpy(np.stack(rows))


def open_data(cfg: DataConfig, *, vocab_size: int, tokenizer: str | None = None, **layout) -> TokenBatches:
    """The source `cfg.kind` names, with the layout keywords of `TokenBatches`; `tokenizer` is the
    model's tokenizer folder, which kind: text uses when run.train.data.tokenizer is unset."""
    if cfg.kind == "text":
        from dsl.engine.text_data import TextData

        return TextData(cfg, vocab_size=vocab_size, tokenizer=tokenizer, **layout)
    if cfg.kind == "tokens":
        return TokenFileData(cfg, vocab_size=vocab_size, **layout)
    return SyntheticData(cfg, vocab_size=vocab_size, **layout)
