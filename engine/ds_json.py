"""Parse a DeepSpeed JSON config as JSON, remembering where every key and value stood.

`load_json_located(text, source)` returns the plain data (dicts, lists, str, int, float, bool,
None) and a `Locations` map (engine/located.py) from a key path such as
("zero_optimization", "stage") to the 1-based line and column of the value and of the key, so
the importer can point at `ds.json:12:5`. YAML specs keep the YAML loader; JSON is not read
as YAML here because YAML refuses a tab-indented file and reads `5e8` as a string.

Grammar: RFC 8259 JSON. Numbers without a fraction or exponent are ints, the others floats
(`5e8` is 500000000.0). Two liberties DeepSpeed itself takes (it reads files with hjson) are
accepted because public configs use them: comments (`// ...`, `# ...`, `/* ... */`) and a
comma before a closing `}` or `]`. Everything else hjson would accept (unquoted strings and
keys, multi-line strings) is a syntax error, located, with what was expected. A key written
twice is an error, as in DeepSpeed (`dict_raise_error_on_duplicate_keys`). Columns count
characters, a tab as one.
"""

from __future__ import annotations

import re
from typing import Any

from dsl.engine.errors import UserError
from dsl.engine.located import Locations, Mark, dotted

__all__ = ["load_json_located"]

_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_WORDS = {"true": True, "false": False, "null": None}


def load_json_located(text: str, source: str) -> tuple[Any, Locations]:
    """Parse `text` (named `source` in messages); a syntax error or a duplicate key raises
    UserError `source:line:col: JSON syntax error: ...`."""
    parser = _Parser(text, source)
    parser.skip()
    if parser.pos >= len(text):
        raise parser.error("the file is empty; a DeepSpeed config is a JSON object { ... }")
    value = parser.value(())
    parser.skip()
    if parser.pos < len(text):
        raise parser.error(f"unexpected {parser.describe()} after the end of the JSON value")
    return value, parser.locations


