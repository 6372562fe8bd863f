"""Bytes moved per optimizer step by stage 3's parameter file (`offload.params: nvme`,
engine/zero/param_files.py), torch-free.

Per micro-step every unit is read once for its forward and once for its backward, except the
units that stay gathered from the root's forward to the end of their backward (the root unit and
the resident units of engine/zero/units.py), read once; the forward order the first step
records adds nothing after that step (a prefetched unit is used before it is released). After
each optimizer step the whole partition is written once, cast to the file's dtype.
"""

from __future__ import annotations

from typing import Iterable, Sequence

__all__ = ["nvme_param_traffic", "nvme_param_step_bytes"]


def nvme_param_traffic(parts: Sequence[int], *, stays: Iterable[int], elem: int,
                       micro_steps: int = 1) -> tuple[int, int]:
    """(bytes read, bytes written) per optimizer step for units whose partitions on this rank
    have `parts` elements (`stays`: indices of the units that stay gathered), `elem` bytes each."""
    stay = set(stays)
    reads = sum(n * (1 if i in stay else 2) for i, n in enumerate(parts))
    return reads * elem * micro_steps, sum(parts) * elem


def nvme_param_step_bytes(params: int, *, shards: int, elem: int, micro_steps: int = 1,
                          staying_params: int = 0) -> tuple[int, int]:
    """The same from counts (the planner): `params` split over `shards`, of which
    `staying_params` belong to units that stay gathered (a tied embedding)."""
    part = -(-params // max(1, shards))
    stay = -(-staying_params // max(1, shards))
    return (2 * part - stay) * elem * micro_steps, part * elem
