"""The reduce-scatter and all-gather of the ZeRO stages, built from the cheapest gloo operations.

gloo's `reduce_scatter_single` and `all_gather_single` are slow on CPU: measured on this
project's 2-core machine with 2 ranks (tests/bench, 29.4M fp32 elements, fastest of 7):

| operation | gloo collective | built here from | ms (collective / here) |
|---|---|---|---|
| reduce-scatter | `reduce_scatter_single` | `isend`/`irecv` of each peer's chunk, then an add | 273-387 / 77 |
| all-gather | `all_gather_single` | one `broadcast` per rank of its own slice, in place | 208 / 43-82 |
| (for scale) all-reduce | `all_reduce` | - | 111-135 |

Both are exact rewrites: the all-gather moves the same bytes without reductions; the
reduce-scatter adds the world_size chunks of this rank's partition in rank order 0..W-1 (for
2 ranks every summation order gives the same bits, a + b == b + a; for more ranks it is a fixed,
deterministic order, as good as the ring's).

Communication plan of each call (p = this rank, W = world size, k = partition elements):
- `reduce_scatter(out, full)`: `isend(full[j*k:(j+1)*k] -> rank j)` for every j != p and
  `irecv(from rank j)` into a [W-1, k] receive buffer, all posted at once (tag `RS_TAG`); `wait()`
  waits for them and writes sum_j chunk_j into `out`. `full` must stay untouched until `wait()`.
- `all_gather(full, part)`: copy `part` into `full[p*k:(p+1)*k]` (skipped when it is that view),
  then W asynchronous `broadcast(full[j*k:(j+1)*k], src=j)`, issued in the same order on every
  rank; `wait()` waits for all of them.

Other backends (nccl) use the native collectives, which are already the fast path there.
Every rank must call these in the same order (as for any collective).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as tdist

__all__ = ["Pending", "reduce_scatter", "all_gather", "use_point_to_point", "RS_TAG"]

RS_TAG = 7301
"""Tag of the reduce-scatter's point-to-point messages (apart from any other p2p traffic)."""


def use_point_to_point() -> bool:
    """True where the rewrites above are the faster path: the gloo backend (unless the environment
    sets DSL_NATIVE_COLLECTIVES=1, which selects gloo's own collectives, for A/B measurements)."""
    if os.environ.get("DSL_NATIVE_COLLECTIVES") == "1":
        return False
    return tdist.is_initialized() and tdist.get_backend() == "gloo"


class Pending:
    """An issued collective: `wait()` completes it (idempotent). `out` is where the result lands."""

    def __init__(self, out: torch.Tensor, works: list[Any], finish: Any = None) -> None:
        self.out = out
        self._works = works
        self._finish = finish

    def wait(self) -> None:
        for work in self._works:
            work.wait()
        self._works = []
        if self._finish is not None:
            finish, self._finish = self._finish, None
            finish()

    def is_completed(self) -> bool:
        return not self._works and self._finish is None


def reduce_scatter(out: torch.Tensor, full: torch.Tensor) -> Pending:
    """Asynchronous SUM reduce-scatter: `out` [k] gets this rank's partition (k elements at
    rank * k) of the sum over ranks of `full` [world_size * k]."""
    world, rank = tdist.get_world_size(), tdist.get_rank()
    k = out.numel()
    if full.numel() != world * k:
        raise ValueError(f"reduce_scatter: full has {full.numel()} elements, expected {world} x {k}")
    if not use_point_to_point():
        return Pending(out, [tdist.reduce_scatter_single(out, full, op=tdist.ReduceOp.SUM, async_op=True)])
    peers = [j for j in range(world) if j != rank]
    recv = torch.empty((len(peers), k), dtype=full.dtype, device=full.device)
    works = []
    for i, j in enumerate(peers):
        works.append(tdist.isend(full[j * k : (j + 1) * k], j, tag=RS_TAG))
        works.append(tdist.irecv(recv[i], j, tag=RS_TAG))

    def finish() -> None:
        chunks = {j: recv[i] for i, j in enumerate(peers)}
        chunks[rank] = full[rank * k : (rank + 1) * k]
        if world == 2:
            torch.add(chunks[0], chunks[1], out=out)
            return
        out.copy_(chunks[0])
        for j in range(1, world):
            out.add_(chunks[j])

    return Pending(out, works, finish)


def all_gather(full: torch.Tensor, part: torch.Tensor) -> Pending:
    """Asynchronous all-gather: `full` [world_size * k] gets every rank's `part` [k] at rank * k.
    `part` may be this rank's slice of `full` itself."""
    world, rank = tdist.get_world_size(), tdist.get_rank()
    k = part.numel()
    if full.numel() != world * k:
        raise ValueError(f"all_gather: full has {full.numel()} elements, expected {world} x {k}")
    if not use_point_to_point():
        return Pending(full, [tdist.all_gather_single(full, part.contiguous(), async_op=True)])
    mine = full[rank * k : (rank + 1) * k]
    if part.data_ptr() != mine.data_ptr():
        mine.copy_(part)
    works = [tdist.broadcast(full[j * k : (j + 1) * k], src=j, async_op=True) for j in range(world)]
    return Pending(full, works)
