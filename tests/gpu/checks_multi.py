"""Part 2 of the GPU smoke checks: N ranks (torchrun, one GPU each; gloo on the CPU in the
self-test), every check in a torchrun of its own (`smoke.py --multi`).

The 1-GPU reference of a check runs on each rank's own device *before* the process group exists
(the engine then runs as a single process: no group, the device given explicitly), on the
concatenated batches of all data-parallel ranks; then the group is created and the N-rank run
is compared with it through the mean of the ranks' losses.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Any

from tests.gpu.common import (FP32_TOL, LOWP_TOL, ONEBIT_REL_TOL, QUANT_TOL, TINY, Ctx, Skip, batch, build, check,
                              compare, engine_case, model_config, reference, release, train)

PART = "multi"
SP = 2
ONEBIT_FREEZE, ONEBIT_STEPS = 3, 10
LAUNCH_DEVICES = "2,3"


def _gather(values: Any) -> list[Any]:
    """Every rank's `values`, in rank order (collective)."""
    import torch.distributed as tdist

    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, values)
    return out


def _mean_over_ranks(losses: list[float]) -> list[float]:
    """The global per-step loss: the mean of the ranks' (equal-sized) batch losses (collective)."""
    every = _gather(losses)
    return [sum(step) / len(every) for step in zip(*every)]


def _run_ranks(ctx: Ctx, cfg: dict[str, Any], **kw: Any) -> list[float]:
    """This rank's share of an N-rank run, averaged over ranks."""
    engine = build(cfg, ctx.device)
    try:
        losses = train(engine, rank=ctx.rank, **kw)
    finally:
        release(engine)
    return _mean_over_ranks(losses)


def _reference(ctx: Ctx, cfg: dict[str, Any], *, dp: int, **kw: Any) -> list[float] | None:
    """One process on this rank's device training the batches of `dp` ranks (no group yet)."""
    if ctx.dist is not None:
        raise RuntimeError("a 1-rank reference must run before the process group exists")

    def run() -> list[float]:
        engine = build(cfg, ctx.device)
        try:
            return train(engine, ranks=dp, **kw)
        finally:
            release(engine)

    return reference(ctx, json.dumps(cfg, sort_keys=True), run)


# The engine matrix on N ranks -----------------------------------------------------------------


def _matrix(ctx: Ctx, extra: dict[str, Any], tol: float) -> None:
    cases = [{"zero_stage": s, **extra} for s in range(4)]
    refs = [_reference(ctx, c, dp=ctx.world) for c in cases]
    ctx.group()
    ctx.details.update(tolerance=tol, reference="1 rank on its own device, the batches of every rank")
    for cfg, ref in zip(cases, refs):
        engine_case(ctx, f"stage{cfg['zero_stage']}", lambda cfg=cfg: _run_ranks(ctx, cfg), ref, tol, config=cfg)


@check("multi_engine_fp32", "ZeRO 0-3, fp32 on N ranks vs the 1-GPU reference", part=PART, timeout_s=300,
       launch="torchrun")
def multi_fp32(ctx: Ctx) -> None:
    _matrix(ctx, {"precision": "fp32"}, FP32_TOL)


@check("multi_engine_bf16", "ZeRO 0-3, bf16 on N ranks vs the 1-GPU reference", part=PART, timeout_s=300,
       launch="torchrun")
def multi_bf16(ctx: Ctx) -> None:
    _matrix(ctx, {"precision": "bf16"}, LOWP_TOL)


@check("multi_engine_fp16", "ZeRO 0-3, fp16 on N ranks vs the 1-GPU reference (a refusal is a skip)", part=PART,
       timeout_s=300, launch="torchrun")
def multi_fp16(ctx: Ctx) -> None:
    _matrix(ctx, {"precision": "fp16"}, LOWP_TOL)


@check("multi_engine_low_precision_states", "ZeRO 0-3, bf16 low_precision_states on N ranks vs 1 GPU", part=PART,
       timeout_s=300, launch="torchrun")
def multi_lowp(ctx: Ctx) -> None:
    _matrix(ctx, {"precision": "bf16", "low_precision_states": True}, LOWP_TOL)


# Compressed communication ---------------------------------------------------------------------


@check("multi_quantize_gradients", "int8 gradient reduce-scatter at ZeRO 2/3 on N ranks vs fp32", part=PART,
       timeout_s=300, launch="torchrun")
