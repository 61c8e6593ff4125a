"""Mask functions: each one as an SQL expression the server evaluates, and as a Python fallback for the wire.

The SQL form is what normally runs: statements of masked identities are rewritten so the server computes
masked values before anything (predicates, joins, casts, aggregates) can see the raw ones. Every SQL form is
cast back to the column's own type, so results keep their types in text and binary format, and keeps NULL
as NULL.

The Python form (``mask_text``) is the wire backstop for a raw masked column that somehow reaches a
RowDescription (see pgproxy/masking/wire.py). It covers the string masks exactly (same output as SQL,
including the keyed hash); for any other mask, and for binary-format values of non-text types, the
backstop sends NULL, which is valid for every type.

This module never sees or stores the deployment key beyond the HMAC pads it derives from it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# pg_type.typcategory values
STRING_CATEGORY = "S"
NUMERIC_CATEGORY = "N"
DATE_TYPES = frozenset({"date", "timestamp", "timestamptz"})

MASK_KINDS = ("redact", "null", "partial", "email", "keyed_hash", "fixed", "numeric", "date", "sql")
_STRING_MASKS = frozenset({"redact", "partial", "email", "keyed_hash"})
NUMERIC_MODES = ("zero", "round", "bucket")
_PARAMS: dict[str, frozenset[str]] = {
    "redact": frozenset({"value"}),
    "null": frozenset(),
    "partial": frozenset({"keep_first", "keep_last", "fill"}),
    "email": frozenset({"fill"}),
    "keyed_hash": frozenset({"length", "prefix"}),
    "fixed": frozenset({"value"}),
    "numeric": frozenset({"mode", "precision", "step"}),
    "date": frozenset(),
    "sql": frozenset({"expression"}),
}


class MaskError(ValueError):
    """A mask definition that cannot work; the message names the problem, the caller adds where."""


def quote_literal(value: str) -> str:
    """A standard-conforming SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class MaskKey:
    """HMAC-SHA256 pads derived from the deployment key, in the forms SQL and Python need."""

    key: bytes = field(repr=False)

    def pads_sql(self) -> tuple[str, str]:
        """The inner and outer padded keys as bytea literals (RFC 2104), for an HMAC built from sha256()."""
        k = self.key if len(self.key) <= 64 else hashlib.sha256(self.key).digest()
        k = k.ljust(64, b"\x00")
        inner = bytes(b ^ 0x36 for b in k)
        outer = bytes(b ^ 0x5C for b in k)
        return f"'\\x{inner.hex()}'::bytea", f"'\\x{outer.hex()}'::bytea"

    def hexdigest(self, value: str) -> str:
        return hmac.new(self.key, value.encode("utf-8"), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Mask:
    """One mask kind with validated parameters."""

    kind: str
    params: Mapping[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------------------------------- validation

    def check_type(self, type_name: str, category: str) -> str | None:
        """Why this mask cannot produce a value of the column's type, or None when it can."""
        if self.kind in _STRING_MASKS and category != STRING_CATEGORY:
            return f"mask {self.kind!r} needs a text column, not {type_name}"
        if self.kind == "numeric" and category != NUMERIC_CATEGORY:
            return f"mask 'numeric' needs a numeric column, not {type_name}"
        if self.kind == "date" and type_name not in DATE_TYPES:
            return f"mask 'date' needs a date or timestamp column, not {type_name}"
        return None

    @property
    def needs_key(self) -> bool:
        return self.kind == "keyed_hash"

    # ---------------------------------------------------------------------------------------------- SQL

    def sql(self, column: str, type_sql: str, key: MaskKey | None) -> str:
        """An SQL expression of type ``type_sql`` giving the masked value of the expression ``column``."""
        p = self.params
        text = f"({column})::text"
        kind = self.kind
        if kind == "null":
            return f"NULL::{type_sql}"
        if kind == "redact":
            body = quote_literal(str(p.get("value", "****")))
        elif kind == "fixed":
            body = f"{quote_literal(str(p['value']))}::{type_sql}"
        elif kind == "partial":
            first, last, fill = int(p.get("keep_first", 0)), int(p.get("keep_last", 4)), quote_literal(_fill(p))
            n = f"char_length({text})"
            body = (f"CASE WHEN {n} <= {first + last} THEN repeat({fill}, {n}) "
                    f"ELSE left({text}, {first}) || repeat({fill}, {n} - {first + last}) || right({text}, {last}) END")
        elif kind == "email":
            fill = quote_literal(_fill(p) * 4)
            at = f"strpos({text}, '@')"
            body = f"CASE WHEN {at} > 0 THEN {fill} || substr({text}, {at}) ELSE {fill} END"
        elif kind == "keyed_hash":
            if key is None:
                raise MaskError("mask 'keyed_hash' needs masking.key_env or masking.key_file")
            inner, outer = key.pads_sql()
            digest = f"encode(sha256({outer} || sha256({inner} || convert_to({text}, 'UTF8'))), 'hex')"
            body = f"{quote_literal(str(p.get('prefix', '')))} || left({digest}, {int(p.get('length', 16))})"
        elif kind == "numeric":
            mode = p.get("mode", "zero")
            if mode == "zero":
                body = "0"
            elif mode == "round":
                body = f"round(({column})::numeric, {int(p.get('precision', 0))})"
            else:
                step = _number_literal(p.get("step", 1))
                body = f"floor(({column})::numeric / {step}) * {step}"
        elif kind == "date":
            body = f"date_trunc('year', {column})"
        elif kind == "sql":
            body = "(" + str(p["expression"]).replace("{column}", f"({column})") + ")"
        else:  # pragma: no cover - kinds are validated when loaded
            raise MaskError(f"unknown mask {kind!r}")
        return f"(CASE WHEN ({column}) IS NULL THEN NULL ELSE ({body})::{type_sql} END)"

    # ------------------------------------------------------------------------------------------- Python

    def mask_text(self, value: str, key: MaskKey | None) -> str | None:
        """The masked value of a text-format value for the wire backstop; None means send NULL."""
        p = self.params
        kind = self.kind
        if kind == "redact":
            return str(p.get("value", "****"))
        if kind == "partial":
            first, last, fill = int(p.get("keep_first", 0)), int(p.get("keep_last", 4)), _fill(p)
            n = len(value)
            if n <= first + last:
                return fill * n
            return value[:first] + fill * (n - first - last) + (value[n - last:] if last else "")
        if kind == "email":
            at = value.find("@")
            return _fill(p) * 4 + (value[at:] if at >= 0 else "")
        if kind == "keyed_hash" and key is not None:
            return str(p.get("prefix", "")) + key.hexdigest(value)[: int(p.get("length", 16))]
        return None


def _fill(p: Mapping[str, Any]) -> str:
    return str(p.get("fill", "*"))


def _number_literal(value: Any) -> str:
    return repr(value) if isinstance(value, (int, float)) else str(int(value))


def build_mask(spec: Any) -> Mask:
    """A Mask from its YAML form: ``"email"`` or ``{mask: partial, keep_last: 4}``."""
    if isinstance(spec, str):
        spec = {"mask": spec}
    if not isinstance(spec, Mapping):
        raise MaskError("expected a mask name or a mapping with 'mask'")
    kind = spec.get("mask")
    if kind is None and "mask" in spec:  # YAML `mask: null` parses as None
        kind = "null"
    if kind not in MASK_KINDS:
        raise MaskError(f"unknown mask {kind!r} (known: {', '.join(MASK_KINDS)})")
    params = {k: v for k, v in spec.items() if k not in ("mask", "applies_to", "exempt")}
    unknown = sorted(set(params) - _PARAMS[kind])
    if unknown:
        raise MaskError(f"unknown parameter {unknown[0]!r} for mask {kind!r}")
    _validate(kind, params)
    return Mask(kind, params)


def _validate(kind: str, p: Mapping[str, Any]) -> None:
    for name in ("keep_first", "keep_last", "length"):
        if name in p and (isinstance(p[name], bool) or not isinstance(p[name], int) or p[name] < 0):
            raise MaskError(f"{name}: expected a non-negative integer")
    if "length" in p and not 1 <= p["length"] <= 64:
        raise MaskError("length: must be between 1 and 64 (hex characters of SHA-256)")
    for name in ("fill", "prefix", "value"):
        if name in p and not isinstance(p[name], (str, int, float)):
            raise MaskError(f"{name}: expected a string")
    if "fill" in p and len(str(p["fill"])) != 1:
        raise MaskError("fill: expected one character")
    if kind == "fixed" and "value" not in p:
        raise MaskError("mask 'fixed' needs a value")
    if kind == "numeric":
        mode = p.get("mode", "zero")
        if mode not in NUMERIC_MODES:
            raise MaskError(f"mode: expected one of {', '.join(NUMERIC_MODES)}")
        if "precision" in p and (isinstance(p["precision"], bool) or not isinstance(p["precision"], int)):
            raise MaskError("precision: expected an integer (negative rounds to tens, hundreds, ...)")
        step = p.get("step", 1)
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0:
            raise MaskError("step: expected a positive number")
        if mode == "bucket" and "step" not in p:
            raise MaskError("mode 'bucket' needs a step")
    if kind == "sql":
        expression = p.get("expression")
        if not isinstance(expression, str) or "{column}" not in expression:
            raise MaskError("mask 'sql' needs an expression containing {column}")
