"""Checkpoints: one rank-count- and stage-independent format, written atomically.

Layout of a checkpoints folder (e.g. output_dir/checkpoints)::

    step-000010/          a complete checkpoint (see below)
    step-000020/
    latest                text: the folder name of the newest complete checkpoint

A checkpoint folder holds:

- `model.pt`: {parameter or buffer name: FULL tensor} (names of `module.named_parameters()` /
  `named_buffers()`, a tied parameter under its first name), in the engine's parameter dtype
  (fp32 master weights; bf16 with low_precision_states).
- `optimizer.pt`: {"type": "adamw" | "sgd", "step": optimizer steps taken, "state": {name:
  {"exp_avg", "exp_avg_sq", "step"} | {"momentum_buffer", "step"}}}, full tensors shaped like
  the parameter (torch.optim's per-parameter names).
- `rng.pt`: a list with one entry per saving rank: {"torch": CPU RNG state, "python":
  random.getstate(), "cuda": the CUDA RNG state of that rank's own device, or None}. (Older
  checkpoints hold every visible GPU's state there; a resume that sees fewer GPUs restores the
  one of its device when present and warns otherwise.)
- `extra.pt`: the caller's `extra` (plain Python data and tensors: loaded with weights_only).
- `meta.json`: format version, step, engine steps, world size, ZeRO stage, precision, loss
  scaler state, the engine config. Written last.

Because every tensor is full and named, a checkpoint saved by N ranks at stage X loads into M
ranks at stage Y with no conversion: each rank reads the files (memory-mapped) and copies out
the slices of its own partitions. Saving gathers partitions with one all_gather per group and
state (stages 1-3; stage 0 already holds everything); rank 0 alone writes, so its CPU memory
briefly holds one full copy of parameters and optimizer states (the other ranks keep none: they
drop each gathered group at once). That copy is the limit for very large models (a 7B model
with AdamW: ~84 GB on rank 0's host); writing one file per group as it is gathered would bound
it to one group (not done yet).

Atomicity: rank 0 writes every file into `.tmp-step-XXXXXX-<id>/`, fsyncs each file and the
folder, renames the folder to `step-XXXXXX` and fsyncs the parent, then writes `latest` the same
way (temporary file, fsync, `os.replace`, fsync the parent). A writer killed at any moment leaves
either the previous state or the new one, plus leftovers the next save removes (`.tmp-*`,
`.del-*`, `.latest-*`): `latest` never names a partial folder, and a `step-*` folder is always
complete, because folders are renamed out of that name (`.del-*`) before they are deleted.
Re-saving an existing step renames the old folder aside first (`.old-*`); `resolve()` falls back
to it, or to the newest `step-*` folder, if `latest` names a folder that is missing. `keep=K`
deletes all but the newest K `step-*` folders before writing and again after `latest` moved
(never the one `latest` names), so at most K + 1 exist at any moment.

RNG: rank r restores entry r when the checkpoint has one (same or smaller world size), else
keeps its own state. With the same ranks and stage, a resumed fp32 run is bit-identical to an
uninterrupted one (parameters, optimizer states, step counts and the loss scale are restored
exactly; gradient buffers are zero at a step boundary).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as tdist

from dsl.engine.errors import RunError, UserError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from dsl.engine.core import Engine

__all__ = ["save", "load", "resolve", "gather_full", "FORMAT_VERSION"]

FORMAT_VERSION = 1
LATEST = "latest"
_STEP_RE = re.compile(r"^step-(\d+)$")


# Filesystem -----------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_file(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _step_folders(root: Path) -> list[tuple[int, Path]]:
    out = []
    for child in root.iterdir() if root.is_dir() else []:
        m = _STEP_RE.match(child.name)
        if m and child.is_dir() and (child / "meta.json").is_file():
            out.append((int(m.group(1)), child))
    return sorted(out)


def _delete(path: Path, root: Path, token: str) -> None:
    """Rename `path` out of the `step-*` namespace first, so a kill during the (non-atomic)
    delete never leaves a half-deleted folder that looks like a checkpoint."""
    doomed = root / f".del-{path.name}-{token}"
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def write_folder(root: Path, name: str, files: dict[str, Any], meta: dict[str, Any], keep: int | None) -> Path:
    """Atomically create `root/name` holding `files` (torch.save) and meta.json; point `latest`
    at it; apply retention. Single writer (rank 0)."""
    root.mkdir(parents=True, exist_ok=True)
    # Leftovers of a writer killed earlier: partial folders, folders being deleted, pointers.
    for stale in [*root.glob(".tmp-*"), *root.glob(".del-*"), *root.glob(f".{LATEST}-*")]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    token = uuid.uuid4().hex[:8]
    # Retention before writing too, so a writer killed before its own clean-up never lets
    # folders pile up: at most keep + 1 `step-*` folders exist at any moment.
    current = root / LATEST
    named = current.read_text(encoding="utf-8").strip() if current.is_file() else None
    _retain(root, keep, protect={named}, token=token)
    tmp = root / f".tmp-{name}-{token}"
    tmp.mkdir()
    for fname, obj in files.items():
        _save_file(obj, tmp / fname)
    _write_text(tmp / "meta.json", json.dumps(meta, indent=1, sort_keys=True))
    _fsync_dir(tmp)
    final = root / name
    old = None
    if final.exists():
        old = root / f".old-{name}-{token}"
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(root)
    pointer = root / f".{LATEST}-{token}"
    _write_text(pointer, name + "\n")
    os.replace(pointer, root / LATEST)
    _fsync_dir(root)
    for aside in root.glob(".old-*"):  # `latest` names a complete folder now
        _delete(aside, root, token)
    _retain(root, keep, protect={name}, token=token)
    return final


def _retain(root: Path, keep: int | None, *, protect: set[str | None], token: str) -> None:
    """Delete all but the newest `keep` `step-*` folders, never one named in `protect`."""
    if keep is None:
        return
    folders = _step_folders(root)
    for _, path in folders[: max(0, len(folders) - keep)]:
        if path.name not in protect:
            _delete(path, root, token)


def resolve(directory: str | os.PathLike) -> Path:
    """The checkpoint folder `latest` names (a `step-*` folder directly also works). Raises
    UserError when there is none."""
    root = Path(directory)
    if (root / "meta.json").is_file():
        return root
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        if (root / name / "meta.json").is_file():
            return root / name
        for aside in sorted(root.glob(f".old-{name}-*")):  # killed while replacing this step
            if (aside / "meta.json").is_file():
                return aside
    folders = _step_folders(root)
    if folders:
        return folders[-1][1]
    raise UserError(f"no checkpoint in {root}: expected a `latest` file or step-NNNNNN folders")


# Gather / scatter of the engine's state --------------------------------------------------


def gather_full(engine: "Engine", *, optimizer: bool, keep: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Full parameters (and optimizer states) by name. Collective: every rank takes part, one
    group at a time (at most one group's full tensors alive besides the result); a rank with
    `keep=False` returns empty dicts and so never holds a full copy (the saving ranks but 0)."""
    stage, states = engine.stage, engine.states
    flats = {k: states.read(k) for k in states.names} if optimizer else {}
    params: dict[str, torch.Tensor] = {}
    optim: dict[str, dict[str, torch.Tensor]] = {}
    step = torch.tensor(float(engine.optimizer_steps))
    for g in stage.layout.groups:
        full = stage.gather_group(stage.param_part(g), g)
        fulls = {
            k: stage.gather_group(f[g.shard_offset : g.shard_offset + g.part_numel].to(full.device), g)
            for k, f in flats.items()
        }
        if not keep:
            continue
        for slot in g.slots:
            sl = slice(slot.offset, slot.offset + slot.numel)
            params[slot.name] = full[sl].view(slot.shape).detach().cpu().clone()
            if optimizer:
                entry = {k: t[sl].view(slot.shape).cpu().clone() for k, t in fulls.items()}
                entry["step"] = step.clone()
                optim[slot.name] = entry
    return params, optim


