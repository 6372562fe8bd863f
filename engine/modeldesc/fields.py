"""Reading fields of a Hugging Face config.json with the defaults transformers uses.

A family module asks `Fields(config).int("hidden_size", 4096)`: the value written in the file, or
the default of that family's transformers configuration class when the file leaves the key out
(the defaults are copied next to each family, in decoders.py, gpt.py, encoders.py and t5.py). A
value of the wrong type is a `ConfigError` naming the key, which registry.py turns into a located
error.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config.json value the description cannot use: `key` (None: the file as a whole) and why."""

    def __init__(self, key: str | None, message: str) -> None:
        super().__init__(message)
        self.key = key


class Fields:
    """Typed access to one config mapping; `first` reads the first of several aliases."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def has(self, key: str) -> bool:
        return self.config.get(key) is not None

    def raw(self, key: str, default: Any = None) -> Any:
        value = self.config.get(key)
        return default if value is None else value

    def int(self, key: str, default: int | None = None) -> int:
        value = self.config.get(key)
        if value is None:
            if default is None:
                raise ConfigError(key, f"{key} is missing (this family has no default for it)")
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"{key} must be an integer, got {value!r}")
        return value

    def first(self, keys: tuple[str, ...], default: int | None = None) -> int:
        for key in keys:
            if self.config.get(key) is not None:
                return self.int(key)
        if default is None:
            raise ConfigError(keys[0], f"{' / '.join(keys)} is missing")
        return default

    def float(self, key: str, default: float) -> float:
        value = self.config.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"{key} must be a number, got {value!r}")
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        value = self.config.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(key, f"{key} must be true or false, got {value!r}")
        return value

    def positive(self, key: str, default: int | None = None) -> int:
        value = self.int(key, default)
        if value < 1:
            raise ConfigError(key, f"{key} must be at least 1, got {value}")
        return value
