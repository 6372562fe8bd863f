"""The trainer (`python -m dsl.engine.train`, started by torchrun) with engine.sequence_parallel 2
on 2 ranks trains like 1 rank: same samples, each rank its half of every sequence (data.py), the
same losses in metrics.jsonl for 20 steps. The model has grouped-query attention (4 heads, 2 kv
heads) and the run uses ZeRO-2, so the data path, the groups, the all-to-alls and the gradient
average over sequence shards are all exercised as a user runs them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_train_ranks import _losses, _run, _spec

pytestmark = pytest.mark.integration

TOL = 2e-5  # fp32 losses ~4.9 -> ~3.5; only the order of gradient sums differs


def test_sp2_on_two_ranks_matches_one_rank_through_the_trainer(tmp_path: Path) -> None:
    engine = "  micro_batch: 4\n  zero_stage: 2\n"
    one = _spec(tmp_path, "one", tmp_path / "one", steps=20, engine=engine)
    two = _spec(tmp_path, "two", tmp_path / "two", steps=20, engine=engine + "  sequence_parallel: 2\n")
    _run(one, 1, tmp_path)
    proc = _run(two, 2, tmp_path)
    assert "sequence-parallel 2" in proc.stderr
    ref, sp = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(ref) == sorted(sp) == list(range(1, 21))
    diff = max(abs(ref[s] - sp[s]) for s in ref)
    assert diff <= TOL, f"max loss difference {diff:.2e}\nsp1 {ref}\nsp2 {sp}"
    assert ref[20] < ref[1] - 0.3  # it trained
