"""Checkpoints in one process: format, bit-identical resume per stage, cross-stage resume,
retention, refusals, and a writer SIGKILLed at random moments (20 trials).

Cross-rank-count resume (2 ranks stage 2 -> 1 rank stage 3 / 2 ranks stage 1) is in
tests/integration/test_checkpoint_resume.py; 2 writers at stage 3 (memory, kills, resume on
another rank count, stage and layout) in tests/integration/test_checkpoint_sharded.py; format
details (dtype casts, NVMe streaming, format 1) in tests/unit/test_checkpoint_format.py.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from dsl.engine import initialize
from dsl.engine.checkpoint import load_full, resolve
from dsl.engine.data import SyntheticData
from dsl.engine.errors import UserError
from dsl.engine.train_config import DataConfig, ModelConfig

try:
    from dsl.engine.model import Llama as Model
except ImportError:  # the model's former name
    from dsl.engine.model import GPT as Model

SMALL = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, seq_len=16)


def _engine(**cfg: Any):
    torch.manual_seed(0)
    return initialize(Model(SMALL), {"bucket_mib": 0.004, **cfg}, lr=1e-2)


def _data(step: int, micro: int, micro_batch: int = 4):
    data = SyntheticData(DataConfig(), vocab_size=SMALL.vocab_size, seq_len=SMALL.seq_len, micro_batch=micro_batch)
    return data.batch(step, micro)


def _train(engine, steps: range) -> list[float]:
    losses = []
    for step in steps:
        for micro in range(engine.grad_accum):
            loss = engine(*_data(step, micro))
            loss.backward()
        engine.step()
        engine.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "cfg",
    [{"zero_stage": 0}, {"zero_stage": 1, "grad_accum": 2}, {"zero_stage": 2}, {"zero_stage": 3},
     {"zero_stage": 2, "precision": "fp16", "loss_scale": {"initial_scale_power": 30, "hysteresis": 1}},
     {"zero_stage": 3, "precision": "bf16"},  # the load refreshes stage 3's bf16 working copy
     {"zero_stage": 3, "precision": "fp16", "loss_scale": {"initial_scale_power": 30, "hysteresis": 1}},
     {"zero_stage": 1, "offload": {"optimizer": "cpu"}}, {"zero_stage": 0, "optimizer": {"type": "sgd"}},
     {"zero_stage": 2, "offload": {"optimizer": "cpu", "ratio": 0.5}},
     {"zero_stage": 3, "precision": "bf16", "offload": {"optimizer": "cpu", "params": "cpu"}}],
    ids=["s0", "s1-accum2", "s2", "s3", "s2-fp16", "s3-bf16", "s3-fp16", "s1-cpu-offload", "s0-sgd",
         "s2-partial-offload", "s3-bf16-param-offload"],
)
def test_resume_on_the_same_setup_is_bit_identical(tmp_path: Path, cfg: dict[str, Any]) -> None:
    whole = _engine(**cfg)
    expected = _train(whole, range(1, 9))
    first = _engine(**cfg)
    assert _train(first, range(1, 5)) == expected[:4]
    torch.manual_seed(1234)  # RNG state at the save, restored by the load
    first.save_checkpoint(tmp_path / "ckpt", step=4, extra={"data_position": 17})
    rng_after_save = torch.rand(3)
    resumed = _engine(**cfg)
    torch.manual_seed(999)
    info = resumed.load_checkpoint(tmp_path / "ckpt")
    assert info == {"data_position": 17, "step": 4}
    assert torch.equal(torch.rand(3), rng_after_save)
    assert resumed.global_step == 4 and resumed.lr == first.lr
    if "fp16" in str(cfg):
        assert whole.skipped_steps > 0  # 2**30 overflows: the scaler state is part of the test
        assert resumed.loss_scale == first.loss_scale
    assert _train(resumed, range(5, 9)) == expected[4:]


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header, data section start) read the way the safetensors format defines them."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), 8 + n


def test_the_format_is_named_slices_and_loads_into_another_stage(tmp_path: Path) -> None:
    s3 = _engine(zero_stage=3)
    _train(s3, range(1, 4))
    path = s3.save_checkpoint(tmp_path, step=3)
    assert path == tmp_path / "step-000003"
    assert (tmp_path / "latest").read_text().strip() == "step-000003"
    rank_file = "rank-00000-of-00001.safetensors"
    assert sorted(p.name for p in path.iterdir()) == ["extra.pt", "meta.json", rank_file, "rng.pt"]
    # The rank file is in the safetensors layout: tensors back to back after the header.
    header, data = _safetensors_header(path / rank_file)
    slices = json.loads(header.pop("__metadata__")["dsl"])["slices"]
    ends = sorted(t["data_offsets"] for t in header.values())
    assert ends[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ends, ends[1:]))
    assert (path / rank_file).stat().st_size == data + ends[-1][1]
    shapes = {n: tuple(p.shape) for n, p in Model(SMALL).named_parameters()}
    assert {n: tuple(shape) for n, (start, numel, shape) in slices.items()} == shapes
    assert all(start == 0 and numel == math.prod(shapes[n]) for n, (start, numel, _) in slices.items())
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format"] == 2 and meta["optimizer"] == "adamw" and meta["optimizer_steps"] == 3
    full = load_full(tmp_path)
    assert set(full) == {"param", "exp_avg", "exp_avg_sq", "module"}
    for field in ("param", "exp_avg", "exp_avg_sq"):
        assert {n: tuple(t.shape) for n, t in full[field].items()} == shapes
    assert all(float(t.min()) >= 0 for t in full["exp_avg_sq"].values())
    # Stage 3's full tensors equal what it trains with.
    trained = s3.full_state_dict()
    assert all(torch.equal(trained[n], full["param"][n]) for n in trained)
    s0 = _engine(zero_stage=0)
    assert s0.load_checkpoint(tmp_path)["step"] == 3
    assert all(torch.equal(p, full["param"][n]) for n, p in s0.module.named_parameters())
    assert all(torch.equal(b, full["module"][n]) for n, b in s0.module.named_buffers())
    # Both continue the same way (stage 3 and stage 0 differ only in summation order).
    assert _train(s0, range(4, 7)) == pytest.approx(_train(s3, range(4, 7)), abs=1e-6)


def test_keep_retains_the_newest_and_latest_follows(tmp_path: Path) -> None:
    engine = _engine()
    for step in (1, 2, 3, 4):
        engine.save_checkpoint(tmp_path, step=step, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000003", "step-000004"]
    assert resolve(tmp_path) == tmp_path / "step-000004"
    engine.save_checkpoint(tmp_path, step=4, keep=2)  # re-saving a step replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000003", "step-000004"]


def test_load_refuses_what_it_cannot_use(tmp_path: Path) -> None:
    engine = _engine()
    with pytest.raises(UserError, match="no checkpoint in"):
        engine.load_checkpoint(tmp_path)
    engine.save_checkpoint(tmp_path, step=1)
    with pytest.raises(UserError, match="holds adamw optimizer states but this engine uses sgd"):
        _engine(optimizer={"type": "sgd"}).load_checkpoint(tmp_path)
    torch.manual_seed(0)
    other = initialize(Model(SMALL.model_copy(update={"hidden_size": 64})), {})
    with pytest.raises(UserError, match=r"has shape \([^)]*32[^)]*\) in the checkpoint, \([^)]*64[^)]*\) in this model"):
        other.load_checkpoint(tmp_path)


def test_nvme_offload_resumes_and_cleans_up(tmp_path: Path) -> None:
    cfg = {"zero_stage": 2, "offload": {"optimizer": "nvme", "nvme_path": str(tmp_path / "nvme"), "sub_group_mib": 0.01}}
    plain = _engine(zero_stage=2)
    expected = _train(plain, range(1, 7))
    first = _engine(**cfg)
    assert _train(first, range(1, 4)) == expected[:3]
    first.save_checkpoint(tmp_path / "ckpt", step=3)
    first.close()
    resumed = _engine(**cfg)
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert _train(resumed, range(4, 7)) == expected[3:]
    assert resumed.state_summary()["offload_nvme_bytes"] > 0
    resumed.close()
    assert list((tmp_path / "nvme").iterdir()) == []


# SIGKILL during writes ------------------------------------------------------------------------

BIG = ModelConfig(vocab_size=256, hidden_size=192, num_hidden_layers=2, num_attention_heads=4, seq_len=16)


def _writer(engine, directory: Path, first_step: int) -> None:
    """The forked child: checkpoints whose every parameter equals its step, forever."""
    torch.set_num_threads(1)
    step = first_step
    while True:
        with torch.no_grad():
            for p in engine.module.parameters():
                p.fill_(float(step))
        engine.save_checkpoint(directory, step=step, keep=2)
        step += 1


def test_a_writer_killed_at_random_moments_never_leaves_a_partial_latest(tmp_path: Path) -> None:
    torch.manual_seed(0)
    engine = initialize(Model(BIG), {"optimizer": {"type": "sgd"}})
    reader = initialize(Model(BIG), {"optimizer": {"type": "sgd"}})
    rng = random.Random(7)
    directory = tmp_path / "ckpt"
    last_step = 0
    interrupted = 0
    for trial in range(20):
        pid = os.fork()
        if pid == 0:  # child
            try:
                _writer(engine, directory, last_step + 1)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.02, 0.4))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        leftovers = [p.name for p in directory.glob(".*")] if directory.exists() else []
        interrupted += bool(leftovers)
        if last_step == 0 and not (directory / "latest").exists():
            continue  # killed before the first checkpoint completed
        folder = resolve(directory)
        assert folder.name == (directory / "latest").read_text().strip()
        step = reader.load_checkpoint(directory)["step"]
        assert step >= last_step
        assert all(bool((p == float(step)).all()) for p in reader.module.parameters())
        # Every step-* folder is complete (deletion renames a folder away first); keep=2 allows
        # one more while the next checkpoint is being written.
        folders = list(directory.glob("step-*"))
        assert len(folders) <= 3
        for f in folders:
            assert sorted(p.name for p in f.iterdir()) == ["extra.pt", "meta.json", "rank-00000-of-00001.safetensors",
                                                           "rng.pt"]
            load_full(f)
        last_step = step
    assert last_step >= 3  # the writer made progress between kills
    print(f"last step {last_step}, interrupted writes {interrupted}")
    assert interrupted >= 3  # and some kills landed in the middle of a write
