"""Sequence-parallel (SP) and data-parallel (DP) process groups, formed from the world together.

    world = dp x sp;  rank = dp_rank * sp + sp_rank

The sp ranks of an SP group are contiguous (ranks [i*sp, (i+1)*sp)), so with ranks placed host
by host and sp dividing the ranks of a host an SP group stays inside one host: its all-to-alls
run twice per layer forward and twice in backward and must not cross the network. The ranks of
a DP group share an sp_rank (ranks {sp_rank + j*sp}). The ranks of one SP group read the same
samples (engine/data.py selects samples by dp_rank) and each takes its slice of the sequence.

ZeRO shards over the whole world (dp x sp), as DeepSpeed-Ulysses does: SP ranks hold replicas of
the same weights, and their gradients are partial sums over different tokens of the same
samples, so averaging gradients over the world (what every ZeRO stage already does on the
default group) averages over both data and sequence shards. No separate DP group is used for
gradients; `dp_group` is formed for callers that need it (e.g. a per-sample metric).

Communication: `torch.distributed.new_group` is collective over the world; every rank creates
every group in the same order (SP groups, then DP groups). With sp == 1 no group is created.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as tdist

from dsl.engine.errors import UserError

__all__ = ["SequenceGroups", "build_groups"]


@dataclass(frozen=True)
class SequenceGroups:
    """Where this rank sits in the dp x sp grid."""

    sp: int
    dp: int
    sp_rank: int
    dp_rank: int
    sp_group: Any = None
    """The process group of this rank's SP group (None with sp == 1)."""
    dp_group: Any = None
    """The process group of the ranks sharing this rank's sp_rank (None with sp == 1)."""


def build_groups(world_size: int, rank: int, sp: int) -> SequenceGroups:
    """Form the SP and DP groups (collective when sp > 1). Raises UserError when sp does not divide
    the world."""
    if sp < 1 or world_size % sp:
        raise UserError(f"engine.sequence_parallel ({sp}) must divide the number of ranks ({world_size})")
    dp = world_size // sp
    if sp == 1:
        return SequenceGroups(sp=1, dp=dp, sp_rank=0, dp_rank=rank)
    sp_group = dp_group = None
    for i in range(dp):
        g = tdist.new_group(list(range(i * sp, (i + 1) * sp)))
        if rank // sp == i:
            sp_group = g
    for j in range(sp):
        g = tdist.new_group(list(range(j, world_size, sp)))
        if rank % sp == j:
            dp_group = g
    return SequenceGroups(sp=sp, dp=dp, sp_rank=rank % sp, dp_rank=rank // sp,
                          sp_group=sp_group, dp_group=dp_group)
