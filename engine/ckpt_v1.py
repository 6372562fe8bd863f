"""Loading checkpoints of format 1 (dsl before sliced checkpoints), kept so that existing runs resume.

Format 1 held full tensors written by rank 0 alone: `model.pt` ({name: full tensor}, trainable
parameters in the engine's parameter dtype, plus frozen parameters and buffers) and
`optimizer.pt` ({"type", "step", "state": {name: {state name: full tensor, "step"}}}). Both are
memory-mapped; each rank copies out the elements of its own partition. The optimizer states pass
through one shard-space tensor per state (this rank's partition, as `states.write` takes it).
Nothing writes this format any more.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dsl.engine.errors import UserError

if TYPE_CHECKING:
    from dsl.engine.core import Engine

__all__ = ["load_tensors"]


def load_tensors(engine: "Engine", path: Path) -> None:
    """Fill this rank's parameters and optimizer states from `path` (a format-1 folder)."""
    model = torch.load(path / "model.pt", mmap=True, weights_only=True)
    optim = torch.load(path / "optimizer.pt", mmap=True, weights_only=True)
    stage, states = engine.stage, engine.states
    names = stage.layout.names()
    missing = [n for n in names if n not in model]
    if missing:
        raise UserError(f"{path}: {len(missing)} parameter(s) of this model are not in the "
                        f"checkpoint, e.g. {', '.join(missing[:3])}")
    with torch.no_grad():
        flats = {k: torch.zeros(stage.layout.shard_numel, dtype=states.read(k).dtype) for k in states.names}
        if getattr(stage, "master_owner", None) is not None:  # stage 3's master is in the NVMe files only
            flats["master"] = torch.zeros(stage.layout.shard_numel, dtype=states.dtype)
        for g in stage.layout.groups:
            for slot in g.slots:
                if tuple(model[slot.name].shape) != tuple(slot.shape):
                    raise UserError(f"{path}: {slot.name} has shape {tuple(model[slot.name].shape)} "
                                    f"in the checkpoint, {tuple(slot.shape)} in this model")
            part = stage.param_part(g)
            for slot, p_lo, shard_lo, n in stage.layout.pieces(g):
                lo = shard_lo - g.shard_offset
                values = model[slot.name].reshape(-1)[p_lo : p_lo + n]
                if part is None:
                    flats["master"][shard_lo : shard_lo + n].copy_(values)
                else:
                    part[lo : lo + n].copy_(values)
                for k, flat in flats.items():
                    if k == "master":
                        continue
                    flat[shard_lo : shard_lo + n].copy_(optim["state"][slot.name][k].reshape(-1)[p_lo : p_lo + n])
        for k, flat in flats.items():
            states.write(k, flat)
        for n, p in engine.module.named_parameters():
            if not p.requires_grad and n in model:
                p.copy_(model[n])
        for n, b in engine.module.named_buffers():
            if n in model:
                b.copy_(model[n])
