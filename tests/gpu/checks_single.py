"""Part 1 of the GPU smoke checks: one process on one GPU (a 1-rank NCCL group), or the CPU with
gloo in the self-test (`smoke.py --device cpu`).

Every engine check first runs its reference on the CPU *before* the process group exists (a plain
single process, as `python script.py` runs the engine), then creates the 1-rank group
(`ctx.group()`, dsl.engine.dist.setup) and runs the same cases on the device. In the self-test
the "device" is the CPU as well, so those comparisons are expected to agree almost exactly: they
prove the harness and the code paths, not the GPU kernels.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.gpu.checks_memory import activation_checkpointing, memory_model, tiled
from tests.gpu.common import (COMPILE_TOL, FP32_TOL, LOWP_TOL, ONEBIT_REL_TOL, SAME_TOL, TINY, Ctx, Skip, build, check,
                              compare, engine_case, first_line, helper, reference, release, train)

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "tests" / "gpu" / "smoke.py"
PART = "single"

NVML_MEMORY_TOL = 0.02
"""NVML's total memory vs torch's total_memory of the same GPU, relative: NVML also counts memory
the driver keeps for itself (an 80 GB H100: 81,559 MiB in nvidia-smi, ~81,090 MiB in torch)."""


ONEBIT_FREEZE, ONEBIT_STEPS = 2, 8


def _cpu():
    import torch

    return torch.device("cpu")


def _run(cfg: dict[str, Any], device, model: dict[str, Any] = TINY, **kw: Any) -> list[float]:
    """Losses of a fresh engine trained on `device`; the engine is closed afterwards."""
    engine = build(cfg, device, model)
    try:
        return train(engine, model, **kw)
    finally:
        release(engine)


def _label(cfg: dict[str, Any]) -> str:
    return json.dumps(cfg, sort_keys=True, separators=(",", ":"))


def _sh(cmd: list[str], **kw: Any) -> tuple[int | None, str]:
    """(exit code, output) of a command, or (None, why it could not run)."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, first_line(exc)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


# 1. Environment -------------------------------------------------------------------------------


@check("env", "record torch, CUDA, triton, the C compiler, nvidia-smi -L and the devices torch sees",
       part=PART, timeout_s=120)
def env(ctx: Ctx) -> None:
    import platform

    import torch

    d = ctx.details
    d["python"] = sys.version.split()[0]
    d["platform"] = platform.platform()
    d["torch"] = torch.__version__
    d["torch_cuda"] = torch.version.cuda
    d["triton"] = None
    for dist_name in ("triton", "pytorch-triton"):  # the second: torch's nightly/ROCm wheels
        try:
            d["triton"] = importlib.metadata.version(dist_name)
            break
        except importlib.metadata.PackageNotFoundError:
            pass
    rc, out = _sh(["cc", "--version"])
    d["cc"] = out.splitlines()[0] if rc == 0 and out else None
    d["cc_error"] = None if d["cc"] else out
    rc, out = _sh(["nvidia-smi", "-L"])
    d["nvidia_smi"] = out.splitlines() if rc == 0 else None
    d["nvidia_smi_error"] = None if rc == 0 else (out or f"exit {rc}")
    d["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    d["cuda_available"] = torch.cuda.is_available()
    d["device_count"] = torch.cuda.device_count()
    d["devices"] = []
    for i in range(d["device_count"]):
        p = torch.cuda.get_device_properties(i)
        d["devices"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                             "total_memory_bytes": p.total_memory})
    rc, out = _sh(["git", "rev-parse", "HEAD"], cwd=REPO)
    d["git_commit"] = out if rc == 0 else None
    rc, out = _sh(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO)
    d["git_dirty"] = bool(out) if rc == 0 else None

    if ctx.mode == "cuda":
        ctx.case("cuda_device", d["device_count"] > 0, "" if d["device_count"] else "torch sees no CUDA device",
                 device_count=d["device_count"])
        ctx.case("triton_installed", d["triton"] is not None, "" if d["triton"] else "triton is not installed")
    else:
        ctx.case("cuda_device", None, "self-test: GPUs are hidden (CUDA_VISIBLE_DEVICES='')")
        ctx.case("triton_installed", d["triton"] is not None or None,
                 "" if d["triton"] else "triton is not installed (the self-test runs without it)")
    # Triton compiles a small C launcher with the system compiler the first time a kernel runs.
    ctx.case("c_compiler", d["cc"] is not None, "" if d["cc"] else f"no C compiler: {d['cc_error']}")


# 2. Triton Adam -------------------------------------------------------------------------------


