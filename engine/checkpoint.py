"""Checkpoints: per-parameter slices written by every rank in parallel, committed atomically;
loadable at any rank count, ZeRO stage, precision layout and optimizer offload.

Layout of a checkpoints folder (e.g. output_dir/checkpoints)::

    step-000010/          a complete checkpoint (see below)
    step-000020/
    latest                text: the folder name of the newest complete checkpoint

A checkpoint folder (format 2) holds:

- `rank-<r>-of-<W>.safetensors`, one per saving rank r of W (safetensors layout,
  engine/ckpt_files.py): for every trainable parameter (by its `named_parameters()` name, a tied
  one under its first name) with elements in r's writer range, the 1-D slices `param/<name>`
  (the values the optimizer updates: fp32 master weights under both precision layouts; bf16
  with low_precision_states) and `<state>/<name>` per optimizer state (`exp_avg`, `exp_avg_sq`
  | `momentum_buffer`), in the engine's parameter dtype; metadata `dsl` = {"format": 2, "writer",
  "writers", "slices": {name: [start, numel, full shape]}}. The writer range is the rank's own
  partition at stages 1-3 and 1/W of the replicated model at stage 0 (engine/ckpt_slices.py says
  why). Rank 0's file also holds `module/<name>`: frozen parameters and buffers, whole.
- `rng.pt`: a list with one entry per saving rank: {"torch": CPU RNG state, "python":
  random.getstate(), "cuda": the CUDA RNG state of that rank's own device, or None}. (Older
  checkpoints hold every visible GPU's state there; a resume that sees fewer GPUs restores the
  one of its device when present and warns otherwise.)
- `extra.pt`: the caller's `extra` (plain Python data and tensors: loaded with weights_only).
- `meta.json`: format version, step, engine steps, world size (= writers), ZeRO stage,
  precision, optimizer and its state names, loss scaler state, the engine config, and `layout`:
  the saving ranks' parameter groups and partition count, from which a loading rank computes
  which file holds which elements of each parameter. Written last.

Memory: a save writes each rank's slices straight from the tensors that hold them (CPU), or
through one staging buffer of `offload.sub_group_mib` (device tensors; NVMe-offloaded states are
read from their sub-group files by range, never whole). A load reads only the byte ranges that
overlap the loading rank's own partition, straight into its tensors or through the same bounded
buffer. So no rank ever holds more than one sub-group of anything beyond its own state, and no
rank gathers the model (format 1 gathered everything on rank 0: ~84 GB for a 7B model with
AdamW). `Engine.full_state_dict()` still gathers, for callers who ask; `load_full()` assembles a
folder's full tensors for tools.

Atomicity, with every rank writing: rank 0 removes leftovers of killed writers, applies
retention, creates `.tmp-step-XXXXXX-<id>/` and tells every rank its name (a rank that cannot see
it fails the save: the folder must be shared by all ranks); every rank writes and fsyncs its file
there; a barrier (an all_gather of each rank's outcome: a failure anywhere fails the save on every
rank, with no rename); then rank 0 alone writes rng.pt, extra.pt and meta.json, fsyncs them and
the folder, renames it to `step-XXXXXX`, fsyncs the parent, and writes `latest` the same way
(temporary file, fsync, `os.replace`, fsync the parent). A writer killed at any moment leaves
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
exactly; gradient buffers are zero at a step boundary); on another rank count, stage or layout
the restored master weights and states are the same bits, so the next forward computes the same
loss wherever its arithmetic is the same (fp32).

Format 1 (full tensors in model.pt / optimizer.pt, written by rank 0) still loads
(engine/ckpt_v1.py); nothing writes it.
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

from dsl.engine import ckpt_slices, ckpt_v1
from dsl.engine.ckpt_files import Staging
from dsl.engine.errors import RunError, UserError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from dsl.engine.core import Engine

__all__ = ["save", "load", "resolve", "load_full", "gather_full", "FORMAT_VERSION"]

FORMAT_VERSION = 2
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


def _clear_leftovers(root: Path) -> None:
    """Partial folders, folders being deleted and pointers of writers killed earlier."""
    for stale in [*root.glob(".tmp-*"), *root.glob(".del-*"), *root.glob(f".{LATEST}-*")]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def begin_folder(root: Path, name: str, keep: int | None) -> Path:
    """Rank 0, before any rank writes: clear leftovers, apply retention, create and return the
    temporary folder every rank writes into."""
    root.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(root)
    token = uuid.uuid4().hex[:8]
    # Retention before writing too, so a writer killed before its own clean-up never lets
    # folders pile up: at most keep + 1 `step-*` folders exist at any moment.
    current = root / LATEST
    named = current.read_text(encoding="utf-8").strip() if current.is_file() else None
    _retain(root, keep, protect={named}, token=token)
    tmp = root / f".tmp-{name}-{token}"
    tmp.mkdir()
    return tmp


def commit_folder(root: Path, tmp: Path, name: str, files: dict[str, Any], meta: dict[str, Any],
                  keep: int | None) -> Path:
    """Rank 0, after every rank's file in `tmp` is complete and fsynced: add `files`
    (torch.save) and meta.json, rename `tmp` to `root/name`, point `latest` at it, apply
    retention."""
    token = tmp.name.rsplit("-", 1)[-1]
    for fname, obj in files.items():
        _save_file(obj, tmp / fname)
    _write_text(tmp / "meta.json", json.dumps(meta, indent=1, sort_keys=True))
    _fsync_dir(tmp)
    final = root / name
    if final.exists():
        os.rename(final, root / f".old-{name}-{token}")
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
    device = engine.device  # partitions in host memory (CPU offload) are gathered on the device:
    for g in stage.layout.groups:  # NCCL takes device tensors only
        full = stage.gather_group(stage.param_part(g).to(device), g)
        fulls = {
            k: stage.gather_group(f[g.shard_offset : g.shard_offset + g.part_numel].to(device), g)
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



# Save / load -----------------------------------------------------------------------------


def _sub_group_bytes(engine: "Engine") -> int:
    """The staging bound of a save or load: one sub-group (`offload.sub_group_mib`)."""
    return int(engine.config.offload.sub_group_mib * (1 << 20))


def _from_rank0(engine: "Engine", obj: Any) -> Any:
    if engine.world_size == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def _all(engine: "Engine", obj: Any) -> list[Any]:
    """Every rank's `obj` (also the barrier of the protocol)."""
    if engine.world_size == 1:
        return [obj]
    out = [None] * engine.world_size
    tdist.all_gather_object(out, obj)
    return out


