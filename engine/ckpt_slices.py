"""Sliced checkpoints (format 2): which elements each rank writes, and where a loading rank finds
the elements of its own partition.

Writers. Rank r of W writes `rank-<r>-of-<W>.safetensors` (engine/ckpt_files.py) holding, for
every trainable parameter with elements in r's *writer range*, one 1-D slice per field, all in
the engine's parameter dtype: `param/<name>` (the values the optimizer updates,
`stage.param_part`: the fp32 master weights under every precision layout; bf16 with
low_precision_states) and `<state>/<name>` per optimizer state (`exp_avg`, `exp_avg_sq` |
`momentum_buffer`). The writer range is r's partition of every group at stages 1-3 (zero/layout.py),
so a rank writes only what it holds. At stage 0 every rank holds everything and rank r writes
elements [r F / W, (r + 1) F / W) of full space (F = layout.full_numel): the W ranks write 1/W
each in parallel, through the same code as the partitioned stages (rank 0 alone would take W
times as long and its file would be the whole model). The file's `__metadata__["dsl"]` (JSON):
{"format": 2, "writer": r, "writers": W, "slices": {name: [start, numel, full shape]}} (start:
first element of the slice in the flattened parameter). Rank 0's file also holds
`module/<name>`: frozen parameters and buffers, whole (they are replicated and small).

Readers. meta.json's `layout` records the saving layout, {"parts": P, "groups": [[[name, shape],
...], ...]} (each group's parameters in order); from it and W, every loading rank computes which
writer holds which elements of each parameter without opening a file (`SavedIndex`), then for
each piece of its own partition (`layout.pieces`) opens only the files of writers whose ranges
overlap it and reads just those bytes, straight into its parameters and states or through one
staging buffer (engine/ckpt_states.py). Any rank count, stage, precision layout and offload
loads any checkpoint: both sides speak in (parameter name, element range).
"""

from __future__ import annotations

import json
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dsl.engine import ckpt_states
from dsl.engine.ckpt_files import Entry, RankFile, Staging, write_file
from dsl.engine.errors import UserError
from dsl.engine.zero.layout import FlatGroup, Layout, Slot

if TYPE_CHECKING:
    from dsl.engine.core import Engine

__all__ = ["file_name", "writer_ranges", "layout_meta", "layout_from_meta", "SavedIndex", "write_rank",
           "load_rank", "read_full", "PARAM", "MODULE"]

PARAM = "param"
MODULE = "module"


def file_name(writer: int, writers: int) -> str:
    return f"rank-{writer:05d}-of-{writers:05d}.safetensors"


def writer_ranges(layout: Layout, writer: int, writers: int) -> list[tuple[FlatGroup, int, int]]:
    """(group, lo, hi): the group-local ranges writer `writer` of `writers` writes (see the module
    docstring): its partition of every group, or for a replicated layout (parts 1) its 1/writers
    of full space."""
    if layout.parts > 1:
        if layout.parts != writers:
            raise ValueError(f"{layout.parts} partitions written by {writers} ranks")
        return [(g, *layout.part_range(g, writer)) for g in layout.groups]
    total = layout.full_numel
    lo, hi = writer * total // writers, (writer + 1) * total // writers
    out = []
    for g in layout.groups:
        a, b = max(lo, g.base), min(hi, g.base + g.padded)
        if a < b:
            out.append((g, a - g.base, b - g.base))
    return out


def _slices(g: FlatGroup, lo: int, hi: int) -> Iterator[tuple[Slot, int, int, int]]:
    """(slot, start in the parameter, group-local start, length) of the elements in [lo, hi)."""
    for slot in g.slots:
        a, b = max(lo, slot.offset), min(hi, slot.offset + slot.numel)
        if a < b:
            yield slot, a - slot.offset, a, b - a


def layout_meta(layout: Layout) -> dict[str, Any]:
    return {"parts": layout.parts, "groups": [[[s.name, list(s.shape)] for s in g.slots] for g in layout.groups]}


def layout_from_meta(meta: dict[str, Any]) -> Layout:
    """The saving rank's Layout (parameters as meta-device tensors: shapes only)."""
    groups = [[(name, torch.empty(shape, device="meta")) for name, shape in g] for g in meta["groups"]]
    return Layout(groups, parts=int(meta["parts"]), rank=0)


