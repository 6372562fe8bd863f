"""Read a DeepSpeed JSON config into the engine's settings, with DeepSpeed's semantics.

Users coming from DeepSpeed keep their config file: `engine: {deepspeed_config: ds.json}` in a
spec, `dsl.engine.initialize(model, {"deepspeed_config": "ds.json"})`, or
`initialize(model, config=ds_dict)`. What happens to each key is the table of engine/ds_keys.py
(docs/deepspeed.md is generated from it); this module is the entry point, and the importer is
split by what it maps:

- parsing: engine/ds_json.py (JSON as JSON, `file:line:col` of every key);
- `"auto"`: Hugging Face's meaning, resolved from the spec (engine/ds_auto.py);
- what a config leaves out gets DeepSpeed 0.19.8's default, not dsl's: clipping at 1.0 (0.19.8's
  default since 0.19.3), a constant lr without a scheduler, the optimizer's own defaults (lr 1e-3),
  WarmupLR's log warm-up from warmup_min_lr, WarmupCosineLR's cos_min_ratio 1e-4, the fp16 loss
  scale 2**16 / window 1000 / hysteresis 2 / min 1; DeepSpeed's schedulers run with its exact
  formulas and step timing (engine/schedule.py);
- batch: train_batch_size = micro x accumulation x data-parallel size, any two derive the third,
  DeepSpeed's own messages when they disagree (engine/ds_batch.py). With the data-parallel size
  known (initialize; a spec whose procs_per_node is a number and that has no hostfile) the three
  are derived here; otherwise the derived one is left to `dsl launch` (the planner fills it from
  the other two once the hosts are known, and the launch refuses a split that has no solution);
- refusals only for what changes the result, every one located at its key in the JSON with
  what to do instead; tuning keys are accepted with a note of what dsl does instead.

The mappings, run in this order by `import_deepspeed` on one `Importer` (engine/ds_state.py):
fp16/bf16 and the loss scale (engine/ds_precision.py), the batch keys and clipping
(engine/ds_training.py), zero_optimization and offload (engine/ds_zero.py), the optimizer
(engine/ds_optimizer.py), the scheduler (engine/ds_scheduler.py), sequence_parallel_size and
communication_data_type, then every key left against the table (engine/ds_table.py). The order
is the order of the notes.

The result is `Imported`: the engine settings the JSON decides, located notes, and the `auto`
keys with the engine setting each one takes its value from. The spec's own engine settings
(written next to `deepspeed_config`) override the JSON's (`merge`; a spec scheduler with a
`type` replaces the JSON's scheduler whole). `report` says what every `auto` became, for
`dsl validate` / `dsl plan` and initialize's log.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from dsl.engine.ds_json import load_json_located
from dsl.engine.ds_keys import KEYS
from dsl.engine.ds_optimizer import map_optimizer
from dsl.engine.ds_precision import map_communication, map_precision
from dsl.engine.ds_scheduler import map_scheduler
from dsl.engine.ds_state import AutoUse, Context, Imported, Importer, attr, flatten
from dsl.engine.ds_table import walk
from dsl.engine.ds_training import map_allreduce_op, map_batch, map_clipping, map_sequence_parallel
from dsl.engine.ds_zero import map_zero
from dsl.engine.errors import UserError
from dsl.engine.located import Locations, dotted

__all__ = ["Context", "Imported", "AutoUse", "load_deepspeed_config", "read_deepspeed_json", "import_deepspeed",
           "merge", "report", "is_deepspeed_config", "resolve"]

log = logging.getLogger(__name__)


def load_deepspeed_config(path: Path, where: str, context: Context = Context()) -> Imported:
    """Read and import a DeepSpeed JSON file. `where` names the field that points at the file,
    for a file that cannot be read."""
    data, locations = read_deepspeed_json(path, where)
    return import_deepspeed(data, locations, context)


def read_deepspeed_json(path: Path, where: str) -> tuple[Any, Locations]:
    """The parsed JSON of a DeepSpeed config file and where each key stands (engine/ds_json.py);
    a file that cannot be read is a UserError at `where`, the field that points at it."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UserError(f"{where}: cannot read DeepSpeed config {path}: {reason}") from None
    return load_json_located(text, str(path))


