"""ZeRO stages 0-3 across 2 real gloo ranks against a single-process reference.

The 2-rank runs start this file as a script (`python test_zero_stages.py --worker RANK STORE OUT`):
two subprocesses that meet through a FileStore in tmp_path, run every scenario of `SCENARIOS`
once (one module-scoped fixture: starting torch twice per test would dominate the time) and
torch.save what they saw; the tests compute single-process references in the pytest process
and compare.

The model is a tiny local one (`TinyLM`: tied embedding, 2 blocks in a ModuleList with
LayerNorm and biases, so there are decay and no-decay parameters, stage-3 units and a shared
parameter), so these tests do not depend on engine/model.py. `run_workers`, `TinyLM`, `batch`
and `train` are reused by test_checkpoint_resume.py.

Tolerances (measured, then given headroom):
- fp32 losses (~4.2 -> ~3) of 20 AdamW steps, 2 ranks (any stage, grad_accum 1 or 2) vs one
  process on the same global batch: 5e-6 absolute (measured <= 6e-7: only the order in which
  gradient contributions are summed differs);
- bf16 autocast vs the fp32 reference: 2e-2 absolute over 20 steps (measured 6.9e-3; bf16
  matmuls keep 8 bits); low_precision_states (bf16 parameters and states, stochastic
  rounding): 3e-2 (measured 7.4e-3).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
WORLD = 2
V, H, T = 64, 32, 16
MICRO = 4
STEPS = 20
LR = 1e-2
TIMEOUT_S = 240
FP32_TOL = 5e-6
BF16_TOL = 2e-2
LOW_PRECISION_TOL = 3e-2


# Model and data (used by the workers and the reference) -----------------------------------


def TinyLM(layers: int = 2):  # noqa: N802 - a class factory, so torch is imported lazily
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(H)
            self.fc1 = nn.Linear(H, 2 * H)
            self.fc2 = nn.Linear(2 * H, H)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.norm(x)
            # Causal running mean: a cheap way to mix positions.
            h = h.cumsum(1) / torch.arange(1, x.shape[1] + 1, dtype=h.dtype).view(1, -1, 1)
            return x + self.fc2(F.gelu(self.fc1(h)))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(V, H)
            self.pos = nn.Parameter(torch.randn(T, H) * 0.02)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.norm = nn.LayerNorm(H)
            self.head = nn.Linear(H, V, bias=False)
            self.head.weight = self.emb.weight  # tied: a parameter shared by two modules
            nn.init.normal_(self.emb.weight, std=0.05)

        def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
            x = self.emb(tokens) + self.pos[: tokens.shape[1]]
            for block in self.blocks:
                x = block(x)
            logits = self.head(self.norm(x))
            if targets is None:
                return logits
            return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    torch.manual_seed(0)
    return Model()


def batch(rank: int, step: int, micro: int, micro_batch: int = MICRO):
    """(tokens, targets) [micro_batch, T] of one rank's micro-step; targets follow a fixed rule."""
    import torch

    g = torch.Generator().manual_seed(1_000_003 * rank + 1009 * step + micro)
    tokens = torch.randint(0, V, (micro_batch, T), generator=g)
    targets = (tokens * 7 + 3) % V
    return tokens, targets


