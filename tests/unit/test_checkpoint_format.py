"""Sliced checkpoints (format 2) in one process: who writes which elements (writer ranges of
several saving ranks, computed on meta-device layouts), dtype changes on load, NVMe-offloaded
states streamed through the offload's files, partially offloaded states (`ratio`), refusals of incomplete folders, a failing writer,
and format-1 folders that still load.

Multi-rank saves (memory, kills, other rank counts) are in
tests/integration/test_checkpoint_sharded.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from dsl.engine import ckpt_slices, initialize
from dsl.engine.checkpoint import _rng_state, gather_full, load_full
from dsl.engine.data import SyntheticData
from dsl.engine.errors import RunError, UserError
from dsl.engine.model import Llama as Model
from dsl.engine.train_config import DataConfig, ModelConfig
from dsl.engine.zero.layout import Layout

SMALL = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, seq_len=16)


def _engine(**cfg: Any):
    torch.manual_seed(0)
    return initialize(Model(SMALL), {"bucket_mib": 0.004, **cfg}, lr=1e-2)


def _train(engine, steps: range) -> list[float]:
    data = SyntheticData(DataConfig(), vocab_size=SMALL.vocab_size, seq_len=SMALL.seq_len, micro_batch=4)
    losses = []
    for step in steps:
        for micro in range(engine.grad_accum):
            loss = engine(*data.batch(step, micro))
            loss.backward()
        engine.step()
        engine.zero_grad()
        losses.append(loss.item())
    return losses


def _meta_layout(shapes: list[list[tuple[int, ...]]], parts: int) -> Layout:
    groups = [[(f"g{i}.p{j}", torch.empty(s, device="meta")) for j, s in enumerate(g)] for i, g in enumerate(shapes)]
    return Layout(groups, parts=parts, rank=0)


@pytest.mark.parametrize("parts,writers", [(1, 1), (1, 3), (1, 4), (2, 2), (3, 3)])
def test_every_element_has_exactly_one_writer(parts: int, writers: int) -> None:
    layout = _meta_layout([[(5, 3), (7,)], [(1,)], [(4, 4), (2,), (3, 5)]], parts)
    owner: dict[str, list[int]] = {s.name: [-1] * s.numel for g in layout.groups for s in g.slots}
    for w in range(writers):
        for g, lo, hi in ckpt_slices.writer_ranges(layout, w, writers):
            for slot in g.slots:
                for x in range(max(lo, slot.offset), min(hi, slot.offset + slot.numel)):
                    assert owner[slot.name][x - slot.offset] == -1
                    owner[slot.name][x - slot.offset] = w
    assert all(w >= 0 for o in owner.values() for w in o)
    # SavedIndex finds the same writers for any element range a loading rank asks for.
    index = ckpt_slices.SavedIndex(layout, writers)
    rng = random.Random(0)
    for name, o in owner.items():
        for _ in range(10):
            a = rng.randrange(len(o))
            b = rng.randrange(a, len(o)) + 1
            got = [(w, x) for w, start, n, _ in index.sources(name, a, b - a) for x in range(start, start + n)]
            assert got == [(o[x], x) for x in range(a, b)]
    if parts == 1 and writers > 1:  # stage 0: the replicated model split into near-equal ranges
        sizes = [sum(hi - lo for _, lo, hi in ckpt_slices.writer_ranges(layout, w, writers)) for w in range(writers)]
        assert max(sizes) - min(sizes) <= 1


def test_low_precision_states_load_into_fp32_and_back(tmp_path: Path) -> None:
    """bf16 values (low_precision_states) are cast on the way in: into fp32 in memory and into
    fp32 NVMe-offloaded states (through the staging buffer, chunk by chunk)."""
    low = _engine(zero_stage=2, precision="bf16", low_precision_states=True)
    _train(low, range(1, 3))
    low.save_checkpoint(tmp_path / "low", step=2)
    saved = load_full(tmp_path / "low")
    assert {t.dtype for t in saved["param"].values()} == {torch.bfloat16}
    nvme = {"optimizer": "nvme", "nvme_path": str(tmp_path / "nvme"), "sub_group_mib": 0.001}
    for cfg in ({"zero_stage": 3}, {"zero_stage": 1, "offload": nvme}):
        fp32 = _engine(**cfg)
        fp32.load_checkpoint(tmp_path / "low")
        fp32.save_checkpoint(tmp_path / "fp32", step=2)
        again = load_full(tmp_path / "fp32")
        for field in ("param", "exp_avg", "exp_avg_sq"):
            assert all(torch.equal(again[field][n], t.float()) for n, t in saved[field].items()), (cfg, field)
        fp32.close()
    back = _engine(zero_stage=2, precision="bf16", low_precision_states=True)
    back.load_checkpoint(tmp_path / "fp32")
    assert all(torch.equal(t, saved["param"][n]) for n, t in back.full_state_dict().items())


@pytest.mark.parametrize("offload", ["nvme", "ratio"])
def test_offloaded_states_are_read_and_written_by_range(tmp_path: Path, offload: str) -> None:
    """Neither the save nor the load moves a whole state through `states.read/write`: NVMe
    states go through the sub-group files by range (sub-groups of 1 KiB: many chunks); a partial
    offload (`ratio`) through its host and device parts."""
    if offload == "nvme":
        off = {"optimizer": "nvme", "nvme_path": str(tmp_path / "nvme"), "sub_group_mib": 0.001}
    else:
        off = {"optimizer": "cpu", "ratio": 0.5, "sub_group_mib": 0.001}
    cfg = {"zero_stage": 2, "offload": off}
    expected = _train(_engine(zero_stage=2), range(1, 7))
    first = _engine(**cfg)
    assert _train(first, range(1, 4)) == expected[:3]

    def whole(*args: Any) -> None:
        raise AssertionError("a whole optimizer state went through memory")

    first.states.read = first.states.write = whole
    first.save_checkpoint(tmp_path / "ckpt", step=3)
    first.close()
    resumed = _engine(**cfg)
    resumed.states.read = resumed.states.write = whole
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert _train(resumed, range(4, 7)) == expected[3:]
    resumed.close()
    plain = _engine(zero_stage=1)  # and the slices are the same as without offload
    plain.load_checkpoint(tmp_path / "ckpt")
    assert _train(plain, range(4, 7)) == pytest.approx(expected[3:], abs=1e-6)


def test_incomplete_or_mixed_folders_are_refused(tmp_path: Path) -> None:
    engine = _engine(zero_stage=1)
    folder = engine.save_checkpoint(tmp_path / "a", step=1)
    rank_file = folder / ckpt_slices.file_name(0, 1)
    rank_file.rename(tmp_path / "aside")
    with pytest.raises(UserError, match="rank-00000-of-00001.safetensors is missing: the checkpoint is incomplete"):
        _engine(zero_stage=1).load_checkpoint(tmp_path / "a")
    # A rank file of a differently partitioned save (2 ranks would split these slices).
    (tmp_path / "aside").rename(rank_file)
    meta = json.loads((folder / "meta.json").read_text())
    meta["layout"]["parts"], meta["writers"] = 2, 2
    (folder / "meta.json").write_text(json.dumps(meta))
    rank_file.rename(folder / ckpt_slices.file_name(0, 2))
    rank_file.with_name(ckpt_slices.file_name(1, 2)).write_bytes((folder / ckpt_slices.file_name(0, 2)).read_bytes())
    with pytest.raises(UserError, match="does not match meta.json's layout"):
        _engine(zero_stage=1).load_checkpoint(tmp_path / "a")
    meta["format"] = 7
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="checkpoint format 7 is not one this version reads"):
        _engine(zero_stage=1).load_checkpoint(tmp_path / "a")


def test_a_failing_writer_fails_the_save_and_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    engine = _engine(zero_stage=2)
    engine.save_checkpoint(tmp_path, step=1)

    def full_disk(*args: Any, **kwargs: Any) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_slices, "write_rank", full_disk)
    with pytest.raises(RunError, match="writing checkpoint .*step-000002 failed: .*No space left on device"):
        engine.save_checkpoint(tmp_path, step=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000001"]  # no leftovers


def _save_format_1(engine, root: Path, step: int) -> None:
    """What dsl's format-1 save wrote (rank 0, full tensors), for a one-process engine."""
    params, optim = gather_full(engine, optimizer=True)
    model = dict(params)
    model.update({n: b.detach().clone() for n, b in engine.module.named_buffers()})
    folder = root / f"step-{step:06d}"
    folder.mkdir(parents=True)
    torch.save(model, folder / "model.pt")
    torch.save({"type": engine.hyper.kind, "step": engine.optimizer_steps, "state": optim}, folder / "optimizer.pt")
    torch.save([_rng_state(engine.device)], folder / "rng.pt")
    torch.save({"data_position": 5}, folder / "extra.pt")
    meta = {"format": 1, "step": step, "global_step": engine.global_step, "optimizer_steps": engine.optimizer_steps,
            "skipped_steps": 0, "world_size": 1, "zero_stage": engine.stage.stage, "precision": "fp32",
            "low_precision_states": False, "optimizer": engine.hyper.kind, "loss_scale": None,
            "config": engine.config.model_dump(mode="json")}
    (folder / "meta.json").write_text(json.dumps(meta))
    (root / "latest").write_text(folder.name + "\n")


def test_format_1_checkpoints_still_resume_bit_identically(tmp_path: Path) -> None:
    expected = _train(_engine(zero_stage=2), range(1, 7))
    old = _engine(zero_stage=2)
    _train(old, range(1, 4))
    _save_format_1(old, tmp_path, step=3)
    resumed = _engine(zero_stage=3)
    assert resumed.load_checkpoint(tmp_path) == {"data_position": 5, "step": 3}
    assert _train(resumed, range(4, 7)) == pytest.approx(expected[3:], abs=1e-6)
    same = _engine(zero_stage=2)
    same.load_checkpoint(tmp_path)
    assert _train(same, range(4, 7)) == expected[3:]
    with pytest.raises(UserError, match="format 1 holds full tensors already"):
        load_full(tmp_path)