class SavedIndex:
    """Which writer holds which elements of each parameter of a saved layout."""

    def __init__(self, layout: Layout, writers: int) -> None:
        self.where = {s.name: (g, s) for g in layout.groups for s in g.slots}
        self._ranges: list[list[tuple[int, int, int]]] = [[] for _ in layout.groups]
        for w in range(writers):
            for g, lo, hi in writer_ranges(layout, w, writers):
                self._ranges[g.index].append((lo, hi, w))
        for r in self._ranges:
            r.sort()
        self._starts = [[lo for lo, _, _ in r] for r in self._ranges]

    def sources(self, name: str, start: int, n: int) -> Iterator[tuple[int, int, int, int]]:
        """(writer, first element, elements, start of that writer's slice) covering elements
        [start, start + n) of parameter `name`, in order."""
        g, slot = self.where[name]
        x0, x1 = slot.offset + start, slot.offset + start + n
        ranges, starts = self._ranges[g.index], self._starts[g.index]
        i = max(0, bisect_right(starts, x0) - 1)
        while i < len(ranges) and ranges[i][0] < x1:
            lo, hi, w = ranges[i]
            a, b = max(lo, x0), min(hi, x1)
            if a < b:
                yield w, a - slot.offset, b - a, max(lo, slot.offset) - slot.offset
            i += 1


def _module_tensors(engine: "Engine") -> list[tuple[str, torch.Tensor]]:
    """Frozen parameters and buffers (replicated on every rank; saved whole by writer 0)."""
    module = engine.module
    out = [(n, p.detach()) for n, p in module.named_parameters() if not p.requires_grad]
    return out + [(n, b.detach()) for n, b in module.named_buffers()]


def write_rank(engine: "Engine", path: Path, writer: int, writers: int, staging: Staging) -> int:
    """Write this rank's file (see the module docstring); returns its size in bytes."""
    stage, layout = engine.stage, engine.stage.layout
    holders = ckpt_states.fields(engine.states)
    entries: list[Entry] = []
    slices: dict[str, list[Any]] = {}
    for g, lo, hi in writer_ranges(layout, writer, writers):
        own_lo = layout.part_range(g)[0]  # where this rank's param_part(g) starts, group-local
        part, base = ckpt_states.param_holder(stage, engine.states, g)
        for slot, start, at, n in _slices(g, lo, hi):
            rel = at - own_lo
            entries.append(Entry(f"{PARAM}/{slot.name}", part.dtype, [n],
                                 partial(part.pieces, base + rel, n, staging)))
            for k, h in holders.items():
                entries.append(Entry(f"{k}/{slot.name}", h.dtype, [n],
                                     partial(h.pieces, g.shard_offset + rel, n, staging)))
            slices[slot.name] = [start, n, list(slot.shape)]
    if writer == 0:
        for name, t in _module_tensors(engine):
            flat = ckpt_states.Flat(t.contiguous().reshape(-1))
            entries.append(Entry(f"{MODULE}/{name}", t.dtype, list(t.shape),
                                 partial(flat.pieces, 0, t.numel(), staging)))
    staging.limit(max((e.nbytes for e in entries), default=0))
    meta = {"format": 2, "writer": writer, "writers": writers, "slices": slices}
    return write_file(path, entries, {"dsl": json.dumps(meta, separators=(",", ":"))})


class _Files:
    """The writers' files of one checkpoint folder: headers read on first use and kept, at most
    `MAX_OPEN` descriptors open (a stage-0 load of a many-rank checkpoint reads every file)."""

    MAX_OPEN = 64

    def __init__(self, folder: Path, writers: int) -> None:
        self.folder, self.writers = folder, writers
        self._files: dict[int, RankFile] = {}
        self._slices: dict[int, dict[str, Any]] = {}
        self._open: OrderedDict[int, None] = OrderedDict()

    def get(self, w: int, name: str | None = None, start: int | None = None) -> RankFile:
        """Writer w's file; with `name`, check its slice of that parameter starts at `start`."""
        if w not in self._files:
            path = self.folder / file_name(w, self.writers)
            try:
                f = RankFile(path)
            except FileNotFoundError:
                raise UserError(f"{self.folder}: {path.name} is missing: the checkpoint is incomplete") from None
            self._files[w] = f
            self._slices[w] = json.loads(f.metadata.get("dsl", "{}")).get("slices", {})
        f, slices = self._files[w], self._slices[w]
        if name is not None and (name not in slices or slices[name][0] != start):
            raise UserError(f"{f.path}: its slice of {name} does not match meta.json's layout "
                            "(files of different saves in one folder?)")
        self._open[w] = None
        self._open.move_to_end(w)
        while len(self._open) > self.MAX_OPEN:
            self._files[self._open.popitem(last=False)[0]].close()
        return f

    def slices(self, w: int) -> dict[str, Any]:
        """{name: [start, numel, full shape]} of writer w's file."""
        self.get(w)
        return self._slices[w]

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._open.clear()


