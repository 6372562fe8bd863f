"""Export a dsl checkpoint of a Hugging Face model as a folder `from_pretrained` loads.

    python -m dsl.engine.hf_export CHECKPOINT --out DIR [--config CONFIG] [--max-shard-mib N]

CHECKPOINT is a checkpoints folder (its `latest` is exported) or one `step-*` folder
(engine/checkpoint.py). DIR receives `config.json` (a copy of the model's own: `--config`, a
folder or its config.json; by default the `run.train.model` of the run's resolved.yaml, next to
the checkpoints folder) and the weights in Hugging Face's names (the engine's names without the
`lm.` of engine/hf_model.py's wrapper): `model.safetensors`, or `model-0000i-of-0000N.safetensors`
shards of at most `--max-shard-mib` with `model.safetensors.index.json` (`weight_map`). A tied
output head is saved once, under the embedding's name, as transformers saves it.

Streaming: the headers of the rank files tell each parameter's slices, their writers and dtypes;
the output header is computed from those alone, then each parameter is read from its writers'
files, slice by slice (positioned reads, engine/ckpt_files.py `RankFile.read_into`), into a buffer
of that slice's size and written out (`write_file`'s entries produce their bytes one piece at a
time). So the export holds one parameter slice at a time, never the model (no gather, no rank 0,
no process group). Values are the optimizer's parameters: fp32 master weights (bf16 with
low_precision_states). Frozen parameters and buffers (the `module/` entries) are not exported.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

import torch

from dsl.engine.ckpt_files import Entry, RankFile, write_file
from dsl.engine.ckpt_slices import PARAM, file_name
from dsl.engine.errors import DslError, UserError

__all__ = ["export_hf", "main", "PREFIX"]

PREFIX = "lm."
"""engine/hf_model.py's wrapper attribute: the engine's names are Hugging Face's behind it."""


def export_hf(checkpoint: str | Path, out: str | Path, *, config: str | Path | None = None,
              max_shard_bytes: int = 2 << 30) -> list[Path]:
    """Write the Hugging Face folder (module docstring); returns the weight files written."""
    from dsl.engine.checkpoint import resolve

    folder = resolve(checkpoint)
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    if meta.get("format") != 2:
        raise UserError(f"{folder}: checkpoint format {meta.get('format')}: export reads format 2 (per-rank "
                        "slices); load it and save it again with this version")
    writers = int(meta["writers"])
    files = [RankFile(folder / file_name(w, writers)) for w in range(writers)]
    try:
        params = _params(files, meta)
        foreign = [name for name in params if not name.startswith(PREFIX)]
        if foreign:
            raise UserError(f"{folder}: {foreign[0]} is not a Hugging Face model's parameter (the engine names those "
                            f"{PREFIX}...; engine/hf_model.py): export takes checkpoints of run.train.model: {{hf: DIR}}")
        source = _config_file(folder, config)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, out / "config.json")
        shards = _shards(params, max_shard_bytes)
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        written = []
        for shard, name in zip(shards, names):
            entries = [Entry(hf, dtype, shape, lambda key=f"{PARAM}/{PREFIX}{hf}", pieces=pieces, dtype=dtype:
                             _read(key, pieces, dtype))
                       for hf, (dtype, shape, pieces) in shard]
            write_file(out / name, entries, {"format": "pt"})
            written.append(out / name)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(_nbytes(d, s) for shard in shards for _, (d, s, _) in shard)},
                     "weight_map": {hf: name for shard, name in zip(shards, names) for hf, _ in shard}}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return written
    finally:
        for f in files:
            f.close()


def _config_file(folder: Path, config: str | Path | None) -> Path:
    """The model's config.json: `config` (a folder or the file), else the run's resolved.yaml's."""
    if config is None:
        run = folder.parent.parent  # output_dir/checkpoints/step-N
        resolved = run / "resolved.yaml"
        if not resolved.is_file():
            raise UserError(f"{folder}: no {resolved} to find the model's config.json in: give it with --config")
        import yaml

        model = ((yaml.safe_load(resolved.read_text(encoding="utf-8")) or {}).get("run") or {}).get("train", {}) \
            .get("model", {})
        config = model.get("hf") or model.get("hf_config")
        if not config:
            raise UserError(f"{resolved}: run.train.model is not a Hugging Face model (no hf / hf_config)")
    path = Path(config).expanduser()
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"no config.json at {path}: give the model's folder or config.json with --config")
    return path


def _params(files: list[RankFile], meta: dict[str, Any]) -> dict[str, tuple[torch.dtype, list[int], list[Any]]]:
    """{engine name: (dtype, full shape, [(file, start, numel)] in element order)}, in the
    layout's parameter order."""
    order = [name for group in meta["layout"]["groups"] for name, _ in group]
    found: dict[str, tuple[torch.dtype, list[int], list[Any]]] = {}
    for f in files:
        for name, (start, numel, shape) in json.loads(f.metadata.get("dsl", "{}")).get("slices", {}).items():
            entry = found.setdefault(name, (f.dtype(f"{PARAM}/{name}"), list(shape), []))
            entry[2].append((f, int(start), int(numel)))
    for name, (_, shape, pieces) in found.items():
        pieces.sort(key=lambda piece: piece[1])
        at = 0
        for _, start, numel in pieces:
            if start != at:
                raise UserError(f"{files[0].path.parent}: elements {at}..{start} of {name} are in no rank file")
            at += numel
        if at != _numel(shape):
            raise UserError(f"{files[0].path.parent}: {name} has {at} of {_numel(shape)} elements in the rank files")
    return {name: found[name] for name in order if name in found}


def _shards(params: dict[str, tuple[torch.dtype, list[int], list[Any]]], max_bytes: int) -> list[list[Any]]:
    """Parameters in order, cut into shards of at most max_bytes (a larger parameter alone)."""
    shards: list[list[Any]] = [[]]
    size = 0
    for name, (dtype, shape, pieces) in params.items():
        nbytes = _nbytes(dtype, shape)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name[len(PREFIX):], (dtype, shape, pieces)))
        size += nbytes
    return shards


def _read(key: str, pieces: list[Any], dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """Entry `key`'s elements, one saved slice at a time (each a fresh buffer of that slice)."""
    for f, _, numel in pieces:
        buf = torch.empty(numel, dtype=dtype)
        f.read_into(key, 0, buf)
        yield buf


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _nbytes(dtype: torch.dtype, shape: list[int]) -> int:
    return _numel(shape) * dtype.itemsize


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsl.engine.hf_export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoints folder (its latest) or one step-* folder")
    parser.add_argument("--out", required=True, help="the folder to write config.json and *.safetensors to")
    parser.add_argument("--config", help="the model's folder or config.json (default: from the run's resolved.yaml)")
    parser.add_argument("--max-shard-mib", type=float, default=2048.0, help="largest weight file (MiB)")
    args = parser.parse_args(argv)
    try:
        written = export_hf(args.checkpoint, args.out, config=args.config,
                            max_shard_bytes=max(1, int(args.max_shard_mib * 2**20)))
    except DslError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return err.exit_code
    print(f"{parser.prog}: wrote {len(written)} weight file(s) and config.json to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
