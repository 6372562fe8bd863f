"""Flat layouts shared by every ZeRO stage: parameter groups, equal partitions, segments.

A *group* is a run of parameters stored back to back in one flat buffer: a gradient bucket of
`bucket_mib` at stages 0-2, one module (a "unit") at stage 3. Each group's flat length is
padded up to a multiple of `parts` (the data-parallel world size at stages 1-3, 1 at stage 0) and
cut into `parts` equal *partitions*; rank r owns partition r of every group. gloo can only
all_gather / reduce_scatter equal sizes, hence the padding; padded elements are zero in every
buffer and never reach a parameter.

Three coordinate systems, all in elements:

- group-local: [0, group.padded) inside one group's flat buffer;
- full: [0, layout.full_numel) in a buffer holding every group back to back (group g starts at
  `group.base`), used for the replicated parameter/gradient buffers of stages 0-2;
- shard: [0, layout.shard_numel) in this rank's *shard space*, the concatenation of this rank's
  partitions of every group (group g's partition starts at `group.shard_offset`). Gradient shards,
  optimizer states, offloaded master weights and checkpoint gathers all live in shard space.

A `Segment` is a maximal piece of this rank's partition that belongs to parameters of one
weight-decay class inside one group: what the optimizer updates, as a view into each buffer.
Padding is in no segment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Slot", "FlatGroup", "Segment", "Layout", "split_buckets", "clip_segments", "decays", "flatten_params",
           "rebind_params"]


def decays(param: torch.Tensor) -> bool:
    """Weight decay applies to matrices and embeddings (dim >= 2), not to gains and biases."""
    return param.dim() >= 2


@dataclass(frozen=True)
class Slot:
    """Where one parameter lives inside its group's flat buffer."""

    name: str
    offset: int
    """First element in the group-local flat buffer."""
    numel: int
    shape: torch.Size
    decay: bool


@dataclass(frozen=True)
class Segment:
    """A contiguous piece of this rank's partition holding parameters of one decay class."""

    group: int
    shard_lo: int
    """Start in shard space."""
    full_lo: int
    """Start in full space (same elements)."""
    numel: int
    decay: bool