def _outcome(err: BaseException | None, rank: int) -> str | None:
    return None if err is None else f"rank {rank}: {type(err).__name__}: {err}"


def _raise_failures(own: BaseException | None, outcomes: list[str | None], what: str) -> None:
    """After a collective exchange of outcomes: every rank raises when any rank failed (its own
    error where it had one, a RunError naming the others' elsewhere)."""
    failed = [o for o in outcomes if o is not None]
    if not failed:
        return
    if isinstance(own, OSError):
        raise RunError(f"{what}: {own}") from own
    if own is not None:
        raise own
    raise RunError(f"{what}: " + "; ".join(failed))


def save(engine: "Engine", directory: str | os.PathLike, *, step: int, extra: dict[str, Any] | None, keep: int | None) -> Path:
    """Collective: every rank calls it and writes its own slices. Returns the checkpoint folder."""
    if step < 0:
        raise UserError(f"checkpoint step must be >= 0, got {step}")
    if keep is not None and keep < 1:
        raise UserError(f"keep must be >= 1 (checkpoints to retain), got {keep}")
    rank, world = engine.rank, engine.world_size
    root, name = Path(directory), f"step-{step:06d}"
    rng = _all(engine, _rng_state(engine.device))
    tmp, error = None, None
    if rank == 0:
        try:
            tmp = str(begin_folder(root, name, keep))
        except OSError as err:
            error = f"preparing checkpoint {root / name} failed: {err}"
    tmp, error = _from_rank0(engine, (tmp, error))
    if error is not None:
        raise RunError(error)
    folder = Path(tmp)
    own: BaseException | None = None
    try:
        if not folder.is_dir():
            raise UserError(f"{folder} (created by rank 0) is not visible on rank {rank}: every rank "
                            "writes its own checkpoint file, so the checkpoint folder must be on a "
                            "filesystem all hosts share")
        ckpt_slices.write_rank(engine, folder / ckpt_slices.file_name(rank, world), rank, world,
                               Staging(_sub_group_bytes(engine)))
    except Exception as err:  # noqa: BLE001 - raised below on every rank, after the barrier
        own = err
    outcomes = _all(engine, _outcome(own, rank))
    if any(o is not None for o in outcomes):
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        _raise_failures(own, outcomes, f"writing checkpoint {root / name} failed")
    error = None
    if rank == 0:
        meta = {
            "format": FORMAT_VERSION,
            "step": step,
            "global_step": engine.global_step,
            "optimizer_steps": engine.optimizer_steps,
            "skipped_steps": engine.skipped_steps,
            "world_size": world,
            "writers": world,
            "files": [ckpt_slices.file_name(r, world) for r in range(world)],
            "zero_stage": engine.stage.stage,
            "layout": ckpt_slices.layout_meta(engine.stage.layout),
            "precision": engine.config.precision,
            "low_precision_states": engine.config.low_precision_states,
            "optimizer": engine.hyper.kind,
            "state_names": list(engine.states.names),
            "loss_scale": engine.scaler.state_dict() if engine.scaler is not None else None,
            "config": engine.config.model_dump(mode="json"),
        }
        try:
            missing = [f for f in meta["files"] if not (folder / f).is_file()]
            if missing:
                raise OSError(f"rank files missing in {folder}: {', '.join(missing)} (is the folder "
                              "on a filesystem all hosts share?)")
            commit_folder(root, folder, name, {"rng.pt": rng, "extra.pt": dict(extra or {})}, meta, keep)
        except OSError as err:
            error = f"writing checkpoint {root / name} failed: {err}"
    error = _from_rank0(engine, error)
    if error is not None:
        raise RunError(error)
    return root / name


