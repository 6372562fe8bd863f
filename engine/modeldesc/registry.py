"""From a config.json to a ModelDescription: the families dsl knows, by `model_type`, and the
reading of the file with located errors (a missing file, bad JSON, an unknown model_type, a value
of the wrong type: one message naming where the spec asks for it, the file, and what to do).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Callable

from dsl.engine.errors import UserError
from dsl.engine.modeldesc import decoders, encoders, gpt, t5
from dsl.engine.modeldesc.description import ModelDescription
from dsl.engine.modeldesc.fields import ConfigError

FAMILIES: dict[str, Callable[[dict[str, Any]], ModelDescription]] = {
    **{name: (lambda config, name=name: decoders.describe(name, config)) for name in decoders.STYLES},
    "gpt2": gpt.gpt2,
    "gpt_neox": gpt.gpt_neox,
    "falcon": gpt.falcon,
    **{name: (lambda config, name=name: encoders.describe(name, config))
       for name in ("bert", "roberta", "deberta", "deberta-v2")},
    "t5": t5.describe,
}
"""model_type -> the function that describes that family."""

_HINT = ("or describe the model by its counts: model: {params: N, largest_layer_params: M} "
         "(plus layers, hidden, heads, vocab, seq_len when known)")


def describe_config(config: Any, source: str) -> ModelDescription:
    """The description of a parsed config.json (`source` names it in errors)."""
    if not isinstance(config, dict):
        raise UserError(f"{source}: a config.json is a JSON object (model_type, hidden_size, ...); "
                        f"got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type is None:
        raise UserError(f"{source}: no model_type: dsl needs it to know the architecture; known families: "
                        f"{', '.join(sorted(FAMILIES))}; {_HINT}")
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        close = difflib.get_close_matches(str(model_type), list(FAMILIES), n=1)
        mean = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"{source}: model_type {model_type!r} is not a family dsl describes{mean}; known: "
                        f"{', '.join(sorted(FAMILIES))}; {_HINT}")
    try:
        return family(config)
    except ConfigError as exc:
        raise UserError(f"{source}: {exc}") from None


def read_config(path: Path, where: str) -> dict[str, Any]:
    """The JSON object in `path`; `where` (`file:line:col field`) says which spec field named it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        what = "no config.json in that folder" if path.name == "config.json" and path.parent.is_dir() \
            else "no such file"
        raise UserError(f"{where}: {what}: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{where}: cannot read {path}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: {path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise UserError(f"{where}: {path}: a config.json is a JSON object; got {type(data).__name__}")
    return data


def describe_file(path: Path, where: str) -> ModelDescription:
    """The description of the config.json at `path` (errors located at `where`)."""
    return describe_config(read_config(path, where), f"{where}: {path}")
