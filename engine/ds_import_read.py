"""Read a DeepSpeed 0.19.8 ZeRO checkpoint (stages 1-3, fp32 or bf16, any rank count) without
importing DeepSpeed: the tensors of every trainable parameter, as views of its files
(engine/ds_import.py writes them as a dsl checkpoint).

What DeepSpeed writes (read from its `deepspeed/utils/zero_to_fp32.py` and
`deepspeed/checkpoint/constants.py`; no DeepSpeed import is needed here):

- `mp_rank_00_model_states.pt` (stages 0-2) or `zero_pp_rank_<r>_mp_rank_00_model_states.pt`
  (stage 3, one per rank): `param_shapes` (one ordered {name: shape} per optimizer parameter
  group, the trainable parameters in their flat order), `frozen_param_shapes`,
  `frozen_param_fragments` (stage 3: each rank's piece of every frozen parameter), `module` (the
  module's state dict: full tensors at stages 0-2, empty placeholders for parameters at stage 3),
  `buffer_names`, `global_steps`, `global_samples`, `skipped_steps`, `ds_config`.
- `zero_pp_rank_<r>_mp_rank_00_optim_states.pt` (`bf16_zero_pp_rank_...` from its BF16_Optimizer,
  bf16 at stage 1), one per data-parallel rank r of W, under `optimizer_state_dict`:
  - stages 1-2: `single_partition_of_fp32_groups[g]`, rank r's partition of group g's fp32 flat
    vector; the W partitions have one size and concatenate to the group's flat vector, in which
    parameter i starts after the numels of the ones before plus `param_alignment_paddings[g]`
    (tail padding rounds the vector up to a multiple of 2W). `base_optimizer_state["state"][g]`
    holds `exp_avg` / `exp_avg_sq` over the same partition, and `step`.
  - stage 3: every parameter is partitioned on its own: rank r holds elements
    [r * ceil(n / W), (r + 1) * ceil(n / W)) of a parameter of n elements (the last rank's piece
    padded), and `fp32_flat_groups` (one tensor per sub-group, concatenated) hold those pieces
    back to back in `param_shapes` order; `optimizer_state_dict["state"][k]` holds the moments
    of sub-group k over the same elements.
  Pickles of these files name DeepSpeed classes (its loss scaler, ZeroStageEnum, fragment
  addresses); they are read as plain placeholders, and anything else than torch, numpy and
  standard containers is refused.

Memory: the DeepSpeed files are memory-mapped and each parameter is written from views of them,
one piece per DeepSpeed rank, so the import holds no full copy of anything.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsl.engine.errors import UserError

__all__ = ["DeepSpeedCheckpoint", "read_checkpoint"]

_ALLOWED = re.compile(r"^(torch(\..*)?|collections|numpy(\..*)?|_codecs|argparse)$")


class _Placeholder:
    """A DeepSpeed object in a pickle (loss scaler, fragment address): its state, nothing else."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] == "deepspeed":
            return int if name.endswith("Enum") else _Placeholder  # ZeroStageEnum(2) -> 2
        if not _ALLOWED.match(module):
            raise pickle.UnpicklingError(f"{module}.{name} is not a class a DeepSpeed checkpoint holds")
        return super().find_class(module, name)


class _PickleModule:
    Unpickler = _Unpickler
    load = staticmethod(pickle.load)


def _load(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False, pickle_module=_PickleModule)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as err:
        raise UserError(f"{path}: cannot read this DeepSpeed checkpoint file: {err}") from None


@dataclass
class _Span:
    """Pieces of per-rank flat tensors: rank r's tensor list and where each starts."""

    tensors: list[torch.Tensor]

    def read(self, lo: int, n: int) -> Iterator[torch.Tensor]:
        """Views of elements [lo, lo + n) of the concatenation of `tensors`."""
        at = 0
        for t in self.tensors:
            a, b = max(lo, at), min(lo + n, at + t.numel())
            if a < b:
                yield t.reshape(-1)[a - at : b - at]
            at += t.numel()


