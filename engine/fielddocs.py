"""Field descriptions from the docstring under each field, read only when someone asks.

Every spec model documents a field with a string literal right under it (pydantic's
`use_attribute_docstrings` style). Pydantic's own option reads the class source with `inspect`
for every model at import time (~40 ms for the spec, on every `dsl` command); the descriptions
are only needed for `dsl schema` and for error hints, so they are read here, once per source
file, with one `ast` parse.
"""

from __future__ import annotations

import ast
import functools
import sys
from typing import Any


@functools.lru_cache(maxsize=None)
def _module_docs(filename: str) -> dict[tuple[str, str], str]:
    """{(class qualname, field): docstring} for every class in one source file."""
    try:
        with open(filename, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename)
    except (OSError, SyntaxError):
        return {}
    docs: dict[tuple[str, str], str] = {}

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if not isinstance(node, ast.ClassDef):
                continue
            qualname = prefix + node.name
            for stmt, nxt in zip(node.body, node.body[1:]):
                if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                        and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                        and isinstance(nxt.value.value, str)):
                    docs[(qualname, stmt.target.id)] = _clean(nxt.value.value)
            visit(node.body, qualname + ".")

    visit(tree.body, "")
    return docs


def _clean(text: str) -> str:
    import inspect

    return inspect.cleandoc(text)


def field_doc(model: type, name: str) -> str | None:
    """The docstring under field `name` of `model` (or of the base class that declares it)."""
    for cls in model.__mro__:
        module = sys.modules.get(cls.__module__)
        filename = getattr(module, "__file__", None)
        if filename and (doc := _module_docs(filename).get((cls.__qualname__, name))):
            return doc
    return None


def describe_schema(schema: dict[str, Any], root: type) -> dict[str, Any]:
    """Fill `description` of every property in a model's JSON schema from the field docstrings."""
    models = {root.__name__: root}
    pending = [root]
    while pending:
        model = pending.pop()
        for info in getattr(model, "model_fields", {}).values():
            for sub in _models_in(info.annotation):
                if sub.__name__ not in models:
                    models[sub.__name__] = sub
                    pending.append(sub)
    for name, definition in [(root.__name__, schema), *schema.get("$defs", {}).items()]:
        model = models.get(name)
        if model is None:
            continue
        if model.__doc__ and "description" not in definition:
            definition["description"] = _clean(model.__doc__)
        for field, prop in definition.get("properties", {}).items():
            doc = field_doc(model, field)
            if doc and not prop.get("description"):
                prop["description"] = doc
    return schema


def _models_in(annotation: Any) -> list[type]:
    from typing import get_args

    found = []
    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        found.append(annotation)
    for arg in get_args(annotation):
        found.extend(_models_in(arg))
    return found
