"""Sequence parallelism without a second rank: the degree rules (engine/long/degrees.py), the data
split (engine/data.py), the refusal of impossible degrees by `dsl validate` and `dsl plan`
(located, exit 2), and the planner's `auto` choice reaching the resolved spec."""

from __future__ import annotations

import pytest
import torch

from dsl.engine.data import SyntheticData
from dsl.engine.long.degrees import kv_heads_per_rank, kv_replicas, sp_reason
from dsl.engine.long.ulysses import head_to_seq, seq_to_head, ulysses_attention
from dsl.engine.train_config import DataConfig
from tests.conftest import run_dsl


@pytest.mark.parametrize(("sp", "heads", "kv", "seq", "words"), [
    (2, 4, 4, 64, None), (4, 8, 2, 64, None), (4, 8, 1, 64, None), (2, 8, 8, 64, None),
    (3, 4, 4, 63, "must divide num_attention_heads (4)"),
    (2, 4, 4, 63, "must divide seq_len (63)"),
    (4, 12, 6, 64, "num_key_value_heads (6) must divide one another"),
    (0, 4, 4, 64, "must be >= 1"),
])
def test_degree_rules(sp: int, heads: int, kv: int, seq: int, words: str | None) -> None:
    reason = sp_reason(sp, heads=heads, kv_heads=kv, seq_len=seq)
    assert (reason is None) if words is None else (words in reason), reason


def test_kv_heads_split_or_replicated() -> None:
    assert (kv_replicas(2, 4), kv_heads_per_rank(2, 4)) == (1, 2)
    assert (kv_replicas(4, 1), kv_heads_per_rank(4, 1)) == (4, 1)
    assert (kv_replicas(8, 2), kv_heads_per_rank(8, 2)) == (4, 1)


def _data(sp_rank: int, sp_size: int, **kw) -> SyntheticData:
    return SyntheticData(DataConfig(seed=3), vocab_size=64, seq_len=12, micro_batch=2,
                         sp_rank=sp_rank, sp_size=sp_size, **kw)


@pytest.mark.parametrize("sp", [2, 3, 4])
def test_shards_are_contiguous_slices_cut_after_the_shift(sp: int) -> None:
    full_tokens, full_targets = _data(0, 1).batch(5, 0)
    shards = [_data(r, sp).batch(5, 0) for r in range(sp)]
    assert torch.equal(torch.cat([t for t, _ in shards], 1), full_tokens)
    assert torch.equal(torch.cat([y for _, y in shards], 1), full_targets)
    for r in range(sp - 1):  # no position loses its target at a shard boundary
        assert torch.equal(shards[r][1][:, -1], shards[r + 1][0][:, 0])
    assert torch.equal(torch.cat([_data(r, sp).positions for r in range(sp)]), torch.arange(12))
    again = _data(sp - 1, sp).batch(5, 0)  # the same cut on every run
    assert torch.equal(again[0], shards[-1][0]) and torch.equal(again[1], shards[-1][1])


def test_sp_ranks_read_the_samples_of_their_data_parallel_rank() -> None:
    # dp 2 x sp 2: world ranks 0,1 are dp rank 0; ranks 2,3 dp rank 1.
    full = {dp: _data(0, 1, rank=dp, dp_size=2).batch(1, 0)[0] for dp in range(2)}
    for dp in range(2):
        halves = [_data(sp, 2, rank=dp, dp_size=2).batch(1, 0)[0] for sp in range(2)]
        assert torch.equal(torch.cat(halves, 1), full[dp])
    assert not torch.equal(full[0], full[1])


def test_a_shard_that_does_not_divide_the_sequence_is_refused() -> None:
    with pytest.raises(ValueError, match="sp_size must divide seq_len"):
        _data(0, 5)


def test_without_a_group_the_all_to_alls_are_the_identity_and_attention_is_plain() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g)
    assert seq_to_head(q, None) is q and head_to_seq(q, None) is q
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(ulysses_attention(q, k, v, None), want.transpose(1, 2).reshape(2, 6, 32))


SPEC = """\
name: t
run:
  train:
    model: {{vocab_size: 64, hidden_size: 32, num_hidden_layers: 1, num_attention_heads: {heads}, num_key_value_heads: {kv}, seq_len: {seq}}}
resources: {{procs_per_node: {procs}, topology: cpu-only}}
engine:
  micro_batch: 1
  sequence_parallel: {sp}
"""


@pytest.mark.parametrize(("heads", "kv", "seq", "sp", "words"), [
    (4, 4, 64, 3, "sequence_parallel (3) must divide num_attention_heads (4)"),
    (4, 4, 63, 2, "sequence_parallel (2) must divide seq_len (63)"),
    # valid for the model (kv replicated), not for the 2 ranks procs_per_node fixes (engine/validity.py)
    (8, 2, 64, 8, "sequence_parallel (8) must divide the number of ranks (2)"),
])
def test_validate_and_plan_refuse_a_degree_the_model_cannot_take(write, heads, kv, seq, sp, words) -> None:
    spec = write("s.yaml", SPEC.format(heads=heads, kv=kv, seq=seq, sp=sp, procs=2))
    for command in ("validate", "plan"):
        proc = run_dsl(command, str(spec))
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        assert f"{spec}:8:22 engine.sequence_parallel: {words}" in proc.stderr, proc.stderr


def test_planner_auto_sp_is_what_the_resolved_spec_runs(write, monkeypatch, tmp_path) -> None:
    from dsl.launcher.launch import Mode, prepare

    monkeypatch.chdir(tmp_path)
    # 49,152 tokens of a 32k vocabulary: one CPU rank of the recorded machine cannot hold the
    # logits and activations of a whole sequence; two ranks holding half each can.
    spec = write("auto.yaml", """\
name: auto
run: {train: {model: {preset: tiny, seq_len: 49152, vocab_size: 32000}, steps: 5}}
resources: {procs_per_node: 2, topology: cpu-only}
engine: {zero_stage: 0, sequence_parallel: auto, micro_batch: 1, activation_checkpointing: true}
""")
    prepared = prepare(spec, Mode.DRY_RUN)
    assert prepared.spec_file.spec.engine.sequence_parallel == 2
    assert prepared.memory.launch_choice.sp == 2
    resolved = next(text for path, text in prepared.plan.files.items() if path.endswith("resolved.yaml"))
    assert "sequence_parallel: 2" in resolved


def test_the_trainer_refuses_the_degree_before_starting_torch(write) -> None:
    from dsl.engine.errors import UserError
    from dsl.engine.train import load_run_spec

    spec = write("run.yaml", "run:\n  train:\n    model: {preset: tiny}\nengine:\n  sequence_parallel: 3\n"
                             "output_dir: out\n")
    with pytest.raises(UserError) as info:
        load_run_spec(spec)
    assert str(info.value).startswith(f"{spec}:5:22 engine.sequence_parallel: sequence_parallel (3) must divide "
                                      "num_attention_heads (4)")
