"""Import a DeepSpeed ZeRO checkpoint (stages 1-3, fp32 or bf16, any rank count; DeepSpeed 0.19.8)
as a dsl checkpoint, which any rank count, stage and layout of dsl then loads.

    python -m dsl.engine.ds_import DS_DIR OUTPUT_DIR/checkpoints [--prefix lm.] [--no-optimizer]

`DS_DIR` is what `engine.save_checkpoint(DS_DIR)` wrote (its `latest` file names the tag folder)
or a tag folder itself (`global_step10/`). The result is a format-2 dsl checkpoint folder
(engine/checkpoint.py) `step-<global_steps>` under the target folder, with `latest` pointing at
it, so a dsl run with that output_dir resumes from it (run.train.resume).

How the files are read: engine/ds_import_read.py.

The dsl checkpoint: one writer file (`rank-00000-of-00001.safetensors`) with `param/<prefix +
name>` (the fp32 master), `exp_avg/...`, `exp_avg_sq/...` per trainable parameter and
`module/...` for frozen parameters and buffers; meta.json with a one-group replicated layout,
`optimizer_steps` = the optimizer's `step` (Adam's bias correction goes on from it), and
`global_step` / `step` = DeepSpeed's `global_steps`; extra.pt holds `samples_seen`
(`global_samples`, where engine/train.py continues the data) and `imported_from`. With
`optimizer=False` the moments are zeros and the step count 0, which is a fresh AdamW exactly.
The hyper-parameters are not imported: dsl trains with its own engine.optimizer and evaluates
its engine.scheduler at the imported step count (DeepSpeed's are recorded in extra.pt's
`imported_from`, for comparison). `prefix` maps DeepSpeed's names (the module's own) to dsl's: a Hugging Face model trained by dsl
has its parameters under `lm.` (engine/hf_model.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from dsl.engine.ckpt_files import Entry, write_file
from dsl.engine.ckpt_folders import begin_folder, commit_folder, discard
from dsl.engine.ckpt_slices import file_name
from dsl.engine.ds_import_read import DeepSpeedCheckpoint, read_checkpoint
from dsl.engine.errors import DslError, UserError

__all__ = ["import_deepspeed", "main", "STATES"]

STATES = ("exp_avg", "exp_avg_sq")


def _optimizer_kind(ckpt: DeepSpeedCheckpoint) -> str:
    opt = (ckpt.ds_config.get("optimizer") or {})
    kind = str(opt.get("type", "adamw")).lower()
    params = opt.get("params") or {}
    if kind == "adamw" or (kind == "adam" and params.get("adam_w_mode", True)):
        return "adamw"
    raise UserError(f"{ckpt.folder}: the DeepSpeed optimizer is {opt.get('type')} "
                    f"{'(adam_w_mode false: L2 Adam)' if kind == 'adam' else ''}; dsl imports the states of "
                    f"AdamW (DeepSpeed's Adam/AdamW with adam_w_mode) only")


def import_deepspeed(source: str | Path, checkpoints: str | Path, *, prefix: str = "lm.",
                     optimizer: bool = True) -> Path:
    """Write the DeepSpeed checkpoint `source` as a dsl checkpoint folder under `checkpoints`
    (which `latest` then names); returns that folder. Raises UserError."""
    ckpt = read_checkpoint(source)
    kind = _optimizer_kind(ckpt)
    root = Path(checkpoints)
    step_count = ckpt.step() if optimizer else 0
    entries: list[Entry] = []
    slices: dict[str, list[Any]] = {}
    groups: list[list[Any]] = [[]]
    for name in ckpt.names:
        shape = [int(d) for d in next(s[name] for s in ckpt.groups if name in s)]
        numel = int(torch.Size(shape).numel())
        dsl_name = prefix + name
        groups[0].append([dsl_name, shape])
        slices[dsl_name] = [0, numel, shape]
        entries.append(Entry(f"param/{dsl_name}", torch.float32, [numel],
                             lambda name=name: (p.float() for p in ckpt.pieces("param", name))))
        for state in STATES:
            if optimizer:
                pieces = lambda name=name, state=state: (p.float() for p in ckpt.pieces(state, name))  # noqa: E731
            else:
                pieces = lambda numel=numel: iter([torch.zeros(numel)])  # noqa: E731
            entries.append(Entry(f"{state}/{dsl_name}", torch.float32, [numel], pieces))
    for name, t in ckpt.frozen():
        entries.append(Entry(f"module/{prefix}{name}", t.dtype, list(t.shape),
                             lambda t=t: iter([t.contiguous().reshape(-1)])))
    name = f"step-{ckpt.global_steps:06d}"
    folder = begin_folder(root, name, None)
    try:
        write_file(folder / file_name(0, 1), entries,
                   {"dsl": json.dumps({"format": 2, "writer": 0, "writers": 1, "slices": slices}, separators=(",", ":"))})
        meta = {"format": 2, "step": ckpt.global_steps, "global_step": ckpt.global_steps,
                "optimizer_steps": step_count, "skipped_steps": ckpt.skipped_steps, "world_size": 1, "writers": 1,
                "files": [file_name(0, 1)], "zero_stage": 0, "layout": {"parts": 1, "groups": groups},
                "precision": "bf16" if (ckpt.ds_config.get("bf16") or {}).get("enabled") else "fp32",
                "low_precision_states": False, "optimizer": kind, "state_names": list(STATES),
                "loss_scale": None, "config": None}
        imported = {"deepspeed": str(ckpt.folder.resolve()), "zero_stage": ckpt.stage, "world_size": ckpt.world,
                    "ds_version": ckpt.ds_version, "optimizer": optimizer,
                    "ds_optimizer": ckpt.ds_config.get("optimizer"), "ds_scheduler": ckpt.ds_config.get("scheduler")}
        extra = {"samples_seen": ckpt.global_samples, "imported_from": imported}
        return commit_folder(root, folder, name, {"rng.pt": [], "extra.pt": extra}, meta, None)
    except BaseException:
        discard(folder)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsl.engine.ds_import", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="the DeepSpeed checkpoint folder (with `latest`) or a tag folder in it")
    parser.add_argument("checkpoints", help="the dsl checkpoints folder to write into (e.g. OUTPUT_DIR/checkpoints)")
    parser.add_argument("--prefix", default="lm.", help="prepended to every name (dsl's Hugging Face models: lm.)")
    parser.add_argument("--no-optimizer", action="store_true", help="weights only: a fresh optimizer state")
    args = parser.parse_args(argv)
    try:
        folder = import_deepspeed(args.source, args.checkpoints, prefix=args.prefix, optimizer=not args.no_optimizer)
    except DslError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return err.exit_code
    print(folder)  # stdout is data: the checkpoint folder written
    print(f"{parser.prog}: a dsl run with this checkpoints folder in its output_dir resumes from it",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
