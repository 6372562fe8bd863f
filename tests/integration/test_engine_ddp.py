"""The engine across 2 real gloo ranks: gradients are averaged, communication only on the boundary,
and the demo trainer runs end to end under torchrun.

The 2-rank runs start this file as a script (`python test_engine_ddp.py --worker RANK ...`): two
subprocesses that meet through a FileStore in tmp_path (no port to pick, so no race with tests
running in parallel). Each worker saves what it saw with torch.save; the test process computes
the single-process reference and compares.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
WORLD_SIZE = 2
MODEL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, seq_len=16)
MICRO_BATCH = 4
BUCKET_MIB = 0.004  # ~4 KiB: many buckets, so ordering and overlap are exercised
TIMEOUT_S = 120


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


# Worker (runs in the subprocesses) -------------------------------------------------------


def _build(engine_cfg: dict[str, Any]):
    import torch

    from dsl.engine import initialize
    from dsl.engine.train_config import ModelConfig
    from dsl.engine.model import GPT

    torch.manual_seed(0)
    return initialize(GPT(ModelConfig(**MODEL)), {"bucket_mib": BUCKET_MIB, **engine_cfg}, lr=0.1)


def _batches(rank: int, n: int):
    from dsl.engine.train_config import DataConfig
    from dsl.engine.data import SyntheticData

    data = SyntheticData(
        DataConfig(), vocab_size=MODEL["vocab_size"], seq_len=MODEL["seq_len"], micro_batch=MICRO_BATCH, rank=rank
    )
    return [data.batch(1, m) for m in range(n)]


def _worker(rank: int, store: str, out: str) -> None:
    import torch
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    calls: list[dict[str, Any]] = []
    engine = None
    real_all_reduce = tdist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        calls.append({"numel": tensor.numel(), "during_backward": engine.reducer._in_backward})
        return real_all_reduce(tensor, *args, **kwargs)

    results: dict[str, Any] = {}
    # Scenario 1: one micro-step per optimizer step.
    engine = _build({"optimizer": {"type": "sgd"}, "grad_clip": None})
    tdist.all_reduce = counting_all_reduce
    (x, y), = _batches(rank, 1)
    engine(x, y).backward()
    engine.step()
    results["ga1"] = {
        "params": [p.detach().clone() for p in engine.module.parameters()],
        "grads": [p.grad.clone() for p in engine.module.parameters()],
        "calls": list(calls),
        "buckets": len(engine.reducer.buckets),
    }
    # Scenario 2: grad_accum 2, with clipping; count collectives after each backward.
    tdist.all_reduce = real_all_reduce
    calls.clear()
    engine = _build({"optimizer": {"type": "sgd"}, "grad_clip": 0.5, "grad_accum": 2})
    tdist.all_reduce = counting_all_reduce
    calls_after_backward = []
    for x, y in _batches(rank, 2):
        engine(x, y).backward()
        calls_after_backward.append(len(calls))
    engine.step()
    calls_after_step = len(calls)
    results["ga2"] = {
        "params": [p.detach().clone() for p in engine.module.parameters()],
        "grad_norm": engine.last_grad_norm,
        "calls_after_backward": calls_after_backward,
        "calls_after_step": calls_after_step,
        "buckets": len(engine.reducer.buckets),
        "calls": list(calls),
    }
    tdist.all_reduce = real_all_reduce
    torch.save(results, out)
    tdist.barrier()
    tdist.destroy_process_group()


# Tests ------------------------------------------------------------------------------------


def _run_workers(tmp_path: Path) -> list[dict[str, Any]]:
    import torch

    store = tmp_path / "store"
    outs = [tmp_path / f"rank{r}.pt" for r in range(WORLD_SIZE)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE), "--worker", str(r), str(store), str(outs[r])],
            env=_env(),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(WORLD_SIZE)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} exited {p.returncode}:\n{log}"
    return [torch.load(out) for out in outs]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _run_workers(tmp_path_factory.mktemp("ddp"))


def _reference(batches, engine_cfg: dict[str, Any]):
    """One single-process step on the concatenation of `batches`."""
    import torch

    engine = _build(engine_cfg)
    engine(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])).backward()
    engine.step()
    return engine


def _assert_all_close(a, b, atol: float) -> None:
    import torch

    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def test_two_ranks_average_gradients_like_one_process_on_both_batches(ranks: list[dict[str, Any]]) -> None:
    cfg = {"optimizer": {"type": "sgd"}, "grad_clip": None}
    ref = _reference(_batches(0, 1) + _batches(1, 1), cfg)
    ref_params = [p.detach() for p in ref.module.parameters()]
    for rank in ranks:
        _assert_all_close(rank["ga1"]["grads"], [p.grad for p in ref.module.parameters()], atol=1e-7)
        _assert_all_close(rank["ga1"]["params"], ref_params, atol=1e-6)
    _assert_all_close(ranks[0]["ga1"]["params"], ranks[1]["ga1"]["params"], atol=1e-6)
    # The comparison can fail: rank 0's batch alone, or the sum instead of the mean, differ.
    alone = _reference(_batches(0, 1), cfg)
    assert _max_diff(ranks[0]["ga1"]["params"], [p.detach() for p in alone.module.parameters()]) > 1e-3
    initial = [p.detach() for p in _build(cfg).module.parameters()]
    summed = [p0 - 2 * (p0 - p1) for p0, p1 in zip(initial, ref_params)]
    assert _max_diff(ranks[0]["ga1"]["params"], summed) > 1e-3


def test_one_all_reduce_per_bucket_mostly_during_backward(ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        ga1 = rank["ga1"]
        n_buckets = ga1["buckets"]
        assert n_buckets > 5
        assert len(ga1["calls"]) == n_buckets
        assert sum(c["numel"] for c in ga1["calls"]) == sum(p.numel() for p in ga1["params"])
        # Launched from the gradient hooks while backward still ran (overlap), not after it.
        assert sum(c["during_backward"] for c in ga1["calls"]) >= n_buckets - 1


def test_grad_accum_communicates_only_on_the_boundary(ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        ga2 = rank["ga2"]
        assert ga2["calls_after_backward"] == [0, ga2["buckets"]]
        assert ga2["calls_after_step"] == ga2["buckets"]  # step() only waits


def test_grad_accum_two_ranks_equal_one_process_on_all_four_micro_batches(ranks: list[dict[str, Any]]) -> None:
    cfg = {"optimizer": {"type": "sgd"}, "grad_clip": 0.5}
    ref = _reference(_batches(0, 2) + _batches(1, 2), cfg)
    for rank in ranks:
        _assert_all_close(rank["ga2"]["params"], [p.detach() for p in ref.module.parameters()], atol=1e-6)
        assert rank["ga2"]["grad_norm"] == pytest.approx(ref.last_grad_norm, rel=1e-5)
    assert ranks[0]["ga2"]["grad_norm"] > 0.5  # clipping was active in this comparison
    _assert_all_close(ranks[0]["ga2"]["params"], ranks[1]["ga2"]["params"], atol=1e-6)


PROGRESS_RE = re.compile(
    r"step (\d+)/(\d+) \| loss (\d+\.\d{4}) \| lr \d\.\d\de[-+]\d\d \| [\d,]+ tok/s \| eta \d+:\d\d"
)


def test_train_end_to_end_with_torchrun_two_ranks(tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: e2e\nhosts: {localhost: 2}\n"
        "run:\n  command: ignored-by-the-engine\n  train:\n    steps: 30\n    log_every: 10\n"
        "engine:\n  micro_batch: 8\n  bucket_mib: 0.1\n  scheduler: {warmup_steps: 5}\n"
        f"output_dir: {out_dir}\n"
    )
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
        "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0",
        "-m", "dsl.engine.train", str(spec),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    progress = [m for m in map(PROGRESS_RE.fullmatch, lines) if m]
    assert [(m.group(1), m.group(2)) for m in progress] == [("10", "30"), ("20", "30"), ("30", "30")]
    assert len([line for line in lines if line.startswith("step ")]) == 3  # only rank 0 prints
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert [float(m.group(3)) for m in progress] == pytest.approx([r["loss"] for r in rows], abs=5e-5)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    assert re.search(r"world size\s*│\s*2\b", proc.stdout)
    assert re.search(r"tokens seen\s*│\s*30,720\b", proc.stdout)  # 30 steps x 2 ranks x 8 x 64
    first = float(re.search(r"first loss\s*│\s*([\d.]+)", proc.stdout).group(1))
    assert first > rows[-1]["loss"] and abs(first - 5.545) < 0.1  # ~ln(256) at step 1
    # The default cpu_allocator (auto) re-executed each rank with jemalloc preloaded
    # (engine/cpu_alloc.py), and each rank's peak resident set (less the libraries' file pages,
    # engine/peak.py) is within 10% of the plan's peak.
    assert "malloc: jemalloc" in proc.stderr, proc.stderr
    for row in rows:
        assert all(abs(p / row["predicted_peak_bytes"] - 1) <= 0.10 for p in row["host_peak_anon_bytes"]), row
        assert all(a < r for a, r in zip(row["host_peak_anon_bytes"], row["host_peak_rss_bytes"])), row


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(int(sys.argv[2]), sys.argv[3], sys.argv[4])
