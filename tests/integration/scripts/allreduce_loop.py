"""All-reduces over gloo forever, printing `ITER N` every 10 iterations: ranks that are always
in or near a collective, for fault tests (a host cut off mid-run)."""

import time

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
value = torch.ones(1024)
for i in range(1, 10**9):
    dist.all_reduce(value)
    value.fill_(1.0)
    if i % 10 == 0:
        print(f"ITER {i}", flush=True)
    time.sleep(0.05)
