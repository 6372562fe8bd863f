"""Sliced checkpoints written by 2 gloo ranks (engine/checkpoint.py, format 2): each rank writes
its own partition, a save or load holds at most one sub-group beyond the rank's own state, a
SIGKILL during a 2-writer save leaves the previous checkpoint loadable, and a stage-3 checkpoint
resumes on 1 rank, at stage 2, and in the other precision layout.

The workers are this file run as a script (`run_workers` of test_zero_stages.py), one
invocation per scenario: `resume` (TinyLM, 20 steps, saved at step 10) and `memory`, which needs
a process whose malloc returns freed memory (see below), so it runs alone. The writers killed by
SIGKILL are forked from the test process (no torch import per trial), 10-20 trials.

Memory is measured, not computed: each rank resets its peak resident set (`echo 5 >
/proc/self/clear_refs`), records VmRSS, runs the save (or load), and reads VmHWM; extra = VmHWM -
VmRSS before. So that no allocation can hide in memory malloc kept from earlier (which the
engine's default `cpu_allocator: reuse` would do), the memory workers use `cpu_allocator:
system` and set glibc's mmap threshold to 64 KiB: every tensor allocation of 64 KiB or more is
fresh pages, counted when touched. The kernel's RSS counters are per-CPU and read approximately
(up to 64 pages, 256 KiB, off on this 2-CPU machine), so the sub-group is 4 MiB: its 10% margin
is above that error. The first save and load of a process also pay one-time
Python and gloo set-up (~0.4 MiB, measured), so the asserted figures are the second ones; both
are printed. The control: `gather_full` (what format 1's save did) measured the same way must
show rank 0 holding the whole model and optimizer state, proving the meter sees such copies.
Measured here (Wide model: 4 x Linear(2048, 2048), 67 MB per field, stage 3, AdamW, 2 ranks,
96 MiB of parameters and states per rank, sub_group_mib 4): second save +40..56 KiB without
offload (the slices go to the file straight from the tensors), +3.8..3.9 MiB with NVMe offload
(one sub-group staged from the offload's files); second load +0..4 KiB / +3.8..3.9 MiB; first
save +0.4 MiB / +3.9 MiB; the format-1 gather +240 MiB on rank 0 (full state: 192 MiB).

Tolerances: fp32 resumes are compared bit for bit on the next step's loss (the restored weights
are the same bits and the forward is the same arithmetic); later steps of a resume on another
rank count or stage differ in gradient summation order only: 1e-5 (as test_checkpoint_resume.py).
bf16 across layouts: the fp32 master values bit for bit, losses within 2e-2 (the layouts round
different tensors to bf16; test_zero_stages.py's BF16_TOL).
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.integration.test_zero_stages import BF16_TOL, WORLD, batch, build, run_workers, train

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve()
STEPS, SAVE_AT = 20, 10
TOL = 1e-5
SUB_GROUP_MIB = 4.0
MIB = 1 << 20


def Wide(blocks: int = 4, width: int = 2048):  # noqa: N802 - a class factory, torch imported lazily
    """Linear layers in a ModuleList (one stage-3 unit each): MiBs of state in few parameters."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for b in self.blocks:
                x = torch.tanh(b(x))
            return (x * x).mean()

    torch.manual_seed(0)
    return Net()


# Workers ---------------------------------------------------------------------------------------


def _save_and_continue(cfg: dict[str, Any], rank: int, ckpt: str, out: dict[str, Any], key: str) -> None:
    data = lambda step, micro: batch(rank, step, micro)  # noqa: E731
    engine = build(cfg)
    losses = []
    for step in range(1, STEPS + 1):
        losses += train(engine, range(step, step + 1), data)
        if step == SAVE_AT:
            engine.save_checkpoint(ckpt, step=step, extra={"key": key})
            out[f"{key}-at-save"] = engine.full_state_dict()
    out[f"{key}-uninterrupted"] = losses