def _rng_state(device: torch.device) -> dict[str, Any]:
    """This rank's generators: CPU, Python, and the CUDA generator of its own device only (a
    rank draws from no other GPU's, and a resume may see fewer GPUs than the save did)."""
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):  # older checkpoints: every GPU visible at save time
        index = device.index or 0
        if index >= len(cuda):
            log.warning("checkpoint holds CUDA RNG states of %d GPU(s), none for %s: its generator "
                        "is not restored", len(cuda), device)
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


def save(engine: "Engine", directory: str | os.PathLike, *, step: int, extra: dict[str, Any] | None, keep: int | None) -> Path:
    """Collective: every rank calls it; rank 0 writes. Returns the checkpoint folder."""
    if step < 0:
        raise UserError(f"checkpoint step must be >= 0, got {step}")
    if keep is not None and keep < 1:
        raise UserError(f"keep must be >= 1 (checkpoints to retain), got {keep}")
    # Only rank 0 writes, so only rank 0 keeps the full copy of parameters and optimizer states.
    params, optim = gather_full(engine, optimizer=True, keep=engine.rank == 0)
    world = engine.world_size
    rng = [None] * world
    if world > 1:
        tdist.all_gather_object(rng, _rng_state(engine.device))
    else:
        rng = [_rng_state(engine.device)]
    root, name = Path(directory), f"step-{step:06d}"
    error = None
    if engine.rank == 0:
        module = engine.module
        model = dict(params)
        for n, p in module.named_parameters():
            if not p.requires_grad:
                model[n] = p.detach().cpu().clone()
        for n, b in module.named_buffers():
            model[n] = b.detach().cpu().clone()
        meta = {
            "format": FORMAT_VERSION,
            "step": step,
            "global_step": engine.global_step,
            "optimizer_steps": engine.optimizer_steps,
            "skipped_steps": engine.skipped_steps,
            "world_size": world,
            "zero_stage": engine.stage.stage,
            "precision": engine.config.precision,
            "low_precision_states": engine.config.low_precision_states,
            "optimizer": engine.hyper.kind,
            "loss_scale": engine.scaler.state_dict() if engine.scaler is not None else None,
            "config": engine.config.model_dump(mode="json"),
        }
        files = {
            "model.pt": model,
            "optimizer.pt": {"type": engine.hyper.kind, "step": engine.optimizer_steps, "state": optim},
            "rng.pt": rng,
            "extra.pt": dict(extra or {}),
        }
        try:
            write_folder(root, name, files, meta, keep)
        except OSError as err:
            error = f"writing checkpoint {root / name} failed: {err}"
    if world > 1:
        box = [error]
        tdist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise RunError(error)
    return root / name