class _Parser:
    def __init__(self, text: str, source: str) -> None:
        self.text, self.source, self.pos = text, source, 0
        self.locations = Locations(source)
        # Offsets of line starts, for line:col of any offset.
        self.line_starts = [0] + [m.end() for m in re.finditer(r"\n", text)]

    def mark(self, pos: int | None = None) -> Mark:
        pos = self.pos if pos is None else pos
        lo, hi = 0, len(self.line_starts) - 1
        while lo < hi:  # last line start <= pos
            mid = (lo + hi + 1) // 2
            if self.line_starts[mid] <= pos:
                lo = mid
            else:
                hi = mid - 1
        return Mark(lo + 1, pos - self.line_starts[lo] + 1)

    def error(self, message: str, pos: int | None = None) -> UserError:
        mark = self.mark(pos)
        return UserError(f"{self.source}:{mark.line}:{mark.col}: JSON syntax error: {message}")

    def describe(self) -> str:
        if self.pos >= len(self.text):
            return "end of file"
        word = re.match(r"[A-Za-z_][A-Za-z0-9_.]*", self.text[self.pos:])
        if word:
            return f"'{word.group(0)}'"
        return repr(self.text[self.pos])

    def skip(self) -> None:
        """Whitespace and comments."""
        text, n = self.text, len(self.text)
        while self.pos < n:
            ch = text[self.pos]
            if ch in " \t\r\n\ufeff":
                self.pos += 1
            elif ch == "#" or text.startswith("//", self.pos):
                end = text.find("\n", self.pos)
                self.pos = n if end < 0 else end + 1
            elif text.startswith("/*", self.pos):
                end = text.find("*/", self.pos + 2)
                if end < 0:
                    raise self.error("a /* comment is never closed with */")
                self.pos = end + 2
            else:
                return

    def value(self, path: tuple[str | int, ...]) -> Any:
        self.skip()
        self.locations.values[path] = self.mark()
        if self.pos >= len(self.text):
            raise self.error("the file ends where a value was expected")
        ch = self.text[self.pos]
        if ch == "{":
            return self.obj(path)
        if ch == "[":
            return self.array(path)
        if ch == '"':
            return self.string()
        number = _NUMBER.match(self.text, self.pos)
        if number and number.end() > self.pos:
            self.pos = number.end()
            if number.group(1) is None and number.group(2) is None:
                return int(number.group(0))
            return float(number.group(0))
        for word, value in _WORDS.items():
            if self.text.startswith(word, self.pos) and not self._word_continues(len(word)):
                self.pos += len(word)
                return value
        hint = ""
        if re.match(r"[A-Z][A-Z0-9_]+", self.text[self.pos:]):
            hint = " (a template placeholder? fill it in before using the file)"
        elif ch == "'":
            hint = " (JSON strings use double quotes)"
        raise self.error(f"expected a value (a number, a \"string\", true, false, null, {{...}} or "
                         f"[...]), got {self.describe()}{hint}")

    def _word_continues(self, length: int) -> bool:
        end = self.pos + length
        return end < len(self.text) and (self.text[end].isalnum() or self.text[end] == "_")

    def string(self) -> str:
        start = self.pos
        self.pos += 1
        out: list[str] = []
        text, n = self.text, len(self.text)
        while True:
            if self.pos >= n:
                raise self.error("a string is never closed with \"", start)
            ch = text[self.pos]
            if ch == '"':
                self.pos += 1
                return "".join(out)
            if ch == "\n":
                raise self.error("a string is never closed with \" on its line", start)
            if ch == "\\":
                esc = text[self.pos + 1:self.pos + 2]
                if esc == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", text[self.pos + 2:self.pos + 6]):
                    out.append(chr(int(text[self.pos + 2:self.pos + 6], 16)))
                    self.pos += 6
                    continue
                if esc not in _ESCAPES:
                    raise self.error(f"unknown escape \\{esc} in a string")
                out.append(_ESCAPES[esc])
                self.pos += 2
                continue
            out.append(ch)
            self.pos += 1

    def obj(self, path: tuple[str | int, ...]) -> dict[str, Any]:
        self.pos += 1
        out: dict[str, Any] = {}
        while True:
            self.skip()
            if self.text.startswith("}", self.pos):
                self.pos += 1
                return out
            if not self.text.startswith('"', self.pos):
                hint = " (JSON keys are written in double quotes)" if re.match(r"[A-Za-z_']", self.text[self.pos:self.pos + 1]) else ""
                raise self.error(f"expected a \"key\" or }}, got {self.describe()}{hint}")
            key_mark = self.mark()
            key = self.string()
            sub = path + (key,)
            if key in out:
                first = self.locations.keys[sub]
                raise UserError(f"{self.source}:{key_mark.line}:{key_mark.col} {dotted(sub)}: duplicate key "
                                f"(first written at line {first.line}); DeepSpeed refuses it too: remove one of them")
            self.locations.keys[sub] = key_mark
            self.skip()
            if not self.text.startswith(":", self.pos):
                raise self.error(f"expected ':' after the key \"{key}\", got {self.describe()}")
            self.pos += 1
            out[key] = self.value(sub)
            if self.after_item("}", f"after the value of \"{key}\""):
                return out

    def array(self, path: tuple[str | int, ...]) -> list[Any]:
        self.pos += 1
        out: list[Any] = []
        while True:
            self.skip()
            if self.text.startswith("]", self.pos):
                self.pos += 1
                return out
            out.append(self.value(path + (len(out),)))
            if self.after_item("]", "in a list"):
                return out

    def after_item(self, close: str, where: str) -> bool:
        """Past the ',' or the `close` that follows an object's or a list's item: True at the close.
        Anything else is an error that says `where` it stands."""
        self.skip()
        if self.text.startswith(",", self.pos):
            self.pos += 1
            return False
        if self.text.startswith(close, self.pos):
            self.pos += 1
            return True
        raise self.error(f"expected ',' or '{close}' {where}, got {self.describe()}")
