"""One docs/benchmarks.md shared by every benchmark: each owns a section between markers.

`write_section(name, title, command, body)` replaces (or appends) the block
`<!-- bench:NAME -->` ... `<!-- /bench:NAME -->`, so running one benchmark never erases another's
table. The block records the command that produced it and the date.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs/benchmarks.md"
HEADER = ("# Benchmarks\n\nEvery table below was produced by `make bench` on this project's machine "
          "(2 CPU cores, no GPU); each section names the command that produced it. Compare within a "
          "table (ratios from one run), not across sections.\n")


def write_section(name: str, title: str, command: str, body: str, path: Path = DOC) -> Path:
    block = (f"<!-- bench:{name} -->\n## {title}\n\nProduced by `{command}` on "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n\n{body.rstrip()}\n"
             f"<!-- /bench:{name} -->\n")
    text = path.read_text() if path.exists() else HEADER
    if not text.startswith("# Benchmarks"):
        text = HEADER
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->\n.*?<!-- /bench:{re.escape(name)} -->\n", re.S)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