class DeepSpeedCheckpoint:
    """One tag folder of a DeepSpeed ZeRO checkpoint, read lazily (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        optim_files = sorted(folder.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=_rank_of)
        if not optim_files:
            stage0 = (folder / "mp_rank_00_model_states.pt").is_file()
            raise UserError(f"{folder}: no zero_pp_rank_*_optim_states.pt files: "
                            + ("a ZeRO stage 0 checkpoint (the optimizer inside the model file) is not "
                               "imported; save it with zero_optimization.stage 1, 2 or 3" if stage0
                               else "not a DeepSpeed checkpoint folder"))
        if optim_files[0].name.startswith("fp16_"):
            raise UserError(f"{folder}: {optim_files[0].name}: checkpoints of DeepSpeed's fp16 optimizer wrapper "
                            f"are not imported; fp32 and bf16 ones at ZeRO stages 1-3 are")
        self.optim = [_load(p)["optimizer_state_dict"] for p in optim_files]
        first = self.optim[0]
        # DeepSpeed's BF16_Optimizer (bf16 with ZeRO stage 0-1, files bf16_zero_pp_rank_*) has no
        # zero_stage and no per-parameter alignment: stage 1's flat layout.
        self.stage = int(first.get("zero_stage", 1))
        counts = first["partition_count"]
        self.world = max(counts) if isinstance(counts, list) else int(counts)
        if self.world != len(optim_files):
            raise UserError(f"{folder}: the optimizer states are partitioned over {self.world} ranks but "
                            f"{len(optim_files)} *_optim_states.pt files are there (an incomplete save?)")
        model_file = folder / ("mp_rank_00_model_states.pt" if self.stage <= 2
                               else "zero_pp_rank_0_mp_rank_00_model_states.pt")
        if not model_file.is_file():
            raise UserError(f"{folder}: {model_file.name} is missing (an incomplete save?)")
        self.model = _load(model_file)
        self.model_files = ([self.model] + [_load(folder / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
                                            for r in range(1, self.world)]) if self.stage == 3 else [self.model]
        self.groups: list[dict[str, torch.Size]] = [dict(g) for g in self.model["param_shapes"]]
        self.ds_config: dict[str, Any] = self.model.get("ds_config") or {}
        self.global_steps = int(self.model.get("global_steps", 0))
        self.global_samples = int(self.model.get("global_samples", 0))
        self.skipped_steps = int(self.model.get("skipped_steps", 0))
        self.ds_version = str(self.model.get("ds_version", "unknown"))
        self._index = self._locate()

    def _moments(self, rank: int) -> dict[Any, dict[str, torch.Tensor]]:
        o = self.optim[rank]
        base = o["base_optimizer_state"] if self.stage <= 2 else o["optimizer_state_dict"]
        return base["state"]

    def _locate(self) -> dict[str, tuple[str, int, int, int]]:
        """name -> (kind, group, offset, numel): where each trainable parameter lives."""
        out: dict[str, tuple[str, int, int, int]] = {}
        offset = 0
        paddings = self.optim[0].get("param_alignment_paddings")
        for g, shapes in enumerate(self.groups):
            if self.stage <= 2:
                offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                n = int(torch.Size(shape).numel())
                out[name] = ("flat" if self.stage <= 2 else "param", g, offset, n)
                if self.stage <= 2:
                    offset += n + (paddings[g][i] if paddings else 0)
                else:
                    offset += -(-n // self.world)
        return out

    @property
    def names(self) -> list[str]:
        return [name for shapes in self.groups for name in shapes]

    def step(self) -> int:
        """Optimizer steps taken (Adam's `step`, the same in every group and rank)."""
        steps = {float(s["step"]) for r in range(self.world) for s in self._moments(r).values() if "step" in s}
        if len(steps) != 1:
            raise UserError(f"{self.folder}: the optimizer's step count differs between groups: {sorted(steps)}")
        return int(steps.pop())

    def pieces(self, field: str, name: str) -> Iterator[torch.Tensor]:
        """Views whose concatenation is the full flattened `field` (`param` or a state) of `name`."""
        kind, g, offset, n = self._index[name]
        if kind == "flat":  # stages 1-2: a range of group g's flat vector, cut into W equal partitions
            yield from _Span([self._flat(field, r, g) for r in range(self.world)]).read(offset, n)
            return
        per = -(-n // self.world)  # stage 3: each rank holds its own ceil(n / W) elements
        left = n
        for r in range(self.world):
            take = min(per, left)
            if take <= 0:
                break
            yield from _Span(self._flat3(field, r)).read(offset, take)
            left -= take

    def _flat(self, field: str, rank: int, g: int) -> torch.Tensor:
        if field == "param":
            return self.optim[rank]["single_partition_of_fp32_groups"][g]
        return self._moments(rank)[g][field]

    def _flat3(self, field: str, rank: int) -> list[torch.Tensor]:
        if field == "param":
            return list(self.optim[rank]["fp32_flat_groups"])
        moments = self._moments(rank)
        return [moments[k][field] for k in sorted(moments)]

    def frozen(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Frozen parameters and buffers, whole."""
        shapes = dict(self.model.get("frozen_param_shapes") or {})
        module = self.model.get("module") or {}
        for name, shape in shapes.items():
            if self.stage <= 2:
                yield name, module[name]
            else:
                frags = [m["frozen_param_fragments"][name].reshape(-1) for m in self.model_files]
                yield name, torch.cat(frags)[: torch.Size(shape).numel()].view(shape)
        for name in self.model.get("buffer_names") or []:
            if name in module:
                yield name, module[name]


def _rank_of(path: Path) -> int:
    found = re.search(r"zero_pp_rank_(\d+)_", path.name)
    return int(found.group(1)) if found else -1


def read_checkpoint(source: str | Path) -> DeepSpeedCheckpoint:
    """The checkpoint `source` names: a folder with DeepSpeed's `latest` file, or a tag folder."""
    path = Path(source).expanduser()
    if not path.is_dir():
        raise UserError(f"{path}: no such DeepSpeed checkpoint folder")
    if (path / "latest").is_file() and not list(path.glob("*_optim_states.pt")):
        tag = (path / "latest").read_text(encoding="utf-8").strip()
        path = path / tag
        if not path.is_dir():
            raise UserError(f"{path.parent}/latest names {tag!r}, which is not a folder there")
    return DeepSpeedCheckpoint(path)
