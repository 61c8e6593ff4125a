"""A mapping read key by key with precise errors: the reader of the policy and masking rule files.

(The config file itself is a pydantic schema, `pgproxy.config`; these files keep their own readers.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .config import ConfigError


class Section:
    """A mapping under a dotted path that reports unknown keys and wrong types precisely."""

    def __init__(self, data: Any, path: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
        self.data = dict(data)
        self.path = path
        self.used: set[str] = set()

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def raw(self, key: str) -> Any:
        self.used.add(key)
        return self.data.get(key)

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self.raw(key)
        if value is None:
            if required:
                raise ConfigError(f"{self.at(key)}: required")
            return default
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{self.at(key)}: expected a non-empty string")
        return value

    def req_str(self, key: str) -> str:
        value = self.string(key, required=True)
        assert value is not None
        return value

    def integer(self, key: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.at(key)}: expected an integer")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ConfigError(f"{self.at(key)}: must be {bound}, got {value}")
        return value

    def number(self, key: str, default: float, *, minimum: float = 0.0, maximum: float | None = None) -> float:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{self.at(key)}: expected a number")
        if value < minimum:
            raise ConfigError(f"{self.at(key)}: must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{self.at(key)}: must be <= {maximum}, got {value}")
        return float(value)

    def section(self, key: str) -> Section:
        return Section(self.raw(key), self.at(key))

    def items(self, key: str) -> list[Any]:
        value = self.raw(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError(f"{self.at(key)}: expected a list")
        return value

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"{self.at(unknown[0])}: unknown setting")
