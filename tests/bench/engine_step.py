"""One benchmark run: the same model and data under one engine, on the ranks torchrun started.

    torchrun --nproc-per-node 2 tests/bench/engine_step.py --impl dsl|ddp|fsdp2|deepspeed \
        --stage N --precision fp32|bf16 [--steps 20 --warmup 5 --micro-batch 8 --preset bench]

Every implementation trains dsl's bundled model (the `bench` preset: the shape of the peer
baseline in shared/docs/FACTS.md) from the same seed on the same random tokens with AdamW
(lr 1e-3, no clipping), one thread per rank. Rank 0 prints one JSON line: median step time,
tokens/s over all ranks, and the peak resident memory of the largest rank.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist


def _model(preset: str):
    from dsl.engine.model import Llama
    from dsl.engine.train_config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(preset=preset)
    return Llama(cfg), cfg


def _batches(cfg, micro_batch: int, rank: int, n: int):
    gen = torch.Generator().manual_seed(1000 + rank)
    for _ in range(n):
        tokens = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.seq_len + 1), generator=gen)
        yield tokens[:, :-1], tokens[:, 1:]


def _dsl(model, args):
    from dsl.engine import initialize

    engine = initialize(model, {"zero_stage": args.stage, "precision": args.precision,
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


def _ddp(model, args):
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3, fused=True)
    autocast = args.precision == "bf16"

    def step(tokens, targets):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = ddp(tokens, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


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


IMPLS = {"dsl": _dsl, "ddp": _ddp, "fsdp2": _fsdp2, "deepspeed": _deepspeed}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", choices=sorted(IMPLS), required=True)
    parser.add_argument("--stage", type=int, default=0)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--preset", default="bench")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, cfg = _model(args.preset)
    result: dict = {"impl": args.impl, "stage": args.stage, "precision": args.precision}
    try:
        step = IMPLS[args.impl](model, args)
    except Exception as exc:  # an engine refusing a configuration is a result, not a crash
        result["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        if rank == 0:
            print("BENCH " + json.dumps(result), flush=True)
        dist.destroy_process_group()
        return 0
    times, losses = [], []
    for tokens, targets in _batches(cfg, args.micro_batch, rank, args.warmup + args.steps):
        dist.barrier()
        start = time.perf_counter()
        loss = step(tokens, targets)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    median = statistics.median(times[args.warmup:])
    peak_kib = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss], dtype=torch.int64)
    dist.all_reduce(peak_kib, op=dist.ReduceOp.MAX)
    tokens_per_step = args.micro_batch * cfg.seq_len * world
    result.update(step_s=median, tokens_per_s=tokens_per_step / median,
                  peak_rss_bytes=int(peak_kib.item()) * 1024, final_loss=losses[-1],
                  threads=torch.get_num_threads(), world_size=world)
    if rank == 0:
        print("BENCH " + json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