def import_deepspeed(data: Any, locations: Locations, context: Context = Context()) -> Imported:
    """The engine settings of a parsed DeepSpeed config; a UserError names every key dsl cannot
    honour, each at its place in the file."""
    if not isinstance(data, dict):
        raise UserError(f"{locations.source}:1:1: a DeepSpeed config is a JSON object {{...}}, "
                        f"got {type(data).__name__}")
    return _run(Importer(data, locations, context))


def resolve(source: str | Path | Mapping[str, Any], context: Context, *, where: str = "deepspeed_config",
            base: Path | None = None) -> tuple[dict[str, Any], Imported]:
    """(engine mapping: the JSON's settings under the explicit ones, the import) for a path (relative
    to `base`) or an already-loaded dict."""
    if isinstance(source, Mapping):
        data, locations = _dict_locations(dict(source))
        imported = import_deepspeed(data, locations, context)
    else:
        path = Path(source).expanduser()
        if base is not None and not path.is_absolute():
            path = base / path
        imported = load_deepspeed_config(path, where, context)
    return merge(imported.engine, dict(context.explicit)), imported


def merge(mapped: dict[str, Any], explicit: dict[str, Any]) -> dict[str, Any]:
    """The JSON's engine settings with the explicit ones over them (nested sections key by key;
    an explicit scheduler that names its `type` replaces the JSON's scheduler whole)."""
    out = dict(mapped)
    for key, value in explicit.items():
        if key == "deepspeed_config":
            continue
        if key == "scheduler" and isinstance(value, Mapping) and "type" in value:
            out[key] = dict(value)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(dict(out[key]), dict(value))
        else:
            out[key] = value
    return out


def is_deepspeed_config(config: Mapping[str, Any]) -> bool:
    """Whether a mapping handed to initialize() is a DeepSpeed config rather than engine settings:
    a key DeepSpeed has and dsl's engine does not, or an optimizer/scheduler block with `params`."""
    from dsl.engine.config import EngineConfig

    fields = set(EngineConfig.model_fields)
    top = {key.parts[0] for key in KEYS}
    for key, value in config.items():
        if key in top and key not in fields:
            return True
        if key in ("optimizer", "scheduler") and isinstance(value, Mapping) and "params" in value:
            return True
    return False


def report(imported: Imported, engine: Any, planned: frozenset[str] = frozenset()) -> list[str]:
    """What each `auto` became, one located line each: the value and the engine setting it came
    from (`engine` is the final EngineConfig; `planned` the fields `dsl launch` still chooses)."""
    lines = []
    for use in imported.autos:
        rule = use.rule
        if use.value is not None:
            value, origin = use.value, use.origin or rule.dsl
        elif rule.field:
            value = attr(engine, rule.field)
            name = f"engine.{rule.field}"
            if rule.field in planned:
                value, origin = "planned", f"{name}: dsl launch chooses it (dsl plan shows the choice)"
            elif rule.field in imported.explicit:
                origin = f"{name}, written in the spec"
            else:
                origin = f"{name}, dsl's default"
            if rule.path in ("fp16.enabled", "bf16.enabled"):
                want = rule.path.split(".")[0]
                value = engine.precision == want
                origin = f"engine.precision is {engine.precision}"
            if rule.path == "train_batch_size" and value is None:
                value, origin = "micro_batch x grad_accum x data-parallel size", "engine.train_batch unset"
        else:
            value, origin = "-", rule.dsl
        lines.append(f"{use.where} {dotted(use.path)}: auto -> {_show(value)} ({origin})")
    return lines


# ----------------------------------------------------------------------------------------------


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _dict_locations(data: dict[str, Any]) -> tuple[dict[str, Any], Locations]:
    """Locations for a config given as a dict: no file, so every key is named by its path."""
    return data, Locations("deepspeed_config")


def _run(imp: Importer) -> Imported:
    """The mappings in order (see the module docstring), then the table walk; every refusal, in
    the order of the file, in one UserError."""
    map_precision(imp)
    map_batch(imp)
    map_clipping(imp)
    map_zero(imp)
    map_optimizer(imp)
    map_scheduler(imp)
    map_sequence_parallel(imp)
    map_communication(imp)
    map_allreduce_op(imp)
    walk(imp, imp.data, ())
    if imp.errors:
        lines = [text for _, text in sorted(imp.errors, key=lambda item: item[0])]
        raise UserError("DeepSpeed config keys dsl cannot honour:\n" + "\n".join(lines))
    return Imported(imp.out, imp.notes, imp.autos, imp.loc.source, frozenset(flatten(imp.explicit)))