def _check_model(folder: Path, index: SavedIndex, layout: Layout) -> None:
    missing = [n for n in layout.names() if n not in index.where]
    if missing:
        raise UserError(f"{folder}: {len(missing)} parameter(s) of this model are not in the "
                        f"checkpoint, e.g. {', '.join(missing[:3])}")
    for g in layout.groups:
        for slot in g.slots:
            saved = tuple(index.where[slot.name][1].shape)
            if saved != tuple(slot.shape):
                raise UserError(f"{folder}: {slot.name} has shape {saved} in the checkpoint, "
                                f"{tuple(slot.shape)} in this model")


def load_rank(engine: "Engine", folder: Path, meta: dict[str, Any], staging: Staging) -> None:
    """Fill this rank's partition of the parameters and optimizer states, and the frozen
    parameters and buffers, from a format-2 checkpoint folder. No collective."""
    stage, layout = engine.stage, engine.stage.layout
    index = SavedIndex(layout_from_meta(meta["layout"]), int(meta["writers"]))
    _check_model(folder, index, layout)
    holders = ckpt_states.fields(engine.states)
    absent = [k for k in holders if k not in meta["state_names"]]
    if absent:
        raise UserError(f"{folder}: no optimizer state {', '.join(absent)} in the checkpoint")
    # A chunk of one piece in the file's dtype and in the holder's (a dtype change): 8 bytes per
    # element covers fp32 on both sides.
    staging.limit(8 * max((n for g in layout.groups for *_, n in layout.pieces(g)), default=0))
    files = _Files(folder, int(meta["writers"]))
    try:
        with torch.no_grad():
            for g in layout.groups:
                part, base = ckpt_states.param_holder(stage, engine.states, g)
                for slot, p_lo, shard_lo, n in layout.pieces(g):
                    got = 0
                    for w, a, m, w_start in index.sources(slot.name, p_lo, n):
                        f = files.get(w, slot.name, w_start)
                        d, off = a - p_lo, a - w_start
                        part.fill(base + shard_lo - g.shard_offset + d, m, f, f"{PARAM}/{slot.name}", off, staging)
                        for k, h in holders.items():
                            h.fill(shard_lo + d, m, f, f"{k}/{slot.name}", off, staging)
                        got += m
                    if got != n:
                        raise UserError(f"{folder}: elements of {slot.name} are in no file: meta.json's "
                                        "layout does not cover the parameter")
            ckpt_states.finish(holders)
            first = files.get(0)
            for name, t in _module_tensors(engine):
                key = f"{MODULE}/{name}"
                if key not in first.tensors:
                    continue
                shape = first.tensors[key][1]
                if list(t.shape) != shape:
                    raise UserError(f"{folder}: {name} has shape {tuple(shape)} in the checkpoint, "
                                    f"{tuple(t.shape)} in this model")
                target = t if t.is_contiguous() else torch.empty_like(t, memory_format=torch.contiguous_format)
                ckpt_states.Flat(target.view(-1)).fill(0, t.numel(), first, key, 0, staging)
                if target is not t:
                    t.copy_(target)
    finally:
        files.close()


def read_full(folder: Path, meta: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """Every field as full tensors: {"param": {name: tensor}, "<state>": {...}, "module": {...}},
    assembled from all files of a format-2 folder (the whole checkpoint in memory: for tools,
    exports and tests, not for resuming)."""
    out: dict[str, dict[str, torch.Tensor]] = {PARAM: {}, MODULE: {}, **{k: {} for k in meta["state_names"]}}
    files = _Files(folder, int(meta["writers"]))
    try:
        for w in range(int(meta["writers"])):
            f = files.get(w)
            for key, (dtype, shape, _, _) in f.tensors.items():
                field, name = key.split("/", 1)
                if field == MODULE:
                    out[MODULE][name] = t = torch.empty(shape, dtype=dtype)
                    f.read_into(key, 0, t.view(-1))
            for name, (start, n, shape) in files.slices(w).items():
                for field in (PARAM, *meta["state_names"]):
                    key = f"{field}/{name}"
                    full = out[field].setdefault(name, torch.empty(shape, dtype=f.dtype(key)))
                    f.read_into(key, 0, full.view(-1)[start : start + n])
    finally:
        files.close()
    return out
