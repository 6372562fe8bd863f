"""Read dotenv files (`NAME=value` lines) for `env.file` in a spec.

Accepted: blank lines, `# comments`, an optional `export ` prefix, values in single quotes
(taken literally), double quotes (with \\n, \\t, \\", \\\\ escapes), or bare (trailing ` # comment`
dropped). No variable expansion: a value is what is written, so nothing depends on the shell of
the machine that reads it. Anything else is an error naming file and line.
"""

from __future__ import annotations

import re
from pathlib import Path

from dsl.engine.errors import UserError

_LINE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$")
_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\", "$": "$"}


def parse_env_file(text: str, source: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if not match:
            raise UserError(f"{source}:{number}: expected NAME=value, got {raw.strip()!r}")
        name, value = match.groups()
        out[name] = _value(value, f"{source}:{number}")
    return out


def _value(value: str, where: str) -> str:
    if value.startswith("'"):
        end = value.find("'", 1)
        if end < 0:
            raise UserError(f"{where}: unterminated single quote")
        _only_comment_after(value[end + 1:], where)
        return value[1:end]
    if value.startswith('"'):
        out, i = [], 1
        while i < len(value):
            ch = value[i]
            if ch == "\\" and i + 1 < len(value):
                out.append(_ESCAPES.get(value[i + 1], "\\" + value[i + 1]))
                i += 2
                continue
            if ch == '"':
                _only_comment_after(value[i + 1:], where)
                return "".join(out)
            out.append(ch)
            i += 1
        raise UserError(f"{where}: unterminated double quote")
    return re.split(r"\s+#", value, maxsplit=1)[0].strip()


def _only_comment_after(rest: str, where: str) -> None:
    rest = rest.strip()
    if rest and not rest.startswith("#"):
        raise UserError(f"{where}: unexpected text after the closing quote: {rest!r}")


def load_env_file(path: Path, where: str) -> dict[str, str]:
    """`where` names the spec field that points at the file, for the missing-file message."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{where}: cannot read env file {path}: {exc.strerror or exc}") from None
    return parse_env_file(text, str(path))


def parse_deepspeed_env(text: str, source: str) -> dict[str, str]:
    """A `.deepspeed_env` file as DeepSpeed 0.19.8's launcher reads it (deepspeed/launcher/
    runner.py: `key, val = line.split('=', maxsplit=1)`, both stripped): the value is everything
    after the first `=`, quotes and `#` included, taken literally. Where DeepSpeed would crash
    (a line without `=`: ValueError) or export a broken name, this is an error naming file and
    line; blank lines and lines starting with `#` are skipped (DeepSpeed crashes on both)."""
    out: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise UserError(f"{source}:{number}: expected NAME=value, got {line!r}")
        out[name] = value.strip()
    return out
