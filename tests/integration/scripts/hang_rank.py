"""All-reduces over gloo with a heartbeat per iteration (engine/wire.py); at iteration
`--hang-at` rank `--hang-rank` stops before the next collective (sleeps in `stuck_here`), the
others wait in that all_reduce: a hung rank for the watchdog tests. Prints `ITER N` every 10."""

import argparse
import time

import torch
import torch.distributed as dist

from dsl.engine.wire import heartbeat

parser = argparse.ArgumentParser()
parser.add_argument("--hang-rank", type=int, default=1)
parser.add_argument("--hang-at", type=int, default=20)
args = parser.parse_args()


def stuck_here() -> None:
    while True:
        time.sleep(1)


dist.init_process_group("gloo")
rank = dist.get_rank()
value = torch.ones(16)
for i in range(1, 10**9):
    dist.all_reduce(value)
    value.fill_(1.0)
    heartbeat(i)
    if i % 10 == 0:
        print(f"ITER {i}", flush=True)
    if i == args.hang_at and rank == args.hang_rank:
        print("HANGING NOW", flush=True)
        stuck_here()
    time.sleep(0.02)
