"""Reading ``homeserver.yaml``: a :class:`ConfigReader` over one section,
whose errors name the key, and the value shapes several sections share
(sizes, durations, lists of strings, rate limits)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from mediarepo.errors import ConfigError

_SIZE_UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_DURATION_UNITS_MS = {
    "s": 1000,
    "m": 60 * 1000,
    "h": 60 * 60 * 1000,
    "d": 24 * 60 * 60 * 1000,
    "w": 7 * 24 * 60 * 60 * 1000,
    "y": 365 * 24 * 60 * 60 * 1000,
}

# ASCII digits only: str.isdigit() and int() also take other scripts' digits
# (and isdigit() takes "²", which int() then refuses).
_DIGITS = re.compile(r"[0-9]+")


def parse_size(key: str, value: object) -> int:
    """A byte count: an integer, or a string such as ``"50M"`` (powers of 1024)."""
    return _parse_with_unit(key, value, _SIZE_UNITS, "a size such as 50M", str.upper)


def parse_duration_ms(key: str, value: object) -> int:
    """A duration in milliseconds: an integer (ms) or a string such as ``"24h"``."""
    return _parse_with_unit(key, value, _DURATION_UNITS_MS, "a duration such as 24h", str)


def _parse_with_unit(
    key: str,
    value: object,
    units: Mapping[str, int],
    expected: str,
    unit_name: Callable[[str], str],
) -> int:
    """A non-negative integer, or digits with an optional last character
    that ``unit_name`` turns into a key of ``units`` (the multiplier)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(key, "must not be negative")
        return value
    if isinstance(value, str):
        text = value.strip()
        multiplier = units.get(unit_name(text[-1:]))
        if multiplier is None:
            multiplier = 1
        else:
            text = text[:-1]
        if _DIGITS.fullmatch(text):
            return int(text) * multiplier
    raise ConfigError(key, f"expected {expected}, got {value!r}")


class ConfigReader:
    """Typed access to one mapping of the config, naming keys in errors."""

    def __init__(self, data: Mapping[str, Any], prefix: str = "") -> None:
        self._data = data
        self._prefix = prefix

    def key(self, name: str) -> str:
        return f"{self._prefix}{name}"

    def raw(self, name: str, default: Any = None) -> Any:
        value = self._data.get(name, default)
        return default if value is None else value

    def string(self, name: str, default: str | None = None) -> str | None:
        value = self.raw(name, default)
        if value is not None and not isinstance(value, str):
            raise ConfigError(self.key(name), f"expected a string, got {value!r}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            raise ConfigError(self.key(name), f"expected true or false, got {value!r}")
        return value

    def integer(self, name: str, default: int, minimum: int = 0) -> int:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.key(name), f"expected an integer, got {value!r}")
        if value < minimum:
            raise ConfigError(self.key(name), f"must be at least {minimum}")
        return value

    def size(self, name: str, default: str) -> int:
        return parse_size(self.key(name), self.raw(name, default))

    def duration_ms(self, name: str, default: str) -> int:
        return parse_duration_ms(self.key(name), self.raw(name, default))

    def mapping(self, name: str) -> ConfigReader:
        value = self.raw(name, {})
        if not isinstance(value, Mapping):
            raise ConfigError(self.key(name), "expected a mapping")
        return ConfigReader(value, f"{self.key(name)}.")

    def sequence(self, name: str, default: list[Any] | None = None) -> list[Any]:
        value = self.raw(name, default if default is not None else [])
        if not isinstance(value, list):
            raise ConfigError(self.key(name), "expected a list")
        return value

    def as_mapping(self) -> Mapping[str, Any]:
        return self._data

    def strings(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        if self.raw(name) is None:
            return default
        values = self.sequence(name)
        if not all(isinstance(value, str) for value in values):
            raise ConfigError(self.key(name), "expected a list of strings")
        return tuple(values)

    def ip_ranges(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        """A list of IP addresses or CIDR ranges, each checked."""
        ranges = self.strings(name, default)
        for value in ranges:
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError as e:
                raise ConfigError(self.key(name), f"{value!r} is not an IP range") from e
        return ranges

    def entries(self, name: str, default: list[Any] | None = None) -> list[ConfigReader]:
        """A list of mappings, each read with its place (``name[i].key``) in errors."""
        readers = []
        for index, raw in enumerate(self.sequence(name, default)):
            place = f"{self.key(name)}[{index}]"
            if not isinstance(raw, Mapping):
                raise ConfigError(place, "expected a mapping")
            readers.append(ConfigReader(raw, f"{place}."))
        return readers


@attrs.frozen
class RateLimit:
    """An ``rc_*`` section: a bucket of ``burst_count`` actions draining at ``per_second``."""

    per_second: float
    burst_count: int


def positive_duration(reader: ConfigReader, key: str, default: str) -> int:
    value = reader.duration_ms(key, default)
    if value <= 0:
        raise ConfigError(reader.key(key), "must be longer than zero")
    return value