def load(engine: "Engine", directory: str | os.PathLike) -> dict[str, Any]:
    """Collective. Restores parameters, optimizer states, steps, loss scale and RNG; returns
    `extra` plus "step"."""
    path = resolve(directory)
    if engine.world_size > 1:  # every rank loads the folder rank 0 chose
        box = [str(path)]
        tdist.broadcast_object_list(box, src=0)
        path = Path(box[0])
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT_VERSION:
        raise UserError(f"{path}: checkpoint format {meta.get('format')} is not {FORMAT_VERSION}")
    if meta["optimizer"] != engine.hyper.kind:
        raise UserError(f"{path} holds {meta['optimizer']} optimizer states but this engine uses "
                        f"{engine.hyper.kind}; set optimizer.type: {meta['optimizer']}")
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
        for g in stage.layout.groups:
            for slot in g.slots:
                if tuple(model[slot.name].shape) != tuple(slot.shape):
                    raise UserError(f"{path}: {slot.name} has shape {tuple(model[slot.name].shape)} "
                                    f"in the checkpoint, {tuple(slot.shape)} in this model")
            part = stage.param_part(g)
            for slot, p_lo, shard_lo, n in stage.layout.pieces(g):
                lo = shard_lo - g.shard_offset
                part[lo : lo + n].copy_(model[slot.name].reshape(-1)[p_lo : p_lo + n])
                for k, flat in flats.items():
                    flat[shard_lo : shard_lo + n].copy_(optim["state"][slot.name][k].reshape(-1)[p_lo : p_lo + n])
        for k, flat in flats.items():
            states.write(k, flat)
        for n, p in engine.module.named_parameters():
            if not p.requires_grad and n in model:
                p.copy_(model[n])
        for n, b in engine.module.named_buffers():
            if n in model:
                b.copy_(model[n])
    states.sync_from_params()
    stage.after_update()  # stages 1-2: all_gather the partitions; stage 3: drop stale gathers, recast work
    engine.zero_grad()
    engine.global_step = int(meta["global_step"])
    engine.optimizer_steps = int(meta["optimizer_steps"])
    engine.skipped_steps = int(meta.get("skipped_steps", 0))
    if engine.scaler is not None and meta.get("loss_scale") is not None:
        engine.scaler.load_state_dict(meta["loss_scale"])
    rng = torch.load(path / "rng.pt", weights_only=True)
    if engine.rank < len(rng):
        _set_rng_state(rng[engine.rank], engine.device)
    engine._refresh_lr()
    extra = torch.load(path / "extra.pt", weights_only=True)
    return {**extra, "step": int(meta["step"])}
