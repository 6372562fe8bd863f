"""One benchmark run: the same model and data under one engine, on the ranks torchrun started.

    torchrun --nproc-per-node 2 tests/bench/engine_step.py --impl dsl|dsl-master|dsl-autocast|ddp|fsdp2|deepspeed|local \
        --stage N --precision fp32|bf16 [--compile on|off] [--steps 20 --warmup 5 --shape bench|comm]
        [--profile PATH] [--baton DIR --slot I --slots N]

Every implementation trains dsl's bundled model from the same seed on the same random tokens with
AdamW (lr 1e-3, no clipping), one thread per rank. Shapes (`SHAPES`):

- `bench`: the `bench` preset (the shape of the DDP/DeepSpeed/FSDP2 peer baseline), micro-batch
  8: compute-bound, the gradient exchange is a few percent of a step;
- `comm`: 6x the parameters and 1/8 of the tokens per rank, so that moving gradients and
  parameters costs about as much as the forward and backward and the engines' communication
  plans differ measurably.

`--compile on` compiles each decoder layer's forward with torch.compile, as dsl's opt-in
`engine.compile: true` does (engine/compile.py): for dsl it sets `compile: true`, for the others
the bench calls the same `compile_blocks` before wrapping the model (DDP, FSDP2, DeepSpeed keep their
hooks on the modules, outside the compiled code, exactly as dsl's do). `off` runs eager
(`compile: false` for dsl). The warm-up steps absorb the compilation.

`local` is no engine: each rank trains its own replica with torch's fused AdamW and communicates
nothing (its loss differs). It is the ceiling of any eager data-parallel engine that leaves malloc
alone: the same compute on the same cores with zero communication cost (dsl on a CPU device keeps
freed blocks for reuse, engine/cpu_alloc.py, and can pass it).

Paired runs (`--baton`, what run.py does): several engines run at the same time, each under its
own torchrun, and take turns step by step: rank 0 of slot I waits for a byte on the FIFO
`DIR/batonI`, both ranks run one step, and rank 0 writes a byte to the next slot's FIFO. Every
engine's k-th step then runs within a few seconds of the others' k-th steps, so this machine's
drift (10-30% over tens of seconds) hits all of them alike and per-step ratios cancel it. A slot
creates `DIR/readyI` once its setup is done; run.py starts the rotation when all are ready. A
slot whose engine refuses the configuration still takes and passes its turns.

Rank 0 prints one JSON line: median step time, tokens/s over all ranks, the fastest step, the
median CPU seconds per step of rank 0 (all its threads; robust to other load on the machine), and
the peak resident memory of the largest rank.

On a CUDA machine the same script runs on the GPUs: NCCL, each rank on cuda:LOCAL_RANK (the
backend and device rule of engine/dist.py), batches on the device, the clock read after
`torch.cuda.synchronize()` (kernels are asynchronous; without it a step would be timed as the
time to queue it), and the JSON line also carries the largest rank's
`torch.cuda.max_memory_allocated` / `max_memory_reserved` (the device peak; resident memory then
measures only the host side).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist


SHAPES = {
    # 7.36M parameters, 2,048 tokens per rank and step.
    "bench": ({"preset": "bench"}, 8),
    # 45.4M parameters (two 16.4M vocabulary matrices), 256 tokens per rank and step.
    "comm": ({"preset": "bench", "vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1376,
              "seq_len": 128}, 2),
    # The harness's own test (tests/unit/test_bench_pairing.py): seconds per run.
    "tiny": ({"preset": "tiny"}, 2),
}
"""name -> (ModelConfig fields, micro-batch per rank)."""


def _model(shape: str):
    from dsl.engine.model import Llama
    from dsl.engine.train_config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(**SHAPES[shape][0])
    return Llama(cfg), cfg


def _batches(cfg, micro_batch: int, rank: int, n: int, device: torch.device):
    gen = torch.Generator().manual_seed(1000 + rank)
    for _ in range(n):
        tokens = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.seq_len + 1), generator=gen).to(device)
        yield tokens[:, :-1], tokens[:, 1:]


def _sync(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA) before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dsl(model, args, layout: str | None = None):
    from dsl.engine import initialize

    engine = initialize(model, {"zero_stage": args.stage, "precision": args.precision,
                                "precision_layout": layout if args.precision != "fp32" else None,
                                "compile": args.compile == "on",
                                "micro_batch": args.micro_batch, "grad_clip": None,
                                "optimizer": {"type": "adamw", "lr": 1e-3},
                                "scheduler": {"type": "constant", "warmup_steps": 0}})

    def step(tokens, targets):
        loss = engine(tokens, targets)
        loss.backward()
        engine.step()
        engine.zero_grad()
        return loss

    return step


def _torch_step(module, args):
    """AdamW (fused) on `module` with autocast for bf16: what DDP and the no-comm ceiling run."""
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3, fused=True)
    autocast = args.precision == "bf16"

    def step(tokens, targets):
        with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = module(tokens, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def _local(model, args):
    return _torch_step(model, args)


def _ddp(model, args):
    from torch.nn.parallel import DistributedDataParallel

    return _torch_step(DistributedDataParallel(model), args)


def _fsdp2(model, args):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if args.precision == "bf16" \
        else MixedPrecisionPolicy()
    for layer in model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # fused AdamW does not take DTensors

    def step(tokens, targets):
        loss = model(tokens, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def _deepspeed(model, args):
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": args.micro_batch,
              "zero_optimization": {"stage": args.stage},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    if args.precision == "bf16":
        config["bf16"] = {"enabled": True}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)

    def step(tokens, targets):
        loss = engine(tokens, targets)
        engine.backward(loss)
        engine.step()
        return loss

    return step


def _profiler():
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU])


class Baton:
    """Turn-taking with the other slots of a paired run (see the module docstring); without a
    directory every call is a barrier or nothing, so unpaired runs time the same way."""

    def __init__(self, directory: str | None, slot: int, slots: int, rank: int) -> None:
        self.directory, self.slot, self.rank = directory, slot, rank
        self._in = self._out = -1
        if directory and rank == 0:  # O_RDWR: open never blocks, and a write never hits a closed end
            self._in = os.open(os.path.join(directory, f"baton{slot}"), os.O_RDWR)
            self._out = os.open(os.path.join(directory, f"baton{(slot + 1) % slots}"), os.O_RDWR)

    def ready(self) -> None:
        dist.barrier()
        if self.directory and self.rank == 0:
            with open(os.path.join(self.directory, f"ready{self.slot}"), "w"):
                pass

    def take(self) -> None:
        if self._in >= 0:
            os.read(self._in, 1)
        dist.barrier()

    def give(self) -> None:
        """Pass the turn on (after a step ended on both ranks: the caller's barrier)."""
        if self._out >= 0:
            os.write(self._out, b"x")


IMPLS = {"dsl": _dsl, "ddp": _ddp, "fsdp2": _fsdp2, "deepspeed": _deepspeed, "local": _local,
         # dsl with an explicit engine.precision_layout (engine/zero/master.py); `dsl` is the default
         "dsl-master": lambda model, args: _dsl(model, args, "master"),
         "dsl-autocast": lambda model, args: _dsl(model, args, "autocast")}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", choices=sorted(IMPLS), required=True)
    parser.add_argument("--stage", type=int, default=0)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--compile", choices=["on", "off"], default="off",
                        help="torch.compile each decoder layer (dsl: engine compile: true)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bench")
    parser.add_argument("--micro-batch", type=int, default=None, help="default: the shape's")
    parser.add_argument("--profile", metavar="PATH", default=None,
                        help="write a torch.profiler table of one measured step of rank 0 to PATH")
    parser.add_argument("--baton", metavar="DIR", default=None, help="paired run: FIFOs baton0.. in DIR")
    parser.add_argument("--slot", type=int, default=0, help="this engine's turn in the paired run")
    parser.add_argument("--slots", type=int, default=1, help="engines in the paired run")
    args = parser.parse_args()

    from dsl.engine import dist as dsl_dist

    ctx = dsl_dist.setup()  # nccl and cuda:LOCAL_RANK on a CUDA machine, else gloo and the CPU
    device = ctx.device
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.micro_batch is None:
        args.micro_batch = SHAPES[args.shape][1]
    model, cfg = _model(args.shape)
    if not args.impl.startswith("dsl"):  # dsl's engine moves the model to the rank's device itself
        model = model.to(device)
    if args.compile == "on" and not args.impl.startswith("dsl"):
        from dsl.engine.compile import compile_blocks

        compile_blocks(model)  # what `compile: true` does inside dsl's engine
    result: dict = {"impl": args.impl, "stage": args.stage, "precision": args.precision, "shape": args.shape,
                    "compile": args.compile}
    if args.baton:
        result["slot"] = args.slot
    baton = Baton(args.baton, args.slot, args.slots, rank)
    try:
        step = IMPLS[args.impl](model, args)
    except Exception as exc:  # an engine refusing a configuration is a result, not a crash
        result["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        if rank == 0:
            print("BENCH " + json.dumps(result), flush=True)
        baton.ready()
        for _ in range(args.warmup + args.steps):  # keep the rotation going for the others
            baton.take()
            baton.give()
        dsl_dist.teardown(ctx)
        return 0
    baton.ready()
    times, cpu_times, losses, starts = [], [], [], []
    for i, (tokens, targets) in enumerate(_batches(cfg, args.micro_batch, rank, args.warmup + args.steps, device)):
        baton.take()
        profiler = _profiler() if args.profile and rank == 0 and i == args.warmup else None
        _sync(device)
        starts.append(time.time())
        start, cpu_start = time.perf_counter(), time.process_time()
        with profiler or contextlib.nullcontext():
            loss = step(tokens, targets)
        _sync(device)
        dist.barrier()  # the step ends when the slower rank is done
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        baton.give()
        losses.append(float(loss))
        if profiler is not None:
            with open(args.profile, "w") as f:
                f.write(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    median = statistics.median(times[args.warmup:])
    peaks = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]
    if device.type == "cuda":
        peaks += [torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)]
    peak = torch.tensor(peaks, dtype=torch.int64, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    peak_values = [int(v) for v in peak.tolist()]
    if device.type == "cuda":
        result.update(device_peak_allocated_bytes=peak_values[1], device_peak_reserved_bytes=peak_values[2],
                      device=torch.cuda.get_device_name(device))
    tokens_per_step = args.micro_batch * cfg.seq_len * world
    result.update(step_s=median, tokens_per_s=tokens_per_step / median,
                  peak_rss_bytes=peak_values[0], final_loss=losses[-1],
                  step_s_min=min(times[args.warmup:]), cpu_s=statistics.median(cpu_times[args.warmup:]),
                  threads=torch.get_num_threads(), world_size=world,
                  steps_s=[round(t, 3) for t in times[args.warmup:]])
    if args.baton:
        result["starts_unix"] = starts  # every step's start, warm-up included: the turn order
    if rank == 0:
        print("BENCH " + json.dumps(result), flush=True)
    dsl_dist.teardown(ctx)  # barrier, then destroy the group
    return 0


if __name__ == "__main__":
    sys.exit(main())