@check("triton_adam", "pytest -m gpu tests/unit/test_triton_adam.py (self-test: its interpreted tests)",
       part=PART, timeout_s=900)
def triton_adam(ctx: Ctx) -> None:
    marker = "gpu" if ctx.mode == "cuda" else "not gpu"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker,
           "tests/unit/test_triton_adam.py"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=850)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    summary = next((ln for ln in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|error)", ln)), "")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)}
    ctx.details.update(command=" ".join(cmd[1:]), exit_code=proc.returncode, summary=summary, counts=counts,
                       output_tail="\n".join(lines[-40:]))
    passed = counts.get("passed", 0)
    ok = proc.returncode == 0 and passed > 0
    ctx.case("pytest", ok, "" if ok else f"exit {proc.returncode}: {summary or 'no summary line'}", **counts)


# 3. NVML probe vs torch -----------------------------------------------------------------------


@check("nvml_probe", "dsl.topology's NVML probe (GPU count, memory) against torch.cuda", part=PART, timeout_s=120)
def nvml_probe(ctx: Ctx) -> None:
    import torch

    from dsl.topology.gpus import count_gpus
    from dsl.topology.probe import probe_local

    counted = count_gpus()
    topo, _ = probe_local()
    n_torch = torch.cuda.device_count()
    accs = [{"index": a.index, "name": a.name, "memory_bytes": a.memory_bytes, "uuid": a.uuid,
             "compute_capability": a.compute_capability} for a in topo.accelerators]
    ctx.details.update(count_gpus={"count": counted.count, "reason": counted.reason}, probe_gpu_reason=topo.gpu_reason,
                       probe_accelerators=accs, torch_device_count=n_torch,
                       cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    ctx.case("count_gpus_vs_torch", counted.count == n_torch,
             "" if counted.count == n_torch else f"count_gpus() {counted.count} ({counted.reason}) != "
                                                 f"torch.cuda.device_count() {n_torch}")
    if os.environ.get("CUDA_VISIBLE_DEVICES") not in (None, "") and ctx.mode == "cuda":
        ctx.case("probe_vs_torch", None, "CUDA_VISIBLE_DEVICES narrows torch's view, not the host probe's")
    else:
        ok = len(accs) == n_torch
        ctx.case("probe_vs_torch", ok, "" if ok else f"probe_local() found {len(accs)} GPU(s) ({topo.gpu_reason}), "
                                                     f"torch {n_torch}")
    by_uuid = {str(a["uuid"]).removeprefix("GPU-"): a for a in accs if a["uuid"]}
    for i in range(n_torch):
        props = torch.cuda.get_device_properties(i)
        uuid = str(getattr(props, "uuid", "") or "")
        acc = by_uuid.get(uuid) or (accs[i] if i < len(accs) and not os.environ.get("CUDA_VISIBLE_DEVICES") else None)
        if acc is None or acc["memory_bytes"] is None:
            ctx.case(f"memory_gpu{i}", False, f"no NVML answer for torch device {i} (uuid {uuid or '?'})")
            continue
        rel = abs(acc["memory_bytes"] - props.total_memory) / acc["memory_bytes"]
        ctx.case(f"memory_gpu{i}", rel <= NVML_MEMORY_TOL,
                 "" if rel <= NVML_MEMORY_TOL else f"NVML {acc['memory_bytes']} vs torch {props.total_memory} bytes",
                 nvml_bytes=acc["memory_bytes"], torch_bytes=props.total_memory, relative_diff=rel,
                 tol=NVML_MEMORY_TOL)


# 4. The engine matrix -------------------------------------------------------------------------


def _matrix(ctx: Ctx, extra: dict[str, Any], tol: float) -> None:
    """ZeRO stages 0-3 with `extra` on the device against the same on the CPU."""
    cases = [{"zero_stage": s, **extra} for s in range(4)]
    refs = [reference(ctx, _label(c), lambda c=c: _run(c, _cpu())) for c in cases]
    ctx.group()
    ctx.details["tolerance"] = tol
    for cfg, ref in zip(cases, refs):
        engine_case(ctx, f"stage{cfg['zero_stage']}", lambda cfg=cfg: _run(cfg, ctx.device), ref, tol, config=cfg)


@check("engine_fp32", "ZeRO 0-3, fp32: the tiny Llama on the device vs the same on the CPU; + TF32 at ZeRO 0",
       part=PART, timeout_s=300)
def engine_fp32(ctx: Ctx) -> None:
    _matrix(ctx, {"precision": "fp32"}, FP32_TOL)
    # The engine's default on CUDA: TensorFloat-32 matmuls, against IEEE fp32 on the CPU.
    ieee = next((c.get("reference") for c in ctx.cases if c["name"] == "stage0"), None)
    cfg = {"zero_stage": 0, "precision": "fp32", "tf32": True}
    engine_case(ctx, "stage0-tf32", lambda: _run(cfg, ctx.device), ieee, LOWP_TOL, config=cfg,
                note=None if ctx.mode == "cuda" else "no effect on a CPU device")


@check("engine_bf16", "ZeRO 0-3, bf16 autocast: device vs CPU", part=PART, timeout_s=300)
def engine_bf16(ctx: Ctx) -> None:
    _matrix(ctx, {"precision": "bf16"}, LOWP_TOL)


@check("engine_fp16", "ZeRO 0-3, fp16 + loss scaling: device vs CPU (a refusal is recorded as a skip)",
       part=PART, timeout_s=300)
def engine_fp16(ctx: Ctx) -> None:
    _matrix(ctx, {"precision": "fp16"}, LOWP_TOL)


@check("engine_low_precision_states", "ZeRO 0-3, bf16 with low_precision_states: device vs CPU",
       part=PART, timeout_s=300)
def engine_lowp(ctx: Ctx) -> None:
    _matrix(ctx, {"precision": "bf16", "low_precision_states": True}, LOWP_TOL)


# 5. Optimizer offload -------------------------------------------------------------------------


@check("offload", "optimizer offload to CPU and NVMe (a temp folder) vs none, ZeRO 2 and 3; pinned host buffers",
       part=PART, timeout_s=300)
def offload(ctx: Ctx) -> None:
    ctx.group()
    dev = ctx.device
    nvme = ctx.tmp / "nvme"
    ctx.details["nvme_path"] = str(nvme)
    # On CUDA, offload.pin_memory (default true) makes the host buffers page-locked and the copies
    # asynchronous; "unpinned" runs the synchronous path too. On the CPU there is nothing to pin.
    kinds = [("cpu", True), ("nvme", True)] + ([("cpu", False)] if ctx.mode == "cuda" else [])
    for stage, precision, tol in ((2, "fp32", FP32_TOL), (3, "fp32", FP32_TOL), (2, "bf16", LOWP_TOL)):
        base = {"zero_stage": stage, "precision": precision}
        plain = reference(ctx, _label(base), lambda base=base: _run(base, dev))
        for kind, pin in kinds:
            cfg = {**base, "offload": {"optimizer": kind, "sub_group_mib": 0.1, "pin_memory": pin,
                                       **({"nvme_path": str(nvme)} if kind == "nvme" else {})}}
            held: dict[str, Any] = {}

            def run(cfg=cfg, held=held) -> list[float]:
                engine = build(cfg, dev)
                try:
                    losses = train(engine)
                    held.update(engine.state_summary())
                    if ctx.mode == "cuda":
                        held["pinned"] = _pinned(engine.states)
                    return losses
                finally:
                    release(engine)

            name = f"stage{stage}-{precision}-{kind}" + ("" if pin else "-unpinned")
            engine_case(ctx, name, run, plain, tol, config=cfg, state_summary=held)
            if not held:
                continue
            term = "offload_cpu_bytes" if kind == "cpu" else "offload_nvme_bytes"
            moved = held.get(term, 0)  # the states did leave the device (what stays is recorded, not judged)
            ctx.case(f"{name}-{term}", moved > 0, "" if moved > 0 else f"state_summary() reports {term} {moved}",
                     **{term: moved, "device_optimizer_states_bytes": held.get("optimizer_states_bytes")})
            if ctx.mode == "cuda":
                ok = held["pinned"] is pin
                ctx.case(f"{name}-pinned", ok, "" if ok else f"engine.states.pinned is {held['pinned']}, "
                                                             f"offload.pin_memory {pin}", pinned=held["pinned"])
            elif pin and kind == "cpu" and stage == 2 and precision == "fp32":
                ctx.case("pinned_host_buffers", None, "the CPU self-test has no accelerator to pin memory for "
                                                      "(pin_memory() needs one); the offload cases above ran unpinned")


def _pinned(states: Any) -> bool | None:
    """Whether an offload's host buffers are page-locked, asked of the buffers themselves (its
    tensor attributes and lists of tensors on the host); None when it holds none. CUDA only:
    is_pinned() needs an accelerator."""
    import torch

    found = []
    for value in vars(states).values():
        for t in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                found.append(t)
    return all(t.is_pinned() for t in found) if found else None


# 6. Activation checkpointing and offload (body: checks_memory.py) ---------------------------

check("activation_checkpointing", "activation checkpointing, then + activation offload, at seq 2048 vs neither",
      part=PART, timeout_s=600)(activation_checkpointing)


# 7. Tiled loss / MLP (body: checks_memory.py) -------------------------------------------------

check("tiled", "tiled loss, tiled MLP and both vs plain (losses; memory recorded)", part=PART, timeout_s=600)(tiled)


# 8. Compile -----------------------------------------------------------------------------------


@check("compile", "engine.compile: true at ZeRO 0 and 3 vs eager", part=PART, timeout_s=900)
def compile_check(ctx: Ctx) -> None:
    if ctx.mode == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        raise Skip("no C++ compiler: inductor's CPU backend needs one")
    ctx.group()
    dev = ctx.device
    for stage in (0, 3):
        eager = reference(ctx, f"stage{stage}-eager", lambda stage=stage: _run({"zero_stage": stage}, dev))
        held: dict[str, Any] = {}

        def run(stage=stage, held=held) -> list[float]:
            engine = build({"zero_stage": stage, "compile": True}, dev)
            held["compiled_blocks"] = list(engine.compiled)
            try:
                return train(engine)
            finally:
                release(engine)

        engine_case(ctx, f"stage{stage}", run, eager, COMPILE_TOL, compiled=held)
        if "compiled_blocks" in held:
            ok = bool(held["compiled_blocks"])
            ctx.case(f"stage{stage}-compiled", ok, "" if ok else "engine.compiled is empty: nothing was compiled",
                     blocks=held["compiled_blocks"])


# 9. Checkpoints -------------------------------------------------------------------------------


@check("checkpoint", "save at ZeRO 3, load at ZeRO 1 (bitwise fp32); reload with fewer visible GPUs",
       part=PART, timeout_s=300)
def checkpoint(ctx: Ctx) -> None:
    import torch

    ctx.group()
    dev = ctx.device
    ckpt = ctx.tmp / "checkpoints"
    e3 = build({"zero_stage": 3}, dev)
    e1 = None
    try:
        train(e3, steps=3)
        e3.save_checkpoint(ckpt, step=3)
        saved = {k: v.detach().cpu().clone() for k, v in e3.full_state_dict().items()}
        e1 = build({"zero_stage": 1}, dev)
        info = e1.load_checkpoint(ckpt)
        loaded = e1.full_state_dict()
        differ = [k for k in saved if k not in loaded or not torch.equal(saved[k], loaded[k].detach().cpu())]
        ok = not differ and info.get("step") == 3
        ctx.case("stage3_to_stage1_bitwise", ok,
                 "" if ok else f"parameters differ: {differ[:5]}; step {info.get('step')}", parameters=len(saved))
        a = train(e3, steps=2, first_step=4)
        b = train(e1, steps=2, first_step=4)
        compare(ctx, "continued_stage1_vs_stage3", b, a, FP32_TOL)
    finally:
        release(e3, e1)
    torch.save(saved, ctx.tmp / "expected.pt")

    visible = torch.cuda.device_count() if ctx.mode == "cuda" else 0
    if visible >= 2:
        first = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
        restricted = first
        scenario = f"saved with {visible} GPUs visible, reloaded with 1 (CUDA_VISIBLE_DEVICES={first})"
    elif visible == 1:
        restricted, scenario = "", "saved with 1 GPU visible, reloaded with none (on the CPU)"
    else:
        restricted, scenario = "", "self-test: no GPU at save or reload (rng.pt holds no CUDA state)"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["CUDA_VISIBLE_DEVICES"] = restricted
    args = {"dir": str(ckpt), "expected": str(ctx.tmp / "expected.pt")}
    cmd = [sys.executable, str(SMOKE), "--helper", "checkpoint_reload", "--args", json.dumps(args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    result = _helper_result(proc)
    ok = proc.returncode == 0 and result.get("equal") is True
    reason = "" if ok else result.get("error") or f"helper exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"
    ctx.case("reload_fewer_gpus", ok, reason, scenario=scenario, cuda_visible_devices=restricted, result=result)


def _helper_result(proc: subprocess.CompletedProcess) -> dict[str, Any]:
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {}


@helper("checkpoint_reload")
def checkpoint_reload(args: dict[str, Any]) -> dict[str, Any]:
    """Load the checkpoint at ZeRO 1 in this process (whatever GPUs it sees) and compare the
    parameters with the saved ones bitwise."""
    import traceback

    import torch

    out: dict[str, Any] = {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                           "device_count": torch.cuda.device_count()}
    dev = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    out["device"] = str(dev)
    try:
        engine = build({"zero_stage": 1}, dev)
        out["step"] = engine.load_checkpoint(args["dir"])["step"]
        want = torch.load(args["expected"], weights_only=True)
        got = engine.full_state_dict()
        differ = [k for k in want if k not in got or not torch.equal(want[k], got[k].detach().cpu())]
        out["equal"] = not differ
        out["differ"] = differ[:10]
        release(engine)
    except Exception as exc:  # noqa: BLE001 - reported to the check
        out["error"] = first_line(exc)
        out["traceback"] = traceback.format_exc()
    return out


# 10. Memory model vs measured (body: checks_memory.py) -----------------------------------------

check("memory_model", "engine.memory's predicted device bytes vs measured (torch.cuda peaks; CPU: state_summary)",
      part=PART, timeout_s=600)(memory_model)


# 11. 1-bit Adam and quantized gradients -------------------------------------------------------


@check("onebit_adam", "1-bit Adam (ZeRO 0) past freeze_step: finite, close to AdamW, device vs CPU",
       part=PART, timeout_s=300)
def onebit_adam(ctx: Ctx) -> None:
    cfg = {"zero_stage": 0, "optimizer": {"type": "onebit_adam", "freeze_step": ONEBIT_FREEZE}}
    cpu = reference(ctx, "onebit-cpu", lambda: _run(cfg, _cpu(), steps=ONEBIT_STEPS))
    ctx.group()
    dev = ctx.device
    adamw = reference(ctx, "adamw-device", lambda: _run({"zero_stage": 0}, dev, steps=ONEBIT_STEPS))
    stats: dict[str, Any] = {}

    def run() -> list[float]:
        engine = build(cfg, dev)
        try:
            losses = train(engine, steps=ONEBIT_STEPS)
            stats.update(engine.states.comm_stats(), compressed_steps=engine.states.compressed_steps)
            return losses
        finally:
            release(engine)

    ctx.details.update(freeze_step=ONEBIT_FREEZE, steps=ONEBIT_STEPS, comm_stats=stats)
    got = engine_case(ctx, "device_vs_cpu", run, cpu, LOWP_TOL, config=cfg)
    if stats:
        want = ONEBIT_STEPS - ONEBIT_FREEZE
        n = stats["compressed_steps"]
        ctx.case("compressed_steps", n == want, "" if n == want else f"{n} compressed steps, expected {want}")
    if got is not None and adamw is not None:
        compare(ctx, "last_loss_vs_adamw", got[-1:], adamw[-1:], ONEBIT_REL_TOL, relative=True,
                onebit=got, adamw=adamw)


@check("quantize_gradients", "int8 block quantization on the device vs CPU; ZeRO 2/3 with quantize_gradients trains",
       part=PART, timeout_s=300)
def quantize_gradients(ctx: Ctx) -> None:
    import torch

    from dsl.ops.comm.qreduce import quantized_reduce_scatter

    ctx.group()
    dev = ctx.device
    block = 512
    g = torch.Generator().manual_seed(7)
    x = torch.randn(100_003, generator=g)
    x[::9973] *= 50.0  # outliers, as gradients have
    ref = quantized_reduce_scatter(x, world_size=1, block_numel=block).wait()
    got = quantized_reduce_scatter(x.to(dev), world_size=1, block_numel=block).wait().cpu()
    blocks = torch.nn.functional.pad(x, (0, -x.numel() % block)).view(-1, block)
    bound = (blocks.abs().amax(1) / 254).repeat_interleave(block)[: x.numel()] * 1.001  # + fp32 rounding
    err = (got - x).abs()
    ok = bool((err <= bound).all()) and bool(torch.equal(got, ref))
    ctx.case("kernel_device_vs_cpu", ok, "" if ok else f"max |device - cpu| {float((got - ref).abs().max()):.3g}, "
                                                       f"elements over the rounding bound {int((err > bound).sum())}",
             numel=x.numel(), block_numel=block, bitwise_equal_to_cpu=bool(torch.equal(got, ref)),
             max_error_over_bound=float((err / bound.clamp_min(1e-30)).max()))
    ctx.details["note"] = ("world size 1: the engine has no reduce-scatter to quantize, so the engine cases only "
                           "prove the setting trains on the device; multi_quantize_gradients compares the int8 path")
    for stage in (2, 3):
        plain = reference(ctx, f"stage{stage}", lambda stage=stage: _run({"zero_stage": stage}, dev))
        cfg = {"zero_stage": stage, "comm": {"quantize_gradients": True}}
        engine_case(ctx, f"stage{stage}", lambda cfg=cfg: _run(cfg, dev), plain, SAME_TOL, config=cfg)
