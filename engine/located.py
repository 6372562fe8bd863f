"""Load YAML remembering where every key and value stood, and validate it with located errors.

`load_located(text, source)` returns the plain data (dicts, lists, scalars, as yaml.safe_load
would) and a `Locations` map from a field path such as ("resources", "procs_per_node") to the
1-based line and column of that value (and of its key). Duplicate keys, which PyYAML silently
accepts (the last one wins), are errors here: a user who writes a key twice meant one of them.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar, Union

import yaml
import yaml.constructor
from pydantic import BaseModel, ValidationError

from dsl.engine.errors import UserError

Path_ = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Mark:
    line: int
    col: int


@dataclass
class Locations:
    """Where each field path was written in one YAML file."""

    source: str
    values: dict[Path_, Mark] = field(default_factory=dict)
    keys: dict[Path_, Mark] = field(default_factory=dict)

    def of(self, path: Path_, *, key: bool = False) -> Mark:
        """The mark of `path`, or of its nearest written ancestor (a missing field points at its parent)."""
        path = tuple(path)
        while path:
            table = self.keys if key and path in self.keys else self.values
            if path in table:
                return table[path]
            path = path[:-1]
            key = False
        return self.values.get((), Mark(1, 1))

    def where(self, path: Path_, *, key: bool = False) -> str:
        mark = self.of(path, key=key)
        return f"{self.source}:{mark.line}:{mark.col}"


def _mark(node: yaml.Node) -> Mark:
    return Mark(node.start_mark.line + 1, node.start_mark.column + 1)


class _Constructor(yaml.constructor.SafeConstructor):
    pass


def load_located(text: str, source: str) -> tuple[Any, Locations]:
    """Parse `text`; YAML syntax errors and duplicate keys raise UserError naming source:line:col."""
    locations = Locations(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise UserError(f"{where}: YAML syntax error: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{source}: YAML error: {exc}") from None
    if root is None:
        return None, locations
    constructor = _Constructor()

    def build(node: yaml.Node, path: Path_) -> Any:
        locations.values[path] = _mark(node)
        if isinstance(node, yaml.MappingNode):
            constructor.flatten_mapping(node)  # resolves YAML merge keys (<<)
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = constructor.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool)) and key is not None:
                    raise UserError(f"{source}:{_mark(key_node).line}:{_mark(key_node).col}: "
                                    "a mapping key must be a plain value")
                if key in out:
                    first = locations.keys[path + (key,)]
                    raise UserError(
                        f"{source}:{_mark(key_node).line}:{_mark(key_node).col} "
                        f"{_dotted(path + (key,))}: duplicate key (first written at line "
                        f"{first.line}); remove one of them"
                    )
                locations.keys[path + (key,)] = _mark(key_node)
                out[key] = build(value_node, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [build(item, path + (i,)) for i, item in enumerate(node.value)]
        return constructor.construct_object(node, deep=True)

    try:
        return build(root, ()), locations
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise UserError(f"{where}: YAML error: {exc.problem}") from None


def validate_located(model: type[M], data: Any, locations: Locations, prefix: Path_ = ()) -> M:
    """Validate `data` (found at `prefix` in the file) as `model`; every error becomes one
    `file:line:col field.path: message` line of a single UserError, in file order."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UserError("\n".join(_format_errors(exc, model, locations, prefix))) from None


def _format_errors(exc: ValidationError, root: type[BaseModel], locations: Locations,
                   prefix: Path_) -> list[str]:
    found = [(locations.of(prefix + loc, key=key), f"{dotted(prefix + loc)}: {message}")
             for loc, message, key in field_errors(exc, root)]
    ordered = sorted(found, key=lambda item: (item[0].line, item[0].col))
    return [f"{locations.source}:{mark.line}:{mark.col} {text}" for mark, text in ordered]


def field_errors(exc: ValidationError, root: type[BaseModel]) -> list[tuple[Path_, str, bool]]:
    """(field path inside `root`, message, whether the path names a key rather than a value) of
    every error, duplicates dropped: the words of a located line without its location (also what
    dsl.engine.initialize() says about an engine mapping, engine/validity.py)."""
    found: dict[tuple[Any, ...], bool] = {}
    for error in exc.errors(include_url=False):
        kind = error["type"]
        key = False
        if kind == "extra_forbidden":  # the last element is the unknown key itself
            loc = _data_path(root, error["loc"][:-1]) + (error["loc"][-1],)
            message, key = _unknown_field(root, loc), True
        elif kind == "missing":
            loc = _data_path(root, error["loc"])
            message = f"required field is missing{_field_hint(root, loc)}"
        else:
            loc = _data_path(root, error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            if kind == "literal_error":
                message += _did_you_mean(error.get("input"), error.get("ctx", {}).get("expected", ""))
        found.setdefault((loc, message), key)
    return [(loc, message, key) for (loc, message), key in found.items()]


def _did_you_mean(value: Any, expected: str) -> str:
    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, re.findall(r"'([^']*)'", expected), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def _data_path(root: type[BaseModel], loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drop pydantic's union-member tags (`int`, `literal['auto']`, `function-before[...]`)."""
    out = []
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            out.append(part)
            continue
        fields = _fields_of(model)
        if fields is None:  # inside a dict field: every key is data
            out.append(part)
            continue
        if part in fields:
            out.append(part)
            model = _model_in(fields[part].annotation)
        # anything else is a pydantic tag, not a YAML key
    return tuple(out)


def _fields_of(model: Any) -> dict[str, Any] | None:
    if isinstance(model, type) and issubclass(model, BaseModel):
        return model.model_fields
    return None


def _model_in(annotation: Any) -> Any:
    """The pydantic model inside an annotation such as `TrainConfig | None`, or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType, Annotated):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _model_at(root: type[BaseModel], path: tuple[Any, ...]) -> Any:
    model: Any = root
    for part in path:
        fields = _fields_of(model)
        if fields is None or part not in fields:
            return None
        model = _model_in(fields[part].annotation)
    return model


def _unknown_field(root: type[BaseModel], loc: tuple[Any, ...]) -> str:
    parent = _model_at(root, loc[:-1])
    valid = sorted(parent.model_fields) if parent is not None else []
    name = str(loc[-1])
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown field '{name}'{hint} (valid fields: {', '.join(valid)})"


def _field_hint(root: type[BaseModel], loc: tuple[Any, ...]) -> str:
    parent = _model_at(root, loc[:-1])
    if parent is None:
        return ""
    from dsl.engine.fielddocs import field_doc

    info = parent.model_fields.get(str(loc[-1]))
    doc = (info.description if info else None) or field_doc(parent, str(loc[-1]))
    return f" ({doc.splitlines()[0]})" if doc else ""


def _dotted(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


dotted = _dotted