def _resume(cfg: dict[str, Any], rank: int, ckpt: str, out: dict[str, Any], name: str) -> None:
    engine = build(cfg)
    out[f"{name}-info"] = engine.load_checkpoint(ckpt)
    out[f"{name}-loaded"] = engine.full_state_dict()
    out[name] = train(engine, range(SAVE_AT + 1, STEPS + 1), lambda step, micro: batch(rank, step, micro))


def scenario_resume(rank: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    fp32 = f"{root}/fp32-s3"
    _save_and_continue({"zero_stage": 3}, rank, fp32, out, "fp32")
    _resume({"zero_stage": 3}, rank, fp32, out, "fp32-to-s3")
    _resume({"zero_stage": 2}, rank, fp32, out, "fp32-to-s2")
    # bf16 at stage 3 holds the fp32 master partition: resumed in the autocast layout (fp32
    # parameters) at stage 2 and in the master layout (bf16 parameters) at stage 1.
    bf16 = f"{root}/bf16-s3"
    _save_and_continue({"zero_stage": 3, "precision": "bf16"}, rank, bf16, out, "bf16")
    for name, stage, layout in (("bf16-to-autocast-s2", 2, "autocast"), ("bf16-to-master-s1", 1, "master")):
        _resume({"zero_stage": stage, "precision": "bf16", "precision_layout": layout}, rank, bf16, out, name)
    # Stage 0: replicated, each rank writes half; NVMe offload: states streamed from its files.
    nvme = {"optimizer": "nvme", "sub_group_mib": 0.01, "nvme_path": f"{root}/nvme-{rank}"}
    for name, cfg, other_cfg in (("s0", {"zero_stage": 0}, {"zero_stage": 3, "offload": nvme}),
                                 ("nvme", {"zero_stage": 2, "offload": nvme}, {"zero_stage": 0})):
        engine = build(cfg)
        train(engine, range(1, 4), lambda step, micro: batch(rank, step, micro))
        engine.save_checkpoint(f"{root}/{name}", step=3)
        out[f"{name}-saved"] = engine.full_state_dict()
        out[f"{name}-saver-next"] = train(engine, range(4, 5), lambda step, micro: batch(rank, step, micro))
        engine.close()
        other = build(other_cfg)
        other.load_checkpoint(f"{root}/{name}")
        out[f"{name}-reloaded"] = other.full_state_dict()
        out[f"{name}-next"] = train(other, range(4, 5), lambda step, micro: batch(rank, step, micro))
        other.close()
    return out


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_extra_bytes(fn: Any) -> int:
    """Peak resident memory above the start while `fn()` runs (see the module docstring)."""
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _rss("VmRSS:")
    fn()
    return _rss("VmHWM:") - before


def _fresh_pages_malloc() -> None:
    """glibc: serve every block of 64 KiB or more with fresh pages and give them back on free."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    assert libc.mallopt(M_MMAP_THRESHOLD, 64 << 10) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 128 << 10) == 1


def scenario_memory(rank: int, root: str) -> dict[str, Any]:
    import torch

    from dsl.engine import initialize
    from dsl.engine.checkpoint import gather_full

    _fresh_pages_malloc()
    out: dict[str, Any] = {}
    for offload in ("none", "nvme"):
        off: dict[str, Any] = {"optimizer": offload, "sub_group_mib": SUB_GROUP_MIB}
        if offload == "nvme":
            off["nvme_path"] = f"{root}/nvme-{rank}"
        engine = initialize(Wide(), {"zero_stage": 3, "cpu_allocator": "system", "offload": off}, lr=1e-3)
        g = torch.Generator().manual_seed(rank)
        for _ in range(2):
            engine(torch.randn(8, 2048, generator=g)).backward()
            engine.step()
            engine.zero_grad()
        ckpt = f"{root}/mem-{offload}"
        saves = [peak_extra_bytes(lambda s=s: engine.save_checkpoint(ckpt, step=s, keep=1)) for s in (1, 2)]
        loads = [peak_extra_bytes(lambda: engine.load_checkpoint(ckpt)) for _ in range(2)]
        gather = peak_extra_bytes(lambda: gather_full(engine, optimizer=True, keep=rank == 0))
        numel = sum(p.numel() for p in Wide().parameters())
        fields = 1 + len(engine.states.names)
        out[offload] = {"save": saves, "load": loads, "gather": gather, "full_state_bytes": fields * numel * 4,
                        "own_state_bytes": fields * engine.stage.layout.shard_numel * 4}
        print(f"rank {rank} offload {offload}: save extra {[round(b / MIB, 3) for b in saves]} MiB, load extra "
              f"{[round(b / MIB, 3) for b in loads]} MiB, format-1 gather {gather / MIB:.1f} MiB, own state "
              f"{out[offload]['own_state_bytes'] / MIB:.1f} MiB, sub-group {SUB_GROUP_MIB} MiB", flush=True)
        engine.close()
    return out


def _worker(rank: int, store: str, out: str, name: str, root: str) -> None:
    import torch
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    results = {"resume": scenario_resume, "memory": scenario_memory}[name](rank, root)
    torch.save(results, out)
    tdist.barrier()
    tdist.destroy_process_group()


def _fill_and_save_forever(rank: int, store: str, directory: str, first_step: int) -> None:
    """A killed writer (forked from the test process): stage 3, every parameter and optimizer
    state element equal to the step of the checkpoint that holds it."""
    import torch
    import torch.distributed as tdist

    from dsl.engine import initialize

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    engine = initialize(Wide(blocks=4, width=768), {"zero_stage": 3}, lr=1e-3)
    step = first_step
    while True:
        with torch.no_grad():
            for g in engine.stage.layout.groups:
                engine.stage.param_part(g).fill_(float(step))
            for k in engine.states.names:
                engine.states.read(k).fill_(float(step))
        engine.save_checkpoint(directory, step=step, keep=2)
        step += 1


# Tests -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resume(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    tmp = tmp_path_factory.mktemp("sharded")
    return run_workers(HERE, tmp, "resume", str(tmp)), tmp


def _global(ranks: list[dict[str, Any]], key: str) -> list[float]:
    return [sum(v) / len(v) for v in zip(*(r[key] for r in ranks))]


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return set(a) == set(b) and all(a[n].dtype == b[n].dtype and bool((a[n] == b[n]).all()) for n in a)


def test_each_rank_writes_only_its_own_partition(resume) -> None:
    import json

    from dsl.engine.ckpt_files import RankFile
    from dsl.engine.checkpoint import load_full

    ranks, tmp = resume
    folder = tmp / "fp32-s3" / f"step-{SAVE_AT:06d}"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["extra.pt", "meta.json", "rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors",
                     "rng.pt"]
    full = load_full(folder)["param"]
    assert _same(full, ranks[0]["fp32-at-save"])
    covered = {n: 0 for n in full}
    for r in range(WORLD):
        f = RankFile(folder / f"rank-{r:05d}-of-00002.safetensors")
        slices = json.loads(f.metadata["dsl"])["slices"]
        for n, (start, numel, shape) in slices.items():
            covered[n] += numel
            assert f.tensors[f"param/{n}"][1] == [numel] and f.tensors[f"exp_avg/{n}"][1] == [numel]
        f.close()
    # Every element in exactly one file: the two files hold complementary halves.
    assert covered == {n: t.numel() for n, t in full.items()}
    sizes = [(folder / f"rank-{r:05d}-of-00002.safetensors").stat().st_size for r in range(WORLD)]
    assert max(sizes) < 0.6 * sum(sizes)
    # Stage 0: replicated, the two ranks split the model between their files.
    s0 = tmp / "s0" / "step-000003"
    s0_sizes = [(s0 / f"rank-{r:05d}-of-00002.safetensors").stat().st_size for r in range(WORLD)]
    assert max(s0_sizes) < 0.6 * sum(s0_sizes)
    assert _same(load_full(s0)["param"], ranks[0]["s0-saved"])


def test_same_ranks_and_stage_resume_bit_identically(resume) -> None:
    ranks, _ = resume
    for r in ranks:
        assert r["fp32-to-s3-info"] == {"key": "fp32", "step": SAVE_AT}
        assert _same(r["fp32-to-s3-loaded"], r["fp32-at-save"])
        assert r["fp32-to-s3"] == r["fp32-uninterrupted"][SAVE_AT:]


def test_stage_3_resumes_at_stage_2_with_the_same_next_step_loss(resume) -> None:
    ranks, _ = resume
    for r in ranks:
        assert _same(r["fp32-to-s2-loaded"], r["fp32-at-save"])
        assert r["fp32-to-s2"][0] == r["fp32-uninterrupted"][SAVE_AT]  # bit-identical
    got, expected = _global(ranks, "fp32-to-s2"), _global(ranks, "fp32-uninterrupted")[SAVE_AT:]
    assert max(abs(a - b) for a, b in zip(got, expected)) < TOL


def test_two_ranks_resume_on_one_rank_with_the_same_next_step_loss(resume) -> None:
    """1 rank at stage 3 with grad_accum 2: micro-step m is rank m's batch of the 2-rank run."""
    import torch

    ranks, tmp = resume
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' setting: the same forward arithmetic
    try:
        engine = build({"zero_stage": 3, "grad_accum": 2})
        assert engine.load_checkpoint(tmp / "fp32-s3")["step"] == SAVE_AT
        assert _same(engine.full_state_dict(), ranks[0]["fp32-at-save"])
        micro_losses = []
        for micro in range(2):
            loss = engine(*batch(micro, SAVE_AT + 1, 0))
            loss.backward()
            micro_losses.append(loss.item())
        engine.step()
        engine.zero_grad()
        assert micro_losses == [r["fp32-uninterrupted"][SAVE_AT] for r in ranks]  # bit-identical
        later = train(engine, range(SAVE_AT + 2, STEPS + 1), lambda step, micro: batch(micro, step, 0))
    finally:
        torch.set_num_threads(threads)
    expected = _global(ranks, "fp32-uninterrupted")[SAVE_AT + 1 :]
    assert max(abs(a - b) for a, b in zip(later, expected)) < TOL


def test_master_layout_resumes_in_the_autocast_layout(resume) -> None:
    ranks, _ = resume
    expected = _global(ranks, "bf16-uninterrupted")[SAVE_AT:]
    for name in ("bf16-to-autocast-s2", "bf16-to-master-s1"):
        for r in ranks:
            assert _same(r[f"{name}-loaded"], r["bf16-at-save"]), name  # the fp32 master values
        got = _global(ranks, name)
        assert abs(got[0] - expected[0]) < BF16_TOL
        assert max(abs(a - b) for a, b in zip(got, expected)) < BF16_TOL


def test_nvme_offloaded_states_and_stage_0_slices_load_anywhere(resume) -> None:
    ranks, _ = resume
    for r in ranks:
        assert _same(r["s0-reloaded"], r["s0-saved"])  # stage 0 (2 writers) -> stage 3 + NVMe
        assert _same(r["nvme-reloaded"], r["nvme-saved"])  # stage 2 + NVMe -> stage 0
        assert r["s0-next"] == r["s0-saver-next"] and r["nvme-next"] == r["nvme-saver-next"]


@pytest.fixture(scope="module")
def memory(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("sharded-memory")
    return run_workers(HERE, tmp, "memory", str(tmp))


def test_a_save_or_load_holds_at_most_one_sub_group_beyond_the_rank_state(memory) -> None:
    bound = 1.1 * SUB_GROUP_MIB * MIB
    for rank, r in enumerate(memory):
        for offload in ("none", "nvme"):
            m = r[offload]
            assert m["own_state_bytes"] > 10 * bound  # the model is large enough for the bound to matter
            assert m["save"][1] <= bound, (rank, offload, m)
            assert m["load"][1] <= bound, (rank, offload, m)
            # The meter sees a gathered copy: format 1's save held the whole state on rank 0.
            if rank == 0:
                assert m["gather"] >= 0.9 * m["full_state_bytes"]
        # NVMe: states are read sub-group by sub-group from the offload's files (one buffer).
        assert 0.5 * SUB_GROUP_MIB * MIB < r["nvme"]["save"][1]


class _Writer:
    """One forked writer rank (fork: no second torch import per trial); `wait(timeout_s)`
    returns its exit code (1: an exception ended it), None while it runs."""

    def __init__(self, rank: int, store: Path, directory: Path, first_step: int) -> None:
        self.pid = os.fork()
        if self.pid == 0:  # child: saves until killed; an exception ends it with 1
            try:
                _fill_and_save_forever(rank, str(store), str(directory), first_step)
            finally:
                os._exit(1)
        self.code: int | None = None

    def poll(self) -> int | None:
        if self.code is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.code = os.waitstatus_to_exitcode(status)
        return self.code

    def wait(self, timeout_s: float) -> int | None:
        deadline = time.monotonic() + timeout_s
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.code

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.wait(60)


def _latest_step(directory: Path) -> int:
    try:
        return int((directory / "latest").read_text().strip().split("-")[1])
    except (OSError, IndexError, ValueError):
        return 0


def test_a_sigkill_during_a_two_rank_save_leaves_the_previous_checkpoint_loadable(tmp_path: Path) -> None:
    """Trials until 4 kills landed while the ranks were writing their files (at least 10, at
    most 20). The writers save as fast as they can; once a save is in its writing phase (a rank file
    exists in a `.tmp-*` folder), wait 0-50 ms at random, then SIGKILL both writers (even trials)
    or rank 1 alone (odd: rank 0 must then fail its save by itself, committing nothing). After
    each, the newest complete checkpoint must load, every value equal to its step."""
    from dsl.engine import initialize
    from dsl.engine.checkpoint import resolve

    reader = initialize(Wide(blocks=4, width=768), {"zero_stage": 0})
    rng = random.Random(11)
    directory = tmp_path / "ckpt"
    last, interrupted, trial = 0, 0, 0
    while trial < 10 or (interrupted < 4 and trial < 20):
        writers = [_Writer(r, tmp_path / f"store-{trial}", directory, last + 1) for r in range(WORLD)]
        try:
            deadline = time.monotonic() + 120
            # This trial's first checkpoint, then a save that is writing.
            while _latest_step(directory) <= last or not any(directory.glob(".tmp-*/rank-*")):
                assert time.monotonic() < deadline and all(w.poll() is None for w in writers), "a writer died"
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.05))
            if trial % 2 == 0:
                for w in writers:
                    os.kill(w.pid, signal.SIGKILL)
            else:
                os.kill(writers[1].pid, signal.SIGKILL)
                assert writers[0].wait(60) == 1  # its save failed: no hang, no commit
        finally:
            for w in writers:
                w.kill()
        interrupted += any(any(p.glob("rank-*")) for p in directory.glob(".tmp-*"))
        folder = resolve(directory)
        step = reader.load_checkpoint(directory)["step"]
        assert folder.name == f"step-{step:06d}" and step > last
        assert all(bool((p == float(step)).all()) for p in reader.module.parameters())
        assert all(bool((reader.states.read(k) == float(step)).all()) for k in reader.states.names)
        for f in directory.glob("step-*"):  # every step-* folder is complete
            assert sorted(p.name for p in f.iterdir()) == [
                "extra.pt", "meta.json", "rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors", "rng.pt"]
        last = step
        trial += 1
    print(f"last step {last}, trials that left a partial 2-writer folder: {interrupted} of {trial}")
    assert interrupted >= 4


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6])
