"""How `initialize()` (engine/core.py) turns its `config` argument into an EngineConfig: a DeepSpeed
config resolved as engine/dsconfig.py does (`_deepspeed`, `_hidden_size`), then validated against the
rules of engine/validity.py (`_validate`); and `device_notes`, the GPU-only settings that have no
effect on the device the engine runs on. Moved out of engine/core.py, which re-exports these names.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from pydantic import ValidationError
from torch import nn

from dsl.engine.config import EngineConfig
from dsl.engine.errors import UserError

log = logging.getLogger("dsl.engine.core")  # the name these messages had in engine/core.py


def device_notes(config: EngineConfig, device: torch.device) -> list[str]:
    """GPU-only settings changed from their defaults on a device they cannot apply to (no silent
    no-ops). Only changed values: a resolved spec (engine/train.py) writes every default out, so
    which fields a user wrote is not known here; dsl launch's own spec check sees that."""
    notes = []
    defaults = EngineConfig()
    if device.type != "cuda":
        if config.offload.pin_memory != defaults.offload.pin_memory and config.offload.optimizer != "none":
            notes.append(f"engine.offload.pin_memory: {config.offload.pin_memory} has no effect on "
                         f"{device.type} (page-locking is for copies to and from a GPU)")
        if config.tf32 != defaults.tf32:
            notes.append(f"engine.tf32: {config.tf32} has no effect on {device.type} (TensorFloat-32 is a "
                         "CUDA matmul mode; fp32 on the CPU is IEEE fp32 either way)")
    elif config.cpu_allocator != defaults.cpu_allocator:
        notes.append(f"engine.cpu_allocator: {config.cpu_allocator} has no effect on {device.type} (it sets "
                     "the host malloc of a rank that trains on the CPU)")
    return notes


def _validate(config: EngineConfig | Mapping[str, Any] | None, model: nn.Module) -> EngineConfig:
    """The config, or a UserError of `engine.<field>: <message>` lines: the words `dsl validate`
    and `dsl launch` print after their file:line:col (engine/validity.py holds the rules)."""
    import os

    from dsl.engine.train_config import ModelConfig
    from dsl.engine.validity import field_problems, problems, refuse

    if config is None:
        config = EngineConfig()
    elif not isinstance(config, EngineConfig):
        try:
            config = EngineConfig.model_validate(dict(config))
        except ValidationError as err:
            found = field_problems(err)
        else:
            found = []
        refuse(found)  # outside the except: no chained pydantic traceback under DSL_DEBUG
    grouped = tdist.is_available() and tdist.is_initialized()
    world = tdist.get_world_size() if grouped else 1
    local = os.environ.get("LOCAL_WORLD_SIZE", "") if grouped else "1"  # a user's own group may not say
    shape = getattr(model, "cfg", None)  # the bundled Llama's dimensions (sequence-parallel rules)
    refuse(problems(config, model=shape if isinstance(shape, ModelConfig) else None, world_size=world,
                    ranks_per_host=int(local) if local.isdigit() and int(local) > 0 else None))
    return config


def _deepspeed(config: EngineConfig | Mapping[str, Any] | None, model: nn.Module,
               total_steps: int | None) -> EngineConfig | Mapping[str, Any] | None:
    """A DeepSpeed config handed to initialize() (`{"deepspeed_config": path_or_dict, ...engine
    settings}`, a DeepSpeed dict itself, or an EngineConfig naming a deepspeed_config) as the engine
    mapping the YAML path makes of it (engine/dsconfig.py): `auto` from the settings written next
    to it and dsl's defaults, the bucket sizes from the model's hidden size, total_num_steps from
    total_steps, DeepSpeed's batch arithmetic on this process group's data-parallel size."""
    from dsl.engine.dsconfig import Context, is_deepspeed_config, report, resolve

    if isinstance(config, EngineConfig):
        if config.deepspeed_config is None:
            return config
        config = {**config.model_dump(exclude_defaults=True), "deepspeed_config": config.deepspeed_config}
    if not isinstance(config, Mapping):
        return config
    if "deepspeed_config" in config:
        source, explicit = config["deepspeed_config"], {k: v for k, v in config.items() if k != "deepspeed_config"}
        if source is None:
            return explicit
    elif is_deepspeed_config(config):
        source, explicit = config, {}
    else:
        return config
    if not isinstance(source, (str, Path, Mapping)):
        raise UserError(f"engine.deepspeed_config: a path to a DeepSpeed JSON file or a dict, got "
                        f"{type(source).__name__}")
    grouped = tdist.is_available() and tdist.is_initialized()
    world = tdist.get_world_size() if grouped else 1
    sp = explicit.get("sequence_parallel", source.get("sequence_parallel_size", 1) if isinstance(source, Mapping) else 1)
    context = Context(explicit=explicit, steps=total_steps, hidden_size=_hidden_size(model),
                      dp=world // sp if isinstance(sp, int) and sp >= 1 and world % sp == 0 else None)
    engine, imported = resolve(source, context, where="engine.deepspeed_config")
    try:
        final = EngineConfig.model_validate(engine)
    except ValidationError:
        return engine  # _validate reports it
    for line in imported.notes + report(imported, final):
        log.info("%s", line)
    return engine


def _hidden_size(model: nn.Module) -> int | None:
    """The bundled Llama's hidden size, or a Hugging Face model's (config.hidden_size, the largest of
    config.hidden_sizes), as Hugging Face's DeepSpeed integration reads it."""
    for cfg in (getattr(model, "cfg", None), getattr(model, "config", None)):
        hidden = getattr(cfg, "hidden_size", None)
        if isinstance(hidden, int):
            return hidden
        sizes = getattr(cfg, "hidden_sizes", None)
        if isinstance(sizes, (list, tuple)) and sizes and all(isinstance(h, int) for h in sizes):
            return max(sizes)
    return None
