"""The building blocks of the config schema: a strict pydantic base model, field types, error wording.

Every config section is a `Schema`: unknown keys are refused, ``key: null`` means "use the default",
values are not coerced (``"5432"`` is not a port), and cross-field rules are written once as
``problems()``. `error_lines` turns one pydantic ValidationError into every problem of the file, one
``field.path: message`` line each. The field types carry what `pgproxy.configdoc` prints in the
configuration reference (bounds, "must exist"), so the docs are read off the same objects that validate.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    GetCoreSchemaHandler,
    Strict,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import core_schema

# A problem found by a cross-field rule: (field below the section, or "" for the section, message).
Problem = tuple[str, str]


class Problems(ValueError):
    """Cross-field problems of one section, raised from its validator so each keeps its own field path."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(f"{field}: {message}" if field else message for field, message in problems))
        self.problems = problems


class Schema(BaseModel):
    """A config section: unknown keys refused, nulls dropped, immutable, cross-field rules in ``problems``."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        """``key: null`` (or an empty ``key:``) is the same as leaving the key out."""
        if isinstance(data, Mapping):
            return {k: v for k, v in data.items() if v is not None}
        return data

    @model_validator(mode="after")
    def _cross_field(self) -> Self:
        problems = list(self.problems())
        if problems:
            raise Problems(problems)
        return self

    def problems(self) -> Iterator[Problem]:
        """The rules between fields that this section breaks (run once every field is valid)."""
        return iter(())


@dataclass(frozen=True)
class Between:
    """Bounds of a number, checked after its type; the reference prints them."""

    low: float
    high: float | None = None

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def check(self, value: float) -> float:
        if value < self.low or (self.high is not None and value > self.high):
            raise ValueError(f"must be {self}, got {value}")
        return value

    def __str__(self) -> str:
        return f"between {self.low:g} and {self.high:g}" if self.high is not None else f">= {self.low:g}"


@dataclass(frozen=True)
class FilePath:
    """A path resolved against the config file's directory (``base_dir`` in the validation context).

    ``must_exist`` is checked only when reading a file: objects built in code name files they know.
    """

    must_exist: bool

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.with_info_plain_validator_function(self.resolve)

    def resolve(self, value: Any, info: ValidationInfo) -> Path:
        if isinstance(value, Path):
            path = value
        elif isinstance(value, str) and value:
            path = Path(value)
        else:
            raise ValueError("expected a file path (a non-empty string)")
        base_dir = (info.context or {}).get("base_dir")
        if base_dir is None:
            return path
        if not path.is_absolute():
            path = base_dir / path
        if self.must_exist and not path.exists():
            raise ValueError(f"file not found: {path}")
        return path


@dataclass(frozen=True)
class Matches:
    """A string that must match ``pattern`` whole; ``says`` is the error, ``rule`` (else ``says``) the reference's."""

    pattern: str
    says: str
    rule: str | None = None

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def check(self, value: str) -> str:
        if not re.fullmatch(self.pattern, value):
            raise ValueError(f"{self.says}, got {value!r}")
        return value


Text = Annotated[str, StringConstraints(strict=True, min_length=1)]
Int = Annotated[int, Strict()]
Number = Annotated[float, Strict()]
Flag = Annotated[bool, Strict()]
Port = Annotated[int, Strict(), Between(0, 65535)]
Seconds = Annotated[float, Strict(), Between(0)]
ExistingFile = Annotated[Path, FilePath(must_exist=True)]
NewFile = Annotated[Path, FilePath(must_exist=False)]
Identifier = Annotated[str, Strict(), Matches(r"[A-Za-z_][A-Za-z0-9_]{0,62}",
                                               "must be a plain identifier (letters, digits, _; at most 63)")]


@dataclass(frozen=True)
class NonEmpty:
    """A list that needs an entry; ``message`` says what is missing."""

    message: str

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def check(self, value: tuple[Any, ...]) -> tuple[Any, ...]:
        if not value:
            raise ValueError(self.message)
        return value


# --------------------------------------------------------------------------------------------------
# Error wording: one line per problem, `field.path: message`

_PLAIN = {
    "missing": "required",
    "extra_forbidden": "unknown setting",
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "string_type": "expected a non-empty string",
    "string_too_short": "expected a non-empty string",
    "tuple_type": "expected a list",
    "list_type": "expected a list",
    "too_short": "required: at least one entry",
}


def field_path(loc: tuple[int | str, ...] | list[str], field: str = "") -> str:
    """``("listeners", 0, "port")`` as ``listeners[0].port``; ``field`` is a dotted path below it."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    if field:
        out += field if field.startswith("[") or not out else f".{field}"
    return out


def error_lines(exc: ValidationError) -> list[str]:
    """Every problem in ``exc``, as ``field.path: message`` lines in the order of the schema."""
    lines = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, Problems):
            lines += [f"{field_path(loc, field) or 'config'}: {message}" for field, message in cause.problems]
        else:
            lines.append(f"{field_path(loc) or 'config'}: {_message(error['type'], error, cause)}")
    return lines


def _message(kind: str, error: Any, cause: object) -> str:
    if isinstance(cause, Exception):
        return str(cause)
    if kind in _PLAIN:
        return _PLAIN[kind]
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"expected a mapping, got {type(error['input']).__name__}"
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", error["ctx"]["expected"])
        return f"must be one of {', '.join(choices)}, got {error['input']!r}"
    return str(error["msg"])
