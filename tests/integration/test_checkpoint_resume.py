"""A checkpoint saved by 2 gloo ranks at ZeRO stage 2 resumes anywhere.

The workers (2 ranks, this file run as a script) train 20 steps at stage 2 and save at step 10
without stopping; then resume from that checkpoint at stage 2 (must be bit-identical to the
uninterrupted run) and at stage 1 (same losses up to fp32 summation order). The pytest process
resumes it with 1 rank at stage 3 with grad_accum 2: the two micro-batches are the two ranks'
batches, so the global batch is the same.

Tolerance for a resume on a different rank count or stage: 1e-5 absolute on the loss (measured
~1e-6; only the order of gradient sums differs).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.integration.test_zero_stages import WORLD, batch, build, run_workers, train

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve()
STEPS, SAVE_AT = 20, 10
TOL = 1e-5


def _worker(rank: int, store: str, out: str, ckpt: str) -> None:
    import torch
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)

    def data(step: int, micro: int):
        return batch(rank, step, micro)

    def save(engine, step: int) -> None:
        if step == SAVE_AT:
            engine.save_checkpoint(ckpt, step=step, extra={"note": "stage 2"}, keep=2)

    results: dict[str, Any] = {}
    engine = build({"zero_stage": 2})
    losses = []
    for step in range(1, STEPS + 1):
        losses += train(engine, range(step, step + 1), data)
        save(engine, step)
    results["uninterrupted"] = losses
    results["final"] = engine.full_state_dict()
    for stage in (2, 1):
        resumed = build({"zero_stage": stage})
        results[f"info-s{stage}"] = resumed.load_checkpoint(ckpt)
        results[f"resumed-s{stage}"] = train(resumed, range(SAVE_AT + 1, STEPS + 1), data)
        results[f"final-s{stage}"] = resumed.full_state_dict()
    # bf16 under the master layout (16-bit parameters, fp32 master partition; engine/zero/master.py):
    # the checkpoint holds the fp32 master, so it resumes bit-identically in the same layout and
    # in the autocast layout or at stage 3 with the same master values.
    master_ckpt = ckpt + "-master"
    bf16 = {"zero_stage": 2, "precision": "bf16", "precision_layout": "master"}
    engine = build(bf16)
    losses = []
    for step in range(1, STEPS + 1):
        losses += train(engine, range(step, step + 1), data)
        if step == SAVE_AT:
            engine.save_checkpoint(master_ckpt, step=step)
            results["master-at-save"] = engine.full_state_dict()
    results["master-uninterrupted"] = losses
    for name, cfg in (("master-s2", bf16), ("master-to-autocast-s1", {**bf16, "zero_stage": 1,
                                                                     "precision_layout": "autocast"}),
                      ("master-to-s3", {**bf16, "zero_stage": 3, "precision_layout": None})):
        resumed = build(cfg)
        resumed.load_checkpoint(master_ckpt)
        results[f"{name}-loaded"] = resumed.full_state_dict()
        results[name] = train(resumed, range(SAVE_AT + 1, STEPS + 1), data)
    torch.save(results, out)
    tdist.barrier()
    tdist.destroy_process_group()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    tmp = tmp_path_factory.mktemp("resume")
    ckpt = tmp / "checkpoints"
    return run_workers(HERE, tmp, str(ckpt)), ckpt


def _global(ranks: list[dict[str, Any]], key: str) -> list[float]:
    return [sum(v) / len(v) for v in zip(*(r[key] for r in ranks))]


def test_same_ranks_and_stage_resume_bit_identically(run) -> None:
    ranks, ckpt = run
    for r in ranks:
        assert r["info-s2"] == {"note": "stage 2", "step": SAVE_AT}
        assert r["resumed-s2"] == r["uninterrupted"][SAVE_AT:]
        assert all(bool((r["final-s2"][n] == r["final"][n]).all()) for n in r["final"])
    assert (ckpt / "latest").read_text().strip() == f"step-{SAVE_AT:06d}"


def test_two_ranks_at_stage_1_continue_like_the_uninterrupted_run(run) -> None:
    ranks, _ = run
    expected = _global(ranks, "uninterrupted")[SAVE_AT:]
    got = _global(ranks, "resumed-s1")
    assert max(abs(a - b) for a, b in zip(got, expected)) < TOL
    assert got[-1] < _global(ranks, "uninterrupted")[0] - 0.5  # the run had trained


def test_one_rank_at_stage_3_with_grad_accum_continues_like_the_uninterrupted_run(run) -> None:
    ranks, ckpt = run
    engine = build({"zero_stage": 3, "grad_accum": 2})  # no process group: one rank
    assert engine.load_checkpoint(ckpt)["step"] == SAVE_AT
    assert engine.global_step == SAVE_AT
    # Micro-step m of the single rank is rank m's batch of the 2-rank run.
    losses = train(engine, range(SAVE_AT + 1, STEPS + 1), lambda step, micro: batch(micro, step, 0))
    expected = _global(ranks, "uninterrupted")[SAVE_AT:]
    assert max(abs(a - b) for a, b in zip(losses, expected)) < TOL
    final = engine.full_state_dict()
    assert max(float((final[n] - ranks[0]["final"][n]).abs().max()) for n in final) < 1e-4


def test_master_layout_checkpoint_resumes_in_any_layout(run) -> None:
    """bf16 at stage 2 under the master layout, saved at step 10: the fp32 master weights come
    back exactly in every layout and stage; the same layout continues bit-identically; the
    autocast layout at stage 1 and stage 3 continue within the bf16 layouts' difference."""
    ranks, _ = run
    for r in ranks:
        saved = r["master-at-save"]
        for name in ("master-s2", "master-to-autocast-s1", "master-to-s3"):
            loaded = r[f"{name}-loaded"]
            assert all(loaded[n].dtype == saved[n].dtype and bool((loaded[n] == saved[n]).all()) for n in saved), name
        assert r["master-s2"] == r["master-uninterrupted"][SAVE_AT:]
    expected = _global(ranks, "master-uninterrupted")[SAVE_AT:]
    for name in ("master-to-autocast-s1", "master-to-s3"):
        got = _global(ranks, name)
        assert got[0] == pytest.approx(expected[0], abs=2e-2)  # the next step: the same weights
        assert max(abs(a - b) for a, b in zip(got, expected)) < 2e-2


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