class FlatGroup:
    """Parameters stored back to back, padded to a multiple of `parts`, cut into equal partitions."""

    def __init__(self, index: int, named: list[tuple[str, nn.Parameter]], parts: int) -> None:
        self.index = index
        self.params = [p for _, p in named]
        self.slots: list[Slot] = []
        offset = 0
        for name, p in named:
            self.slots.append(Slot(name, offset, p.numel(), p.shape, decays(p)))
            offset += p.numel()
        self.numel = offset
        """Elements of the parameters (without padding)."""
        self.padded = -(-offset // parts) * parts
        """Flat length: numel rounded up to a multiple of parts."""
        self.part_numel = self.padded // parts
        """Elements of one partition."""
        self.base = 0
        """Start of this group in full space (set by Layout)."""
        self.shard_offset = 0
        """Start of this rank's partition in shard space (set by Layout)."""


class Layout:
    """Groups of parameters and this rank's partition of each.

    `named_groups`: lists of (name, parameter), one list per group, in the order the groups are
    communicated. `parts` partitions per group; this rank owns partition `rank`.
    """

    def __init__(self, named_groups: list[list[tuple[str, nn.Parameter]]], *, parts: int, rank: int) -> None:
        if not 0 <= rank < parts:
            raise ValueError(f"rank {rank} outside [0, {parts})")
        self.parts = parts
        self.rank = rank
        self.groups = [FlatGroup(i, named, parts) for i, named in enumerate(named_groups) if named]
        for i, g in enumerate(self.groups):
            g.index = i
        base = shard = 0
        for g in self.groups:
            g.base, g.shard_offset = base, shard
            base += g.padded
            shard += g.part_numel
        self.full_numel = base
        """Elements of a buffer holding every group (with padding)."""
        self.shard_numel = shard
        """Elements of this rank's shard space (the same on every rank)."""
        self.segments = self._segments()

    def names(self) -> list[str]:
        return [s.name for g in self.groups for s in g.slots]

    def part_range(self, group: FlatGroup, rank: int | None = None) -> tuple[int, int]:
        """[lo, hi) of partition `rank` (default: this rank's) in group-local coordinates."""
        r = self.rank if rank is None else rank
        return r * group.part_numel, (r + 1) * group.part_numel

    def pieces(self, group: FlatGroup):
        """(slot, start inside the parameter, start in shard space, length) for every parameter
        element of `group` inside this rank's partition."""
        lo, hi = self.part_range(group)
        for slot in group.slots:
            a, b = max(lo, slot.offset), min(hi, slot.offset + slot.numel)
            if a < b:
                yield slot, a - slot.offset, group.shard_offset + a - lo, b - a

    def _segments(self) -> list[Segment]:
        out: list[Segment] = []
        for g in self.groups:
            lo, _ = self.part_range(g)
            for slot, _, shard_lo, n in self.pieces(g):
                full_lo = g.base + lo + (shard_lo - g.shard_offset)
                prev = out[-1] if out else None
                if (prev is not None and prev.group == g.index and prev.decay == slot.decay
                        and prev.shard_lo + prev.numel == shard_lo):
                    out[-1] = Segment(g.index, prev.shard_lo, prev.full_lo, prev.numel + n, slot.decay)
                else:
                    out.append(Segment(g.index, shard_lo, full_lo, n, slot.decay))
        return out


def clip_segments(segments: list[Segment], lo: int, hi: int) -> list[Segment]:
    """The parts of `segments` inside shard range [lo, hi)."""
    out = []
    for s in segments:
        a, b = max(lo, s.shard_lo), min(hi, s.shard_lo + s.numel)
        if a < b:
            out.append(Segment(s.group, a, s.full_lo + a - s.shard_lo, b - a, s.decay))
    return out


FIRST_BUCKET_BYTES = 1 << 20
"""Default cap of the first bucket (DDP's first_bucket_bytes_cap)."""


def split_buckets(
    named: list[tuple[str, nn.Parameter]], bucket_bytes: int, first_bucket_bytes: int | None = None
) -> list[list[tuple[str, nn.Parameter]]]:
    """Consecutive runs of at most `bucket_bytes` (a larger parameter gets a bucket of its own),
    never mixing dtypes or devices. The first run is capped at `first_bucket_bytes` (default
    min(bucket_bytes, FIRST_BUCKET_BYTES)), as DDP does: the stages pass parameters in reverse
    definition order, whose gradients come first in backward, so a small first bucket starts
    communicating early instead of waiting for most of the backward (with 25 MiB buckets the
    whole bench model's layers would otherwise share the first bucket)."""
    first_cap = min(bucket_bytes, FIRST_BUCKET_BYTES) if first_bucket_bytes is None else first_bucket_bytes
    groups: list[list[tuple[str, nn.Parameter]]] = []
    size = 0
    for name, p in named:
        nbytes = p.numel() * p.element_size()
        last = groups[-1][0][1] if groups else None
        same_kind = last is not None and (last.dtype, last.device) == (p.dtype, p.device)
        if same_kind and size + nbytes <= (first_cap if len(groups) == 1 else bucket_bytes):
            groups[-1].append((name, p))
            size += nbytes
        else:
            groups.append([(name, p)])
            size = nbytes
    return groups


def flatten_params(layout: Layout, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [layout.full_numel] buffer holding every parameter (padding zero); each parameter's
    `.data` becomes a view of its slot, so updating the buffer updates the module."""
    flat = torch.zeros(layout.full_numel, dtype=dtype, device=device)
    with torch.no_grad():
        for g in layout.groups:
            for slot, p in zip(g.slots, g.params):
                view = flat[g.base + slot.offset : g.base + slot.offset + slot.numel]
                view.copy_(p.detach().reshape(-1))
                p.data = view.view(slot.shape)
    return flat


def rebind_params(layout: Layout, flat: torch.Tensor) -> None:
    """Make each parameter's `.data` a view of its slot in `flat` ([layout.full_numel], any dtype)."""
    for g in layout.groups:
        for slot, p in zip(g.slots, g.params):
            p.data = flat[g.base + slot.offset : g.base + slot.offset + slot.numel].view(slot.shape)
