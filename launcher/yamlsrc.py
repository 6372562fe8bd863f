"""Load YAML while remembering where every key and value stood, for located error messages.

`load_located(text, source)` returns the plain data (dicts, lists, scalars, as yaml.safe_load
would) and a `Locations` map from a field path such as ("resources", "procs_per_node") to the
1-based line and column of that value (and of its key). Duplicate keys, which PyYAML silently
accepts (the last one wins), are errors here: a user who writes a key twice meant one of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml
import yaml.constructor

from dsl.engine.errors import UserError

Path_ = tuple[str | int, ...]


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


def _dotted(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


dotted = _dotted
