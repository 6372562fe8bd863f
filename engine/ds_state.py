"""The DeepSpeed-config importer's state and the operations every mapping uses.

`Importer` holds one import in progress: the parsed JSON and its `file:line:col` marks
(engine/ds_json.py), the engine settings decided so far, the notes, the refusals and the `auto`
keys (engine/ds_auto.py). The mappings (engine/ds_precision.py, ds_training.py, ds_zero.py,
ds_optimizer.py, ds_scheduler.py, ds_table.py) read keys through `get` (which marks them as
handled, so that the table walk of engine/ds_table.py skips them), write settings through `set`,
and report through `note` / `refuse` / `auto`; engine/dsconfig.py runs them in order and turns
the refusals into one located error.

Also here: the result types (`Context`, `AutoUse`, `Imported`) and the value helpers shared by
the mappings (DeepSpeed's notion of a value equal to its default, JSON spelling of a value).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from dsl.engine.ds_auto import Auto, auto_rule
from dsl.engine.ds_keys import NO_DEFAULT, Key
from dsl.engine.located import Locations, dotted

__all__ = ["Context", "AutoUse", "Imported", "Importer", "AUTO", "NOT_AUTO", "MIB"]

MIB = 1 << 20
AUTO = "auto"
NOT_AUTO = "\"auto\" is filled by neither Hugging Face nor DeepSpeed here; write a value"
"""The refusal of an `auto` at a key Hugging Face does not fill."""
Path_ = tuple[str, ...]


@dataclass(frozen=True)
class Context:
    """What the importer knows besides the JSON."""

    explicit: Mapping[str, Any] = field(default_factory=dict)
    """Engine settings written next to deepspeed_config (the spec's `engine:` or initialize's
    mapping): what an `auto` takes, and what overrides the JSON."""
    steps: int | None = None
    """The run's optimizer steps (run.train.steps, initialize's total_steps)."""
    hidden_size: int | None = None
    """The model's hidden size, for the bucket sizes Hugging Face derives from it."""
    dp: int | None = None
    """The data-parallel size, when known: the batch keys are then derived here."""


@dataclass
class AutoUse:
    """One `auto` in the JSON and where its value comes from."""

    path: Path_
    where: str
    rule: Auto
    value: Any = None
    """The value when the importer decides it (bucket sizes, warmup_min_lr, total steps), else None:
    the engine setting `rule.field` after the spec's settings apply."""
    origin: str = ""
    """Where a decided value comes from (default: the rule's text)."""


@dataclass
class Imported:
    engine: dict[str, Any]
    """Engine settings (an EngineConfig mapping) the JSON decides."""
    notes: list[str]
    """`file:line:col key: note` lines."""
    autos: list[AutoUse]
    source: str
    explicit: frozenset[str] = frozenset()
    """The engine settings (dotted) written next to deepspeed_config."""