def multi_quantize(ctx: Ctx) -> None:
    refs = {s: _reference(ctx, {"zero_stage": s}, dp=ctx.world) for s in (2, 3)}
    ctx.group()
    for stage in (2, 3):
        plain = engine_case(ctx, f"stage{stage}-fp32", lambda stage=stage: _run_ranks(ctx, {"zero_stage": stage}),
                            refs[stage], FP32_TOL)
        cfg = {"zero_stage": stage, "comm": {"quantize_gradients": True}}
        got = engine_case(ctx, f"stage{stage}-int8", lambda cfg=cfg: _run_ranks(ctx, cfg), plain, QUANT_TOL, config=cfg)
        if got is not None and plain is not None:
            # Rounding to int8 always moves some gradient: identical losses mean the fp32 path ran.
            moved = max(abs(a - b) for a, b in zip(got, plain))
            ctx.case(f"stage{stage}-int8-path-taken", moved > 0,
                     "" if moved > 0 else "losses identical to fp32: the quantized reduce-scatter did not run",
                     max_abs_diff=moved)


@check("multi_onebit_adam", "1-bit Adam past freeze_step on N ranks: close to AdamW, compressed, ranks identical",
       part=PART, timeout_s=300, launch="torchrun")
def multi_onebit(ctx: Ctx) -> None:
    import torch

    from tests.integration.test_onebit import WIRE_RATIO

    ctx.group()
    adamw = reference(ctx, "adamw", lambda: _run_ranks(ctx, {"zero_stage": 0}, steps=ONEBIT_STEPS))
    cfg = {"zero_stage": 0, "optimizer": {"type": "onebit_adam", "freeze_step": ONEBIT_FREEZE}}
    held: dict[str, Any] = {}

    def run() -> list[float]:
        engine = build(cfg, ctx.device)
        try:
            losses = train(engine, rank=ctx.rank, steps=ONEBIT_STEPS)
            held["comm_stats"] = engine.states.comm_stats()
            with torch.no_grad():
                held["checksums"] = _gather([float(p.double().sum()) for p in engine.module.parameters()])
        finally:
            release(engine)
        return _mean_over_ranks(losses)

    ctx.details.update(freeze_step=ONEBIT_FREEZE, steps=ONEBIT_STEPS, config=cfg)
    runs: list[list[float]] = []

    def first() -> None:
        runs.append(run())
        finite = all(math.isfinite(x) for x in runs[0])
        ctx.case("runs", finite, "" if finite else "non-finite loss", losses=runs[0])

    ctx.attempt("runs", first)
    ctx.details.update(held)
    if not runs:
        return
    got = runs[0]
    if adamw is not None:
        compare(ctx, "last_loss_vs_adamw", got[-1:], adamw[-1:], ONEBIT_REL_TOL, relative=True, onebit=got,
                adamw=adamw)
    ratio = held["comm_stats"]["onebit_ratio"]
    ok = ratio <= WIRE_RATIO
    ctx.case("compressed", ok, "" if ok else f"bytes ratio {ratio:.4f} > {WIRE_RATIO:.4f}", onebit_ratio=ratio,
             max_ratio=WIRE_RATIO)
    same = all(c == held["checksums"][0] for c in held["checksums"])
    ctx.case("ranks_identical", same, "" if same else "parameters differ between ranks after compressed steps")


# Sequence parallelism -------------------------------------------------------------------------


@check("multi_sequence_parallel", "sequence_parallel 2 (Ulysses) at ZeRO 2/3 vs 1 GPU on whole sequences", part=PART,
       timeout_s=300, launch="torchrun")
def multi_sequence_parallel(ctx: Ctx) -> None:
    import torch

    if ctx.world % SP:
        raise Skip(f"sequence_parallel {SP} needs a rank count divisible by {SP}, got {ctx.world}")
    dp = ctx.world // SP
    refs = {s: _reference(ctx, {"zero_stage": s}, dp=dp) for s in (2, 3)}
    ctx.group()
    seq = model_config(TINY).seq_len
    sp_rank, dp_rank = ctx.rank % SP, ctx.rank // SP  # engine/long/groups.py's layout
    lo, hi = sp_rank * seq // SP, (sp_rank + 1) * seq // SP
    ctx.details.update(sp=SP, dp=dp, shard=[lo, hi])

    def run(cfg: dict[str, Any]) -> list[float]:
        dev = ctx.device
        engine = build(cfg, dev)
        positions = torch.arange(lo, hi, device=dev)
        losses = []
        try:
            for step in range(1, 5):
                tokens, targets = batch(TINY, step, rank=dp_rank)
                loss = engine(tokens[:, lo:hi].to(dev), targets[:, lo:hi].to(dev), positions=positions)
                loss.backward()
                engine.step()
                engine.zero_grad()
                losses.append(loss.item())
        finally:
            release(engine)
        return _mean_over_ranks(losses)  # equal shards: the mean of the shard means is the sequence mean

    for stage in (2, 3):
        cfg = {"zero_stage": stage, "sequence_parallel": SP}
        engine_case(ctx, f"stage{stage}", lambda cfg=cfg: run(cfg), refs[stage], FP32_TOL, config=cfg)


