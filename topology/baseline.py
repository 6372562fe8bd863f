"""The measured process baseline of this host, kept between runs (torch-free).

`dsl probe --measure-baseline` (engine/baseline.py) runs the bundled trainer once on this host
and stores what the process itself holds (a `ProcessBaseline`, topology/model.py) in
`process-baseline.json` of dsl's cache folder: $DSL_CACHE_DIR, else $XDG_CACHE_HOME/dsl, else
~/.cache/dsl. Every later probe of the host reads it back (topology/host.py), so the planner's
and the ranks' `runtime` term is this host's figure instead of the one measured on the project's
machine (engine/memory_shape.py CPU_RUNTIME_BYTES).

A figure holds for one Python, one torch and one dsl: the file keeps one entry per Python
executable, and an entry measured under another torch or dsl version is not used (`load` says
why, and the plan prints it).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from dsl.topology.model import ProcessBaseline, _from_json, _to_json

CACHE_NAME = "process-baseline.json"
MEASURE_HINT = "dsl probe --measure-baseline"


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if env.get("DSL_CACHE_DIR"):
        return Path(env["DSL_CACHE_DIR"])
    base = env.get("XDG_CACHE_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".cache")
    return Path(base) / "dsl"


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def identity() -> dict[str, str | None]:
    """What a measurement holds for: this Python executable (its path as started: a virtualenv's
    python is a link to the same interpreter as every other one), its torch and dsl."""
    return {"python": os.path.abspath(sys.executable), "torch": _version("torch"), "dsl": _version("dsl")}


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def load(environ: Mapping[str, str] | None = None) -> tuple[ProcessBaseline | None, str]:
    """(the stored baseline of this Python, "") or (None, why not)."""
    path = cache_dir(environ) / CACHE_NAME
    me = identity()
    raw = _read(path).get(me["python"])
    if raw is None:
        return None, f"not measured for {me['python']} ({MEASURE_HINT})"
    try:
        found = _from_json(ProcessBaseline, raw)
    except (TypeError, ValueError, KeyError):
        return None, f"{path}: unreadable entry for {me['python']} ({MEASURE_HINT})"
    stale = [f"{k} {getattr(found, k)} -> {me[k]}" for k in ("torch", "dsl") if getattr(found, k) != me[k]]
    if stale:
        return None, f"measured under another version ({', '.join(stale)}): measure again ({MEASURE_HINT})"
    return found, ""


def save(baseline: ProcessBaseline, environ: Mapping[str, str] | None = None) -> Path:
    """Store `baseline` as its Python's entry (atomically: a concurrent reader sees the old file
    or the new one)."""
    folder = cache_dir(environ)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CACHE_NAME
    data = _read(path)
    data[baseline.python] = _to_json(baseline)
    tmp = path.with_name(f".{CACHE_NAME}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