class Importer:
    """One import in progress (see the module docstring)."""

    def __init__(self, data: dict[str, Any], locations: Locations, context: Context) -> None:
        self.data, self.loc, self.ctx = data, locations, context
        self.explicit = dict(context.explicit)
        self.out: dict[str, Any] = {}
        self.notes: list[str] = []
        self.errors: list[tuple[tuple[int, int], str]] = []
        self.autos: list[AutoUse] = []
        self.done: set[Path_] = set()
        self.disabled: set[str] = set()
        """Sections that are off (fp16, bf16): their keys are accepted silently."""
        self.precision = "fp32"
        """The training precision as the file (and, for an `auto`, the spec) sets it."""

    # -- access ---------------------------------------------------------------------------------

    def has(self, *path: str) -> bool:
        node: Any = self.data
        for part in path:
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    def get(self, *path: str, default: Any = None) -> Any:
        """The value at `path` (marked as handled), or `default` when absent."""
        node: Any = self.data
        for part in path:
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        self.done.add(tuple(path))
        return node

    def where(self, path: Path_) -> str:
        if self.loc.source == "deepspeed_config" and not self.loc.values:
            return "deepspeed_config"
        return self.loc.where(path, key=True)

    def _mark(self, path: Path_) -> tuple[int, int]:
        mark = self.loc.of(path, key=True)
        return mark.line, mark.col

    # -- results --------------------------------------------------------------------------------

    def refuse(self, path: Path_, why: str) -> None:
        self.done.add(path)
        self.errors.append((self._mark(path), f"{self.where(path)} {dotted(path) or '(file)'}: {why}"))

    def note(self, path: Path_, text: str) -> None:
        self.notes.append(f"{self.where(path)} {dotted(path) or '(file)'}: {text}")

    def auto(self, path: Path_, value: Any = None, origin: str = "") -> None:
        rule = auto_rule(".".join(canonical(path)))
        assert rule is not None, path
        self.done.add(path)
        self.autos.append(AutoUse(path, self.where(path), rule, value, origin))

    def set(self, dotted_field: str, value: Any) -> None:
        node = self.out
        parts = dotted_field.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value

    def spec(self, dotted_field: str) -> Any:
        """The engine setting `dotted_field` as the explicit settings give it, else dsl's default."""
        from dsl.engine.config import EngineConfig

        node: Any = self.explicit
        for part in dotted_field.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return attr(EngineConfig(), dotted_field)
            node = node[part]
        return node

    # -- checked reads --------------------------------------------------------------------------

    def number(self, path: Path_, value: Any, *, integer: bool = False, positive: bool = False,
               minimum: float | None = None) -> float | int | None:
        """A JSON number as int/float, or None after refusing it (bools and strings are not numbers)."""
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok and integer:
            ok = float(value).is_integer()
        if ok and positive:
            ok = value > 0
        if ok and minimum is not None:
            ok = value >= minimum
        if not ok and value == AUTO:
            self.refuse(path, NOT_AUTO)
            return None
        if not ok:
            kind = "a whole number" if integer else "a number"
            if positive:
                kind = "a positive " + kind.removeprefix("a ")
            elif minimum is not None:
                kind += f" >= {minimum:g}"
            self.refuse(path, f"{value!r} is not {kind}")
            return None
        return int(value) if integer else float(value)

    def params(self, section: str) -> dict[str, Any] | None:
        """`section.params` of the optimizer or scheduler section ({} when left out), or None after
        refusing one that is not a section."""
        node = self.data[section]
        params = node.get("params", {})
        if "params" in node:
            self.get(section, "params")
        if not isinstance(params, dict):
            self.refuse((section, "params"), f"{params!r} is not a section {{...}}")
            return None
        return params

    def param_entry(self, section: str, key: str, table: Mapping[str, Key], kind: str,
                    extra: str = "") -> Key | None:
        """The table entry of `section.params.key` (the key marked as handled), or None after
        refusing a parameter that DeepSpeed's `kind` constructor does not take (`extra`: why)."""
        path = (section, "params", key)
        self.done.add(path)
        entry = table.get(key)
        if entry is None:
            close = difflib.get_close_matches(key, list(table), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            self.refuse(path, f"not a parameter of DeepSpeed's {kind} (its constructor refuses it){extra}{hint}")
        return entry


# -- values ------------------------------------------------------------------------------------


def attr(obj: Any, dotted_name: str) -> Any:
    for part in dotted_name.split("."):
        obj = getattr(obj, part)
    return obj


def canonical(path: Path_) -> Path_:
    """`bfloat16.x` (DeepSpeed's old name of the section) as `bf16.x`."""
    return ("bf16",) + path[1:] if path and path[0] == "bfloat16" else path


def flatten(node: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Every key of a nested mapping, dotted (sections and their keys)."""
    out = []
    for key, value in node.items():
        name = f"{prefix}{key}"
        out.append(name)
        if isinstance(value, Mapping):
            out += flatten(value, name + ".")
    return out


def same(value: Any, default: Any) -> bool:
    """Whether a JSON value is DeepSpeed's default (a key without one never is)."""
    if default is NO_DEFAULT:
        return False
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default
    if isinstance(value, (int, float)) and isinstance(default, (int, float)):
        return float(value) == float(default)
    if isinstance(value, str) and isinstance(default, str):
        return value.lower() == default.lower()
    return bool(value == default)


def json_text(value: Any) -> str:
    """A value as the JSON spells it (true, null, 'text', 1e+09)."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1e6:
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def show_default(default: Any) -> str:
    return "none" if default is NO_DEFAULT else json_text(default)