def _read_meta(path: Path) -> dict[str, Any]:
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    if meta.get("format") not in (1, FORMAT_VERSION):
        raise UserError(f"{path}: checkpoint format {meta.get('format')} is not one this version reads "
                        f"(1, {FORMAT_VERSION})")
    return meta


def load(engine: "Engine", directory: str | os.PathLike) -> dict[str, Any]:
    """Collective. Restores parameters, optimizer states, steps, loss scale and RNG; returns
    `extra` plus "step". Each rank reads only the slices that overlap its own partition."""
    found, error = None, None
    if engine.rank == 0:  # every rank loads the folder rank 0 chose
        try:
            found = str(resolve(directory))
        except UserError as err:
            error = err
    found, error = _from_rank0(engine, (found, error))
    if error is not None:
        raise error
    path = Path(found)
    own: BaseException | None = None
    meta: dict[str, Any] = {}
    try:
        meta = _read_meta(path)
        if meta["optimizer"] != engine.hyper.kind:
            raise UserError(f"{path} holds {meta['optimizer']} optimizer states but this engine uses "
                            f"{engine.hyper.kind}; set optimizer.type: {meta['optimizer']}")
        if meta["format"] == 1:
            ckpt_v1.load_tensors(engine, path)
        else:
            ckpt_slices.load_rank(engine, path, meta, Staging(_sub_group_bytes(engine)))
    except Exception as err:  # noqa: BLE001 - raised below on every rank, after the exchange
        own = err
    _raise_failures(own, _all(engine, _outcome(own, engine.rank)), f"loading checkpoint {path} failed")
    engine.states.sync_from_params()
    engine.stage.after_update()  # stages 1-2: all_gather the partitions; stage 3: drop stale gathers, recast work
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


def load_full(directory: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """The full tensors of the checkpoint `directory` names, by field: {"param": {name: tensor},
    "<optimizer state>": {name: tensor}, "module": {frozen parameter or buffer name: tensor}}.
    Not collective; holds the whole checkpoint in memory (for tools and exports)."""
    path = resolve(directory)
    meta = _read_meta(path)
    if meta["format"] == 1:
        raise UserError(f"{path}: format 1 holds full tensors already: torch.load model.pt and optimizer.pt")
    return ckpt_slices.read_full(path, meta)
