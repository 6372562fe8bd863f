"""engine.deepspeed_config in a spec: the DeepSpeed JSON's settings merged under the spec's own,
before the spec is validated (launcher/spec.py `load_spec` calls `with_deepspeed_config`).
The mapping itself (DeepSpeed's semantics, Hugging Face's `auto`) is engine/dsconfig.py's.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from dsl.engine.errors import UserError
from dsl.engine.located import Locations
from dsl.engine.train_config import TrainConfig

log = logging.getLogger(__name__)


def with_deepspeed_config(data: dict[str, Any], path: Path, locations: Locations) -> dict[str, Any]:
    """engine.deepspeed_config: the DeepSpeed JSON's settings (engine/dsconfig.py: DeepSpeed's
    semantics, Hugging Face's `auto`), under what the spec writes itself. The resolved spec then
    carries plain engine settings; the engine never reads the JSON.

    An `auto` takes the spec's setting (or dsl's default, or the planner's choice for micro_batch /
    grad_accum left out), the bucket sizes Hugging Face derives from the hidden size take
    run.train.model's, total_num_steps takes run.train.steps. When the spec fixes the ranks
    (`spec_world`) DeepSpeed's batch arithmetic runs here, with its messages located in the JSON.
    The engine settings the JSON decides count as written in the spec (located at
    engine.deepspeed_config), so the planner keeps them. What each `auto` became and the notes on
    the keys dsl handles its own way are printed on stderr (`dsl validate`, `dsl plan`, `dsl launch`)."""
    engine = data.get("engine")
    if not isinstance(engine, dict) or not engine.get("deepspeed_config"):
        return data
    from dsl.engine.config import EngineConfig
    from dsl.engine.ds_json import load_json_located
    from dsl.engine.dsconfig import Context, import_deepspeed, merge, report

    key = ("engine", "deepspeed_config")
    where = f"{locations.where(key)} engine.deepspeed_config"
    json_path = (path.parent / os.path.expanduser(str(engine["deepspeed_config"]))).resolve()
    try:
        text = json_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UserError(f"{where}: cannot read DeepSpeed config {json_path}: {reason}") from None
    ds, ds_locations = load_json_located(text, str(json_path))
    explicit = {k: v for k, v in engine.items() if k != "deepspeed_config"}
    train = (data.get("run") or {}).get("train") if isinstance(data.get("run"), dict) else None
    context = Context(explicit=explicit, steps=_train_steps(train), hidden_size=_hidden_size(train),
                      dp=_data_parallel(data, explicit, ds))
    imported = import_deepspeed(ds, ds_locations, context)
    merged = merge(imported.engine, explicit)
    # The JSON's settings count as written (at engine.deepspeed_config): the planner keeps them.
    mark = locations.values[key]
    for name in _leaves(imported.engine):
        locations.values.setdefault(("engine",) + name, mark)
    try:
        final = EngineConfig.model_validate(merged)
    except ValueError:
        final = None  # load_spec reports it, located
    if final is not None and (imported.notes or imported.autos):
        from dsl.launcher.console import message

        planned = frozenset(n for n in ("micro_batch", "grad_accum") if n not in merged)
        for line in imported.notes + report(imported, final, planned):
            message(line)
    overridden = sorted(set(explicit) & set(imported.engine))
    if overridden:
        log.info("%s: the spec's engine.%s override the DeepSpeed config", json_path.name,
                 ", engine.".join(overridden))
    return {**data, "engine": merged}


def _leaves(node: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for name, value in node.items():
        out += _leaves(value, prefix + (name,)) if isinstance(value, dict) else [prefix + (name,)]
    return out


def _train_steps(train: Any) -> int | None:
    if not isinstance(train, dict):
        return None
    steps = train.get("steps", TrainConfig.model_fields["steps"].default)
    return steps if isinstance(steps, int) and not isinstance(steps, bool) else None


def _hidden_size(train: Any) -> int | None:
    """run.train.model's hidden size (for the bucket sizes Hugging Face derives from it), when known."""
    if not isinstance(train, dict):
        return None
    from dsl.engine.train_config import ModelConfig

    try:
        model = ModelConfig.model_validate(train.get("model") or {})
    except ValueError:
        return None
    hidden = getattr(model, "hidden_size", None)
    return hidden if isinstance(hidden, int) else None


def _data_parallel(data: dict[str, Any], explicit: dict[str, Any], ds: Any) -> int | None:
    """The data-parallel size when the spec alone fixes the ranks (`spec_world`), else None."""
    from types import SimpleNamespace

    try:
        from dsl.launcher.spec import Resources

        resources = Resources.model_validate(data.get("resources") or {})
    except ValueError:
        return None
    from dsl.launcher.spec import spec_world

    world = spec_world(SimpleNamespace(resources=resources))  # type: ignore[arg-type]
    sp = explicit.get("sequence_parallel", ds.get("sequence_parallel_size", 1) if isinstance(ds, dict) else 1)
    if world is None or not isinstance(sp, int) or isinstance(sp, bool) or sp < 1 or world[0] % sp:
        return None
    return world[0] // sp