def global_batch(step: int, micro: int, ranks: int = WORLD, micro_batch: int = MICRO):
    import torch

    parts = [batch(r, step, micro, micro_batch) for r in range(ranks)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def train(engine, steps: range, data: Callable[[int, int], Any], *, hook: Callable | None = None) -> list[float]:
    """Run `steps`; per step the mean loss of this rank's micro-batches."""
    losses = []
    for step in steps:
        total = 0.0
        for micro in range(engine.grad_accum):
            loss = engine(*data(step, micro))
            loss.backward()
            total += loss.item()
        if hook is not None:
            hook(engine, step)
        engine.step()
        engine.zero_grad()
        losses.append(total / engine.grad_accum)
    return losses


def build(cfg: dict[str, Any], **kwargs: Any):
    from dsl.engine import initialize

    return initialize(TinyLM(), {"bucket_mib": 0.004, "grad_clip": None, **cfg}, lr=LR, **kwargs)


def reference(cfg: dict[str, Any], steps: int = STEPS, grad_accum: int = 1) -> tuple[list[float], Any]:
    """One process on the 2-rank global batch (grad_accum folded into the batch)."""
    import torch

    engine = build({**cfg, "zero_stage": 0, "grad_accum": 1})

    def data(step: int, _micro: int):
        parts = [global_batch(step, m) for m in range(grad_accum)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    return train(engine, range(1, steps + 1), data), engine


# Workers -------------------------------------------------------------------------------------


def _local(rank: int):
    return lambda step, micro: batch(rank, step, micro)


def scenario_losses(rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stage in (0, 1, 2, 3):
        for accum in (1, 2):
            engine = build({"zero_stage": stage, "grad_accum": accum})
            launched = []
            losses = train(engine, range(1, STEPS + 1), _local(rank),
                           hook=lambda e, s: launched.append(e.stage.collectives_launched))
            out[f"fp32-s{stage}-a{accum}"] = {
                "losses": losses,
                "params": engine.full_state_dict(),
                "launched": launched,
                "groups": len(engine.stage.layout.groups),
            }
    for stage in (0, 3):
        engine = build({"zero_stage": stage, "precision": "bf16"})
        out[f"bf16-s{stage}"] = train(engine, range(1, STEPS + 1), _local(rank))
    # Both precision layouts at stages 0-2 (engine/zero/master.py); stage 3 has one.
    for stage in (0, 1, 2):
        for layout in ("master", "autocast"):
            engine = build({"zero_stage": stage, "precision": "bf16", "precision_layout": layout})
            out[f"bf16-{layout}-s{stage}"] = train(engine, range(1, STEPS + 1), _local(rank))
            out[f"bf16-{layout}-s{stage}-dtype"] = str(engine.module.blocks[0].fc1.weight.dtype)
    for stage in (0, 1, 2, 3):
        engine = build({"zero_stage": stage, "precision": "fp16", "grad_accum": 2,
                        **({"precision_layout": "master"} if stage < 3 else {})})
        out[f"fp16-master-s{stage}"] = train(engine, range(1, STEPS + 1), _local(rank))
    engine = build({"zero_stage": 2, "precision": "bf16", "low_precision_states": True})
    out["lowp-s2"] = train(engine, range(1, STEPS + 1), _local(rank))
    return out


def scenario_clip_and_memory(rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stage in (0, 1, 2, 3):
        engine = build({"zero_stage": stage, "grad_clip": 0.05, "optimizer": {"type": "sgd"}})
        train(engine, range(1, 2), _local(rank))
        layout = engine.stage.layout
        out[f"clip-s{stage}"] = {"norm": engine.last_grad_norm, "params": engine.full_state_dict()}
        before = engine.state_summary()
        engine(*batch(rank, 1, 0))
        first = engine.state_summary()["activations_bytes"]
        engine(*batch(rank, 2, 0))
        out[f"mem-s{stage}"] = {
            "summary": before,
            "activations": [first, engine.state_summary()["activations_bytes"]],
            "group_numels": [g.numel for g in layout.groups],
            "n": sum(p.numel() for p in engine.module.parameters()),
        }
    for stage in (0, 2):
        engine = build({"zero_stage": stage})  # adamw
        out[f"adam-mem-s{stage}"] = {
            "summary": engine.state_summary(),
            "group_numels": [g.numel for g in engine.stage.layout.groups],
        }
    return out


def scenario_fp16(rank: int) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    for stage in (0, 2, 3):
        engine = build({
            "zero_stage": stage, "precision": "fp16",
            "loss_scale": {"initial_scale_power": 10, "growth_interval": 3, "hysteresis": 1},
        })  # fmt: skip
        target = engine.module.blocks[1].fc1.weight

        def inject(grad: torch.Tensor, engine=engine) -> torch.Tensor:
            # Rank 1 only, during step 3: the other rank's gradients stay finite.
            if rank == 1 and engine.global_step == 2:
                grad = grad.clone()
                grad.view(-1)[5] = float("inf")
            return grad

        target.register_hook(inject)
        record = []

        def hook(e, step):
            record.append({"before": e.full_state_dict(), "scale": e.loss_scale})

        losses = train(engine, range(1, 8), _local(rank), hook=hook)
        after = [r["before"] for r in record[1:]] + [engine.full_state_dict()]
        out[f"s{stage}"] = {
            "losses": losses,
            "scales": [r["scale"] for r in record] + [engine.loss_scale],
            "changed": [
                max(float((a[k] - b[k]).abs().max()) for k in a) for a, b in zip((r["before"] for r in record), after)
            ],
            "skipped": engine.skipped_steps,
            "optimizer_steps": engine.optimizer_steps,
        }
    return out


def scenario_offload(rank: int, nvme_root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, offload in (("none", {}), ("cpu", {"optimizer": "cpu", "sub_group_mib": 0.01}),
                          ("nvme", {"optimizer": "nvme", "sub_group_mib": 0.01, "nvme_path": nvme_root})):
        engine = build({"zero_stage": 2, "offload": offload or {"optimizer": "none"}})
        out[name] = {"losses": train(engine, range(1, 11), _local(rank)), "summary": engine.state_summary()}
        if name == "nvme":
            out["nvme_files_during"] = sorted(p.name for p in Path(nvme_root).rglob("*.bin"))
        engine.close()
    out["nvme_files_after"] = sorted(str(p) for p in Path(nvme_root).rglob("*"))
    # The master layout under offload: the offload updates the stage's fp32 master partition.
    for name, offload in (("none", {}), ("cpu", {"optimizer": "cpu", "sub_group_mib": 0.01}),
                          ("nvme", {"optimizer": "nvme", "sub_group_mib": 0.01, "nvme_path": nvme_root})):
        engine = build({"zero_stage": 2, "precision": "bf16", "precision_layout": "master",
                        "offload": offload or {"optimizer": "none"}})
        out[f"master-{name}"] = train(engine, range(1, 11), _local(rank))
        out[f"master-{name}-summary"] = engine.state_summary()
        engine.close()
    # Stage 3, bf16: under CPU offload the fp32 shard lives in host memory (the optimizer's
    # master) and only the 16-bit working copy stays on the device.
    for name, offload in (("none", {}), ("cpu", {"optimizer": "cpu", "sub_group_mib": 0.01}),
                          ("params", {"optimizer": "cpu", "params": "cpu", "sub_group_mib": 0.01})):
        engine = build({"zero_stage": 3, "precision": "bf16", "offload": offload or {"optimizer": "none"}})
        first = train(engine, range(1, 2), _local(rank))  # records the forward order
        engine.stage.timeline = timeline = []
        out[f"s3-bf16-{name}"] = first + train(engine, range(2, 11), _local(rank))
        out[f"s3-bf16-{name}-summary"] = engine.state_summary()
        out[f"s3-bf16-{name}-live"] = {"peak": engine.stage.peak_live_numel,
                                      "units": [u.group.padded for u in engine.stage.units],
                                      "resident": [u.group.padded for u in engine.stage.units if u.resident],
                                      "timeline": timeline[: 6 * len(engine.stage.units)]}
        engine.close()
    # Partial offload (offload.ratio 0.5): half of the shard space updated on the host, half on
    # the device; fp32 and bf16 (master layout), stages 1-3.
    for stage in (1, 2, 3):
        for prec in ("fp32", "bf16"):
            for name, offload in (("none", {}), ("half", {"optimizer": "cpu", "ratio": 0.5, "sub_group_mib": 0.01})):
                engine = build({"zero_stage": stage, "precision": prec, "offload": offload or {"optimizer": "none"}})
                out[f"ratio-s{stage}-{prec}-{name}"] = train(engine, range(1, 11), _local(rank))
                if name == "half":
                    out[f"ratio-s{stage}-{prec}-split"] = (engine.states.split, engine.stage.layout.shard_numel)
                engine.close()
    # fp32 stage 3 with parameter offload: the fp32 partition is host memory, gathered from there.
    for name, offload in (("none", {}), ("params", {"optimizer": "cpu", "params": "cpu", "sub_group_mib": 0.01})):
        engine = build({"zero_stage": 3, "offload": offload or {"optimizer": "none"}})
        out[f"s3-fp32-{name}"] = train(engine, range(1, 11), _local(rank))
        engine.close()
    return out


SCENARIOS = {"losses": scenario_losses, "clip_memory": scenario_clip_and_memory, "fp16": scenario_fp16}


def _worker(rank: int, store: str, out: str, names: str, tmp: str) -> None:
    import torch
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    results = {}
    for name in names.split(","):
        if name == "offload":
            results[name] = scenario_offload(rank, os.path.join(tmp, f"nvme-rank{rank}"))
        else:
            results[name] = SCENARIOS[name](rank)
    torch.save(results, out)
    tdist.barrier()
    tdist.destroy_process_group()


def run_workers(script: Path, tmp_path: Path, *args: str) -> list[dict[str, Any]]:
    """Start `script --worker RANK STORE OUT *args` on 2 ranks; return what each saved."""
    import torch

    store = tmp_path / "store"
    outs = [tmp_path / f"rank{r}.pt" for r in range(WORLD)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    procs = [
        subprocess.Popen([sys.executable, str(script), "--worker", str(r), str(store), str(outs[r]), *args],
                         env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(WORLD)
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
    return [torch.load(out, weights_only=False) for out in outs]


# Tests ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("zero")
    return run_workers(HERE, tmp, "losses,clip_memory,fp16,offload", str(tmp))


def _mean(ranks: list[dict[str, Any]], *keys: str) -> list[float]:
    runs = []
    for r in ranks:
        v = r
        for k in keys:
            v = v[k]
        runs.append(v["losses"] if isinstance(v, dict) else v)
    return [sum(xs) / len(xs) for xs in zip(*runs)]


def _max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_fp32_losses_match_one_process_on_the_global_batch(ranks, stage: int, accum: int) -> None:
    ref_losses, ref = reference({}, grad_accum=accum)
    losses = _mean(ranks, "losses", f"fp32-s{stage}-a{accum}")
    assert _max_diff(losses, ref_losses) < FP32_TOL, (losses, ref_losses)
    assert ref_losses[-1] < ref_losses[0] - 0.5  # it trained
    ref_params = {n: p.detach() for n, p in ref.module.named_parameters()}
    for r in ranks:
        params = r["losses"][f"fp32-s{stage}-a{accum}"]["params"]
        assert params.keys() == ref_params.keys()
        assert max(float((params[n] - ref_params[n]).abs().max()) for n in params) < 1e-4
    # Each rank saw its own data: its local losses differ from the global mean.
    assert _max_diff(ranks[0]["losses"][f"fp32-s{stage}-a{accum}"]["losses"], losses) > 1e-3


def test_communication_happens_on_the_right_micro_steps(ranks) -> None:
    for r in ranks:
        for stage in (0, 1):
            run = r["losses"][f"fp32-s{stage}-a2"]
            # Last micro-step only: one collective per group per optimizer step.
            assert run["launched"] == [run["groups"] * s for s in range(1, STEPS + 1)]
        for stage in (2, 3):
            run = r["losses"][f"fp32-s{stage}-a2"]
            # Every micro-step reduce-scatters every group into the partition.
            assert run["launched"] == [2 * run["groups"] * s for s in range(1, STEPS + 1)]


def test_bf16_and_low_precision_states_follow_fp32(ranks) -> None:
    ref_losses, _ = reference({})
    for stage in (0, 3):
        bf16 = _mean(ranks, "losses", f"bf16-s{stage}")
        assert 1e-6 < _max_diff(bf16, ref_losses) < BF16_TOL  # really bf16, and close
    low = _mean(ranks, "losses", "lowp-s2")
    assert _max_diff(low, ref_losses) < LOW_PRECISION_TOL
    assert low[-1] < low[0] - 0.5


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_both_precision_layouts_follow_fp32(ranks, stage: int) -> None:
    """precision_layout master (16-bit parameters, fp32 master partition) and autocast (fp32
    parameters) at stages 0-2, bf16, 2 ranks, 20 steps: within the bf16 tolerance of the fp32
    one-process reference."""
    ref_losses, _ = reference({})
    for layout, dtype in (("master", "torch.bfloat16"), ("autocast", "torch.float32")):
        got = _mean(ranks, "losses", f"bf16-{layout}-s{stage}")
        assert 1e-6 < _max_diff(got, ref_losses) < BF16_TOL, layout
        assert all(r["losses"][f"bf16-{layout}-s{stage}-dtype"] == dtype for r in ranks)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_fp16_master_layout_follows_fp32(ranks, stage: int) -> None:
    """fp16 under the master layout (stage 3: its fp32 shard + fp16 working copy), dynamic loss
    scaling, grad_accum 2, 2 ranks, 20 steps: within the bf16 tolerance of the fp32 reference."""
    ref_accum, _ = reference({}, grad_accum=2)
    fp16 = _mean(ranks, "losses", f"fp16-master-s{stage}")
    assert 1e-6 < _max_diff(fp16, ref_accum) < BF16_TOL


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_clipping_uses_the_global_norm_across_partitions(ranks, stage: int) -> None:
    import torch

    ref = build({"zero_stage": 0, "grad_clip": 0.05, "optimizer": {"type": "sgd"}})
    start = {n: p.detach().clone() for n, p in ref.module.named_parameters()}
    ref(*global_batch(1, 0)).backward()
    ref.stage.finish()
    grads = [p.grad.clone() for p in ref.module.parameters()]
    norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    assert norm > 10 * 0.05  # clipping is active
    for r in ranks:
        got = r["clip_memory"][f"clip-s{stage}"]
        assert got["norm"] == pytest.approx(norm, rel=1e-5)
        # SGD's first step moves by lr * clipped gradient: the update norm is lr * max_norm.
        update = torch.linalg.vector_norm(torch.stack([(got["params"][n] - start[n]).norm() for n in start]))
        assert float(update) == pytest.approx(LR * 0.05, rel=1e-4)


def _padded_half(numels: list[int]) -> int:
    return sum(-(-n // WORLD) for n in numels)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_state_summary_terms_are_exact_per_stage(ranks, stage: int) -> None:
    for r in ranks:
        mem = r["clip_memory"][f"mem-s{stage}"]
        s, n, numels = mem["summary"], mem["n"], mem["group_numels"]
        assert sum(numels) == n
        part = _padded_half(numels)  # elements of this rank's partition
        full = WORLD * part
        sgd_states = 4 * (n if stage == 0 else part)
        expected = {
            0: (4 * n, 4 * n),
            1: (4 * full, 4 * full + 4 * part),
            2: (4 * full, 4 * part),
            3: (4 * part, 4 * part),
        }[stage]
        assert (s["params_bytes"], s["grads_bytes"], s["optimizer_states_bytes"]) == (*expected, sgd_states)
        assert s["offload_cpu_bytes"] == s["offload_nvme_bytes"] == 0
        # Saved activations: measured, positive, the same for the same shapes, every stage alike.
        first, second = mem["activations"]
        assert first == second > 0
        assert first == ranks[0]["clip_memory"]["mem-s0"]["activations"][0]
    a0 = ranks[0]["clip_memory"]["adam-mem-s0"]["summary"]["optimizer_states_bytes"]
    a2 = ranks[0]["clip_memory"]["adam-mem-s2"]
    assert a0 == 8 * ranks[0]["clip_memory"]["mem-s0"]["n"]
    assert a2["summary"]["optimizer_states_bytes"] == 8 * _padded_half(a2["group_numels"])
    assert a0 / 2 <= a2["summary"]["optimizer_states_bytes"] <= a0 / 2 + 8 * len(a2["group_numels"])


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_fp16_overflow_on_one_rank_skips_the_step_everywhere_and_halves_the_scale(ranks, stage: int) -> None:
    runs = [r["fp16"][f"s{stage}"] for r in ranks]
    for run in runs:
        # Steps 1-7, scale 2**10 at the start; step 3 overflows on rank 1 only.
        assert run["scales"] == [1024.0, 1024.0, 1024.0, 512.0, 512.0, 512.0, 512.0, 1024.0]
        assert run["changed"][2] == 0.0  # the skipped step left every parameter unchanged
        assert all(c > 0 for i, c in enumerate(run["changed"]) if i != 2)
        assert run["skipped"] == 1 and run["optimizer_steps"] == 6
        assert all(math.isfinite(x) for x in run["losses"])
    assert runs[0]["losses"] != runs[1]["losses"]


def test_cpu_and_nvme_offload_give_the_losses_of_no_offload(ranks) -> None:
    for r in ranks:
        off = r["offload"]
        assert off["cpu"]["losses"] == off["none"]["losses"]
        assert off["nvme"]["losses"] == off["none"]["losses"]
        assert off["cpu"]["summary"]["optimizer_states_bytes"] == 0
        assert off["cpu"]["summary"]["offload_cpu_bytes"] > off["none"]["summary"]["optimizer_states_bytes"]
        assert off["nvme"]["summary"]["offload_nvme_bytes"] == 1.5 * off["none"]["summary"]["optimizer_states_bytes"]
        assert len(off["nvme_files_during"]) > 2  # several sub-groups
        assert off["nvme_files_after"] == []  # close() deleted the files and folders
        # bf16, master layout: the same fp32 update on the same master values, bit for bit.
        assert off["master-cpu"] == off["master-none"] and off["master-nvme"] == off["master-none"]
        assert off["s3-bf16-cpu"] == off["s3-bf16-none"]
        # What stays on the device under CPU offload: the 16-bit parameters, no gradient, no
        # master (engine/zero/base.py host_states); stage 3: the 16-bit working-copy shard only.
        for key, none in (("master-cpu-summary", "master-none-summary"), ("s3-bf16-cpu-summary", "s3-bf16-none-summary")):
            cpu, dev = off[key], off[none]
            assert cpu["grads_bytes"] == 0 < dev["grads_bytes"]
            assert cpu["optimizer_states_bytes"] == 0
        assert off["master-cpu-summary"]["params_bytes"] == off["master-none-summary"]["params_bytes"]
        assert off["s3-bf16-cpu-summary"]["params_bytes"] * 3 == off["s3-bf16-none-summary"]["params_bytes"]
        # Parameter offload (stage 3, offload.params: cpu): the same losses, bit for bit, and only
        # gathered units on the device: between steps nothing, during one at most the root and
        # resident units plus the running and the prefetched unit.
        assert off["s3-bf16-params"] == off["s3-bf16-none"] and off["s3-fp32-params"] == off["s3-fp32-none"]
        for stage in (1, 2, 3):
            for prec in ("fp32", "bf16"):
                assert off[f"ratio-s{stage}-{prec}-half"] == off[f"ratio-s{stage}-{prec}-none"], (stage, prec)
                split, total = off[f"ratio-s{stage}-{prec}-split"]
                assert 0 < split < total and abs(split / total - 0.5) < 0.05
        summary = off["s3-bf16-params-summary"]
        assert summary["params_bytes"] == summary["grads_bytes"] == summary["optimizer_states_bytes"] == 0
        live = off["s3-bf16-params-live"]
        layers = sorted(set(live["units"]) - set(live["resident"]))
        cap = live["units"][0] + sum(live["resident"]) + 2 * max(layers)
        assert 0 < live["peak"] <= cap
        # Prefetch (step 2, after the first forward recorded the order): each unit's gather is
        # issued before the forward of the unit before it ends.
        assert_each_gather_issued_ahead(live["timeline"], at_least=2)


def assert_each_gather_issued_ahead(events: list, at_least: int) -> None:
    """Stage 3's timeline (engine/zero/stage3.py `timeline`): each unit's first gather is issued
    before the forward of the unit before it ends; at least `at_least` units ran."""
    order: list[int] = []
    for e, u, _ in events:
        if e == "forward" and u not in order:
            order.append(u)
    first_at = lambda kind, unit: next(t for e, u, t in events if e == kind and u == unit)  # noqa: E731
    assert len(order) >= at_least
    for a, b in zip(order, order[1:]):
        assert first_at("gather", b) < first_at("forward_end", a), (a, b)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    sys.path.insert(0, str(REPO))
    _worker(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6])
