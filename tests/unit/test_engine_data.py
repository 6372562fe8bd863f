"""Training data: synthetic Markov chain and token files, addressed by global sample index."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from dsl.engine.data import SyntheticData, TokenFileData, open_data
from dsl.engine.errors import UserError
from dsl.engine.train_config import DataConfig


def _data(rank: int = 0, seed: int = 1234, vocab: int = 256, micro_batch: int = 8, **layout) -> SyntheticData:
    return SyntheticData(DataConfig(seed=seed), vocab_size=vocab, seq_len=64, micro_batch=micro_batch, rank=rank, **layout)


def _samples(data, step: int, micro_step: int) -> list[tuple[int, ...]]:
    tokens, targets = data.batch(step, micro_step)
    return [tuple(row) for row in torch.cat([tokens, targets[:, -1:]], dim=1).tolist()]


# Synthetic ---------------------------------------------------------------------------------


def test_batch_shapes_and_shifted_targets() -> None:
    tokens, targets = _data().batch(3, 1)
    assert tokens.shape == targets.shape == (8, 64)
    assert tokens.dtype == targets.dtype == torch.int64
    assert torch.equal(tokens[:, 1:], targets[:, :-1])
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 256


def test_same_seed_and_position_gives_same_batch() -> None:
    a, b = _data().batch(5, 2), _data().batch(5, 2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_ranks_steps_micro_steps_and_seeds_give_different_batches() -> None:
    base = _data(dp_size=2, grad_accum=2).batch(5, 0)[0]
    for other in (
        _data(rank=1, dp_size=2, grad_accum=2).batch(5, 0)[0],
        _data(dp_size=2, grad_accum=2).batch(6, 0)[0],
        _data(dp_size=2, grad_accum=2).batch(5, 1)[0],
        _data(seed=99, dp_size=2, grad_accum=2).batch(5, 0)[0],
    ):
        assert (other != base).float().mean() > 0.5


def test_sample_is_a_function_of_seed_and_global_index_only() -> None:
    data = _data()
    whole = data.sequences(100, 8)
    assert torch.equal(data.sequences(103, 2), whole[3:5])
    # The layout (here another micro-batch size) does not change what a sample holds.
    assert torch.equal(_data(micro_batch=3).sequences(104, 1)[0], whole[4])


def test_layout_formula() -> None:
    data = _data(micro_batch=4, rank=1, dp_size=3, grad_accum=2)
    assert data.global_batch == 24
    assert data.first_sample(1, 0) == 4
    assert data.first_sample(2, 1) == 24 + (1 * 3 + 1) * 4
    assert data.samples_seen(2) == 48
    with pytest.raises(ValueError, match="step 0 is not after"):
        data.first_sample(0)


def test_two_ranks_micro_4_read_what_one_rank_accum_2_micro_4_reads() -> None:
    """The property that lets a 2-rank checkpoint resume on 1 rank with grad_accum 2."""
    for step in (1, 2, 7):
        two_ranks = [s for r in range(2) for s in _samples(_data(micro_batch=4, rank=r, dp_size=2), step, 0)]
        one_rank = [s for m in range(2) for s in _samples(_data(micro_batch=4, grad_accum=2), step, m)]
        four_ranks = [s for r in range(4) for s in _samples(_data(micro_batch=2, rank=r, dp_size=4), step, 0)]
        assert sorted(two_ranks) == sorted(one_rank) == sorted(four_ranks)
        assert len(set(two_ranks)) == 8
        # Exactly the global samples [(step - 1) * 8, step * 8).
        expected = _data().sequences((step - 1) * 8, 8)
        assert sorted(two_ranks) == sorted(tuple(row) for row in expected.tolist())


def test_resume_continues_at_the_saved_sample_even_with_another_global_batch() -> None:
    before = _data(micro_batch=4, dp_size=2)  # global batch 8
    seen = before.samples_seen(10)
    after = _data(micro_batch=2, grad_accum=3, resume_step=10, resume_sample=seen)  # global batch 6
    assert after.first_sample(11, 0) == 80
    nxt = [s for m in range(3) for s in _samples(after, 11, m)]
    assert nxt == [tuple(row) for row in _data().sequences(80, 6).tolist()]


def test_every_bigram_is_a_transition_of_the_chain() -> None:
    data = _data()
    p = data.transition_matrix()
    torch.testing.assert_close(p.sum(1), torch.ones(256, dtype=torch.float64))
    tokens, targets = data.batch(1, 0)
    assert bool((p[tokens, targets] > 0).all())


def test_chain_is_learnable_entropy_well_below_ln_vocab() -> None:
    data = _data()
    vocab = data.vocab_size
    p = data.transition_matrix()
    row_entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(1)
    assert float(row_entropy.max()) <= 1.1
    # Empirical bigram entropy H(next | current) of the sampled data: what a model can reach.
    counts = torch.zeros(vocab, vocab, dtype=torch.float64)
    for step in range(1, 41):
        tokens, targets = data.batch(step, 0)
        counts.index_put_((tokens.flatten(), targets.flatten()), torch.ones(tokens.numel(), dtype=torch.float64), accumulate=True)
    joint = counts / counts.sum()
    cond = counts / counts.sum(1, keepdim=True).clamp(min=1)
    h = -(joint * torch.where(cond > 0, cond.log(), torch.zeros_like(cond))).sum()
    assert float(h) < 0.25 * math.log(vocab)  # ~1.0 nats against ln(256) = 5.55
    assert int((counts.sum(1) > 0).sum()) > vocab // 2  # not degenerate


# Token files -------------------------------------------------------------------------------


def _token_file(tmp_path: Path, n: int, dtype: str = "uint16", name: str = "train.bin") -> Path:
    path = tmp_path / name
    (np.arange(n) % 1000).astype(dtype).tofile(path)
    return path


def _file_data(path: Path, *, dtype: str = "uint16", order: str = "sequential", vocab: int = 1000,
               seq_len: int = 10, **layout) -> TokenFileData:
    cfg = DataConfig(kind="tokens", path=str(path), dtype=dtype, order=order, seed=7)
    layout.setdefault("micro_batch", 2)
    return TokenFileData(cfg, vocab_size=vocab, seq_len=seq_len, **layout)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_file_windows_are_contiguous_and_wrap_around(tmp_path: Path, dtype: str) -> None:
    data = _file_data(_token_file(tmp_path, 95, dtype), dtype=dtype)
    assert isinstance(data.tokens, np.memmap)  # mapped, not read into memory
    assert data.windows == 9  # (95 - 1) // 10
    tokens, targets = data.batch(1, 0)
    assert tokens.dtype == torch.int64
    assert tokens.tolist() == [list(range(0, 10)), list(range(10, 20))]
    assert targets[:, -1].tolist() == [10, 20]  # windows share their boundary token
    assert data.sequences(8, 2).tolist() == [list(range(80, 91)), list(range(0, 11))]  # epoch 2


def test_token_file_sharding_over_ranks_and_micro_steps(tmp_path: Path) -> None:
    path = _token_file(tmp_path, 1001)
    two_ranks = [_file_data(path, rank=r, dp_size=2).batch(3, 0)[0] for r in range(2)]
    one_rank = [_file_data(path, grad_accum=2).batch(3, m)[0] for m in range(2)]
    assert torch.equal(torch.cat(two_ranks), torch.cat(one_rank))
    # Step 3 of a global batch of 4 is samples 8..11: windows starting at tokens 80..110.
    assert torch.cat(two_ranks)[:, 0].tolist() == [80, 90, 100, 110]


def test_token_file_shuffle_is_a_seeded_permutation_per_epoch(tmp_path: Path) -> None:
    path = _token_file(tmp_path, 201)
    data = _file_data(path, order="shuffle")
    epoch0 = [data.window(i) for i in range(20)]
    epoch1 = [data.window(i) for i in range(20, 40)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(20))
    assert epoch0 != list(range(20)) and epoch0 != epoch1
    assert [_file_data(path, order="shuffle").window(i) for i in range(20)] == epoch0
    first = data.sequences(0, 1)[0]
    assert first.tolist() == list(range(epoch0[0] * 10, epoch0[0] * 10 + 11))


def test_token_file_via_open_data(tmp_path: Path) -> None:
    cfg = DataConfig(kind="tokens", path=str(_token_file(tmp_path, 100)))
    assert isinstance(open_data(cfg, vocab_size=1000, seq_len=10, micro_batch=1), TokenFileData)
    assert isinstance(open_data(DataConfig(), vocab_size=10, seq_len=10, micro_batch=1), SyntheticData)


def _open_error(path: Path, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        _file_data(path, **kwargs)
    message = str(info.value)
    assert message.startswith("run.train.data.path: ")
    return message


def test_token_file_errors_name_the_field(tmp_path: Path) -> None:
    assert re.search(r"no such file: .*missing\.bin \(relative paths start at", _open_error(tmp_path / "missing.bin"))
    assert "is not a regular file" in _open_error(tmp_path)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\0" * 7)
    assert "has 7 bytes, not a multiple of 2 (the size of run.train.data.dtype uint16)" in _open_error(odd)
    assert "not a multiple of 4" in _open_error(_token_file(tmp_path, 3, "uint16", "three.bin"), dtype="uint32")
    short = _token_file(tmp_path, 10, name="short.bin")
    assert "holds 10 tokens; one sequence needs seq_len + 1 = 11" in _open_error(short)
    big = _token_file(tmp_path, 100, name="big.bin")
    message = _open_error(big, vocab=50)  # ids 0..99
    assert "holds token id 99 at token 50, but run.train.model.vocab_size is 50" in message
    assert "checked 100 of 100 tokens" in message


def test_token_beyond_the_checked_sample_is_caught_when_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dsl.engine.data as data_module

    monkeypatch.setattr(data_module, "TOKEN_CHECK_SAMPLE", 64)  # 64 chunks of 1 token
    ids = np.zeros(1001, dtype=np.uint16)
    ids[557] = 3000  # not at any of the 64 sampled positions
    assert 557 not in np.linspace(0, 1000, 64).astype(np.int64)
    path = tmp_path / "t.bin"
    ids.tofile(path)
    data = _file_data(path, vocab=1000)
    assert data.batch(1, 0)[0].shape == (2, 10)
    with pytest.raises(UserError, match=r"run.train.data.path: .* token id 3000 at token 557, .*window of sample 55\b"):
        data.sequences(55, 1)


def test_data_config_requires_path_exactly_with_tokens() -> None:
    with pytest.raises(ValidationError, match="kind: tokens needs path"):
        DataConfig(kind="tokens")
    with pytest.raises(ValidationError, match="read only with kind: tokens"):
        DataConfig(path="x.bin")
    with pytest.raises(ValidationError, match="'uint16' or 'uint32'"):
        DataConfig(kind="tokens", path="x.bin", dtype="int64")
