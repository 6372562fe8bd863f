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

Two writers in one folder (two runs, or a run and a tool): a `.tmp-*` folder is locked by the
writer that made it (flock) until it is renamed, so the leftover clean-up removes only those of
dead writers, never another live run's checkpoint in progress (engine/ckpt_folders.py).
`dsl launch` refuses a second launch into a run folder anyway (launcher/runlock.py).

A write that fails (a full disk, a quota) raises WriteError (exit 74) on every rank, naming the
file and the free space, and leaves `latest` and the previous checkpoint as they were.

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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as tdist

from dsl.engine import ckpt_slices, ckpt_v1
from dsl.engine.ckpt_files import Staging
from dsl.engine.ckpt_folders import LATEST, begin_folder, commit_folder, discard, step_folders
from dsl.engine.errors import DslError, RunError, UserError, WriteError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from dsl.engine.core import Engine

__all__ = ["save", "load", "resolve", "load_full", "gather_full", "FORMAT_VERSION"]

FORMAT_VERSION = 2


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
    folders = step_folders(root)
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
    # Stage 3 under NVMe optimizer offload keeps its master in the optimizer's files only.
    master = states.read("master") if getattr(stage, "master_owner", None) is not None else None
    device = engine.device  # partitions in host memory (CPU offload) are gathered on the device:
    for g in stage.layout.groups:  # NCCL takes device tensors only
        part = stage.param_part(g) if master is None else master[g.shard_offset : g.shard_offset + g.part_numel]
        full = stage.gather_group(part.to(device), g)
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


def _outcome(err: BaseException | None, rank: int) -> tuple[bool, str] | None:
    """(a failed write?, message) of a rank's part of a save; None: it went well."""
    if err is None:
        return None
    if isinstance(err, WriteError):
        return True, str(err)
    return False, f"rank {rank}: {type(err).__name__}: {err}"


def _raise_failures(own: BaseException | None, outcomes: list[tuple[bool, str] | None], what: str) -> None:
    """After a collective exchange of outcomes: every rank raises when any rank failed (its own
    error where it had one; elsewhere the failed write's WriteError, echoed, or a RunError naming
    the others' errors), so every rank of a save that ran out of space exits 74 and the message
    is printed once (by the rank whose write failed)."""
    failed = [o for o in outcomes if o is not None]
    if not failed:
        return
    if isinstance(own, OSError):
        raise RunError(f"{what}: {own}") from own
    if own is not None:
        raise own
    writes = [text for is_write, text in failed if is_write]
    if writes:
        raise WriteError(writes[0], echoed=True)
    raise RunError(f"{what}: " + "; ".join(text for _, text in failed))


def _rank0_step(engine: "Engine", action: Callable[[], Any]) -> Any:
    """Run `action` on rank 0 and give every rank its result, or raise its error on every rank
    (a WriteError as a WriteError: exit 74 everywhere, printed by rank 0 only)."""
    result, failure = None, None
    if engine.rank == 0:
        try:
            result = action()
        except (OSError, DslError) as err:
            failure = (isinstance(err, WriteError), str(err))
    result, failure = _from_rank0(engine, (result, failure))
    if failure is not None:
        is_write, text = failure
        raise WriteError(text, echoed=engine.rank != 0) if is_write else RunError(text)
    return result


def save(engine: "Engine", directory: str | os.PathLike, *, step: int, extra: dict[str, Any] | None, keep: int | None) -> Path:
    """Collective: every rank calls it and writes its own slices. Returns the checkpoint folder.
    A failed write raises WriteError on every rank (engine/errors.py) and leaves the previous
    checkpoint, and `latest`, as they were."""
    if step < 0:
        raise UserError(f"checkpoint step must be >= 0, got {step}")
    if keep is not None and keep < 1:
        raise UserError(f"keep must be >= 1 (checkpoints to retain), got {keep}")
    rank, world = engine.rank, engine.world_size
    root, name = Path(directory), f"step-{step:06d}"
    rng = _all(engine, _rng_state(engine.device))
    folder = Path(_rank0_step(engine, lambda: str(begin_folder(root, name, keep))))
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
            discard(folder)
        # Every rank waits for the discard: on a full disk it frees the space that the failing
        # rank's message (its stderr is a file in the run folder, torchrun's tee) is written to.
        _all(engine, None)
        _raise_failures(own, outcomes, f"writing checkpoint {root / name} failed")

    def commit() -> None:
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
                raise RunError(f"writing checkpoint {root / name} failed: rank files missing in "
                               f"{folder}: {', '.join(missing)} (is the folder on a filesystem all "
                               "hosts share?)")
            commit_folder(root, folder, name, {"rng.pt": rng, "extra.pt": dict(extra or {})}, meta, keep)
        except (OSError, DslError) as err:
            discard(folder)
            if isinstance(err, OSError):
                raise RunError(f"writing checkpoint {root / name} failed: {err}") from None
            raise

    _rank0_step(engine, commit)
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
