"""Gradients reduced in bf16 (`engine.comm.reduce_dtype: bf16`) across 2 real gloo ranks.

The ranks run this file as a script (`--worker RANK STORE OUT`, started by test_zero_stages'
`run_workers`) and torch.save what they saw; the tests compare in the pytest process.

What is checked at every stage 0-3 (test_zero_stages' TinyLM, fp32 training): from the same
weights and data, the reduced gradient the optimizer sees is made of bf16 values and within 1%
(relative L2) of the fp32 reduction's, not equal to it (the setting applies); over 20 AdamW steps
(lr 1e-2) the losses of the two runs stay within LOSS_TOL of each other.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.integration.test_zero_stages import STEPS, WORLD, batch, build, run_workers, train

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve()
LOSS_TOL = 2e-2
STAGES = (0, 1, 2, 3)


def _worker(rank: int, store: str, out: str) -> None:
    import torch
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    results: dict[str, Any] = {}

    def local(step: int, micro: int):
        return batch(rank, step, micro)

    for stage in STAGES:
        for dtype in ("fp32", "bf16"):
            engine = build({"zero_stage": stage, "comm": {"reduce_dtype": dtype}})
            assert engine.stage.reduce_dtype == (torch.bfloat16 if dtype == "bf16" else None)
            results[f"s{stage}-{dtype}"] = train(engine, range(1, STEPS + 1), local)
            engine.close()
            # A fresh engine (the same initial weights), one backward on this rank's data, reduced:
            # the gradient its optimizer would see.
            engine = build({"zero_stage": stage, "comm": {"reduce_dtype": dtype}})
            engine(*batch(rank, 0, 0)).backward()
            engine.stage.finish()
            results[f"grad-s{stage}-{dtype}"] = engine.stage.grad_flat.detach().clone()
            engine.close()
    torch.save(results, out)
    tdist.barrier()
    tdist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_workers(HERE, tmp_path_factory.mktemp("reduce-dtype"))


@pytest.mark.parametrize("stage", STAGES)
def test_bf16_reduction_trains_like_fp32_and_is_applied(ranks, stage):
    for r in ranks:
        fp32, bf16 = r[f"s{stage}-fp32"], r[f"s{stage}-bf16"]
        diff = max(abs(a - b) for a, b in zip(fp32, bf16))
        print(f"stage {stage}: losses {fp32[0]:.4f} -> {fp32[-1]:.4f}; max |bf16 - fp32| {diff:.2e}")
        assert bf16[-1] < bf16[0] - 0.5  # it trains
        assert diff <= LOSS_TOL
        assert fp32 != bf16  # the reduction did run in bf16


@pytest.mark.parametrize("stage", STAGES)
def test_bf16_reduced_gradient_is_the_fp32_one_within_bf16_rounding(ranks, stage):
    import torch

    for r in ranks:
        exact, low = r[f"grad-s{stage}-fp32"], r[f"grad-s{stage}-bf16"]
        assert exact.dtype == low.dtype == torch.float32  # cast back into the fp32 buffer
        assert not torch.equal(exact, low)
        rel = float((low - exact).norm() / exact.norm())
        print(f"stage {stage}: relative L2 difference of the reduced gradient {rel:.2e}")
        assert rel < 1e-2  # bf16 keeps 8 significant bits: ~2^-9 per rounding
        # What came back went through bf16: every element is a bf16 value.
        assert torch.equal(low.to(torch.bfloat16).float(), low)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(int(sys.argv[2]), sys.argv[3], sys.argv[4])