# A process group the user created -------------------------------------------------------------


@check("multi_user_group", "the script calls init_process_group itself, then dsl.engine.initialize uses that group",
       part=PART, timeout_s=300, launch="torchrun")
def multi_user_group(ctx: Ctx) -> None:
    import torch
    import torch.distributed as tdist

    ref = _reference(ctx, {"zero_stage": 2}, dp=ctx.world)
    backend = "nccl" if ctx.mode == "cuda" else "gloo"
    want = ctx.device  # sets the current CUDA device first, as a user script does
    tdist.init_process_group(backend, init_method="env://")
    engine = build({"zero_stage": 2}, None)  # no device: the engine takes the rank's device from the group
    try:
        ctx.case("engine_device", engine.device == want,
                 "" if engine.device == want else f"the engine chose {engine.device}, the rank's device is {want}",
                 engine_device=str(engine.device), backend=backend)
        ctx.case("engine_world_size", engine.world_size == ctx.world,
                 "" if engine.world_size == ctx.world else f"engine.world_size {engine.world_size} != {ctx.world}")
        losses = train(engine, rank=ctx.rank)
    finally:
        release(engine)
    got = _mean_over_ranks(losses)
    if ref is None:
        ctx.case("losses_vs_1gpu", None, "the 1-GPU reference failed")
    else:
        compare(ctx, "losses_vs_1gpu", got, ref, FP32_TOL)
    if backend == "nccl":
        tdist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        tdist.barrier()
    tdist.destroy_process_group()


# The launcher's device selection --------------------------------------------------------------

_FAKE_NVML = '''"""A stand-in for pynvml (the smoke self-test): a host with 4 GPUs."""
class NVMLError(Exception):
    pass
def nvmlInit():
    pass
def nvmlShutdown():
    pass
def nvmlDeviceGetCount():
    return 4
'''


@check("launch_visible_devices", f"CUDA_VISIBLE_DEVICES={LAUNCH_DEVICES} dsl launch SPEC --dry-run renders devices "
       f"{LAUNCH_DEVICES}", part=PART, timeout_s=120)
def launch_visible_devices(ctx: Ctx) -> None:
    spec = ctx.tmp / "job.yaml"
    (ctx.tmp / "train.py").write_text("print('not run: dry run')\n")
    spec.write_text("name: smoke-devices\nrun:\n  script: train.py\nresources:\n  backend: local\n"
                    "  procs_per_node: auto\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["CUDA_VISIBLE_DEVICES"] = LAUNCH_DEVICES
    if ctx.mode == "cpu":
        # No NVML here: a stand-in reports 4 GPUs, so the launcher takes its GPU path.
        fake = ctx.tmp / "fake_nvml"
        fake.mkdir()
        (fake / "pynvml.py").write_text(_FAKE_NVML)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(fake), env.get("PYTHONPATH")]))
        ctx.details["nvml"] = "self-test: a stand-in pynvml reporting 4 GPUs is first on PYTHONPATH"
    cmd = [sys.executable, "-m", "dsl.launcher", "launch", str(spec), "--dry-run", "--json"]
    proc = subprocess.run(cmd, cwd=ctx.tmp, env=env, capture_output=True, text=True, timeout=100)
    ctx.details.update(command=f"CUDA_VISIBLE_DEVICES={LAUNCH_DEVICES} dsl launch job.yaml --dry-run --json",
                       exit_code=proc.returncode, stderr=proc.stderr.strip()[-2000:])
    if proc.returncode != 0:
        ctx.case("dry_run", False, f"dsl launch --dry-run exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
        return
    plan = json.loads(proc.stdout)
    hosts = [{"host": h["host"], "slots": h["slots"], "cuda_visible_devices": h["env"].get("CUDA_VISIBLE_DEVICES"),
              "argv": h["argv"]} for h in plan["hosts"]]
    ctx.details["rendered"] = hosts
    seen = [h["cuda_visible_devices"] for h in hosts]
    ok = bool(seen) and all(s == LAUNCH_DEVICES for s in seen)
    ctx.case("devices_rendered", ok, "" if ok else f"rendered CUDA_VISIBLE_DEVICES {seen} (slots "
                                                   f"{[h['slots'] for h in hosts]}), expected {LAUNCH_DEVICES}: the "
                                                   "ranks would not run on the devices the user selected")
