"""dsl.engine: the bundled training engine.

Importing this package does not import torch: the launcher imports `dsl.engine.config`,
`dsl.engine.memory` and `dsl.engine.errors` on login nodes, where start-up time matters. The
torch-backed API (`initialize`, `Engine`) is loaded on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["initialize", "Engine"]


def __getattr__(name: str) -> Any:
    if name in ("initialize", "Engine"):
        from dsl.engine import core

        return getattr(core, name)
    raise AttributeError(f"module 'dsl.engine' has no attribute {name!r}")
