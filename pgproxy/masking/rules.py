"""Masking rules from ``masking_rules/*.yaml``: which columns are masked, how, and for whom.

    tables:
      shop.customers:
        applies_to: {groups: [agents]}   # optional: subjects, groups, roles, agent_ids; absent = everyone
        exempt: {groups: [dba]}           # optional, same keys: these identities see raw values
        columns:
          email: email                    # a mask name, or a mapping with `mask` and its parameters
          ssn: {mask: partial, keep_last: 4}

``applies_to`` and ``exempt`` may also be given per column (overriding the table's). Files are read in
name order; the same column defined twice is an error. Errors name the file and the dotted path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pglast import parse_sql
from pglast.parser import ParseError

from ..config import ConfigError, load_yaml
from ..policy.rules import string_list
from ..sections import Section
from .masks import Mask, MaskError, build_mask

AUDIENCE_KEYS = ("subjects", "groups", "roles", "agent_ids")


class Person(Protocol):
    """What a rule looks at: a live session's Identity, or one recorded in the audit log (replay)."""

    @property
    def subject(self) -> str: ...
    @property
    def groups(self) -> Sequence[str]: ...
    @property
    def agent_id(self) -> str | None: ...


@dataclass(frozen=True)
class Audience:
    """A set of identities; an empty Audience (no keys) means everyone."""

    subjects: frozenset[str] | None = None
    groups: frozenset[str] | None = None
    roles: frozenset[str] | None = None
    agent_ids: frozenset[str] | None = None

    def contains(self, identity: Person, role: str) -> bool:
        """Any listed key matching is enough (a rule for "group dba or subject alice")."""
        if self.subjects is None and self.groups is None and self.roles is None and self.agent_ids is None:
            return True
        return bool(
            (self.subjects is not None and identity.subject in self.subjects)
            or (self.groups is not None and not self.groups.isdisjoint(identity.groups))
            or (self.roles is not None and role in self.roles)
            or (self.agent_ids is not None and identity.agent_id in self.agent_ids))


NOBODY = Audience(subjects=frozenset())


@dataclass(frozen=True)
class ColumnRule:
    """Mask ``schema.table.column`` with ``mask`` for identities in ``applies_to`` and not in ``exempt``."""

    schema: str
    table: str
    column: str
    mask: Mask
    applies_to: Audience
    exempt: Audience
    where: str  # file and dotted path, for messages

    @property
    def qualified_table(self) -> str:
        return f"{self.schema}.{self.table}"

    def applies(self, identity: Person, role: str) -> bool:
        return self.applies_to.contains(identity, role) and not (self.exempt is not NOBODY
                                                                  and self.exempt.contains(identity, role))


@dataclass(frozen=True)
class MaskingRules:
    rules: tuple[ColumnRule, ...]
    sources: tuple[Path, ...] = ()

    def for_identity(self, identity: Person, role: str) -> tuple[ColumnRule, ...]:
        """The column rules that apply to this identity logged in as ``role``."""
        return tuple(r for r in self.rules if r.applies(identity, role))

    @property
    def needs_key(self) -> bool:
        return any(r.mask.needs_key for r in self.rules)


def _audience(s: Section, key: str, default: Audience) -> Audience:
    if s.raw(key) is None:
        return default
    sub = s.section(key)
    kwargs = {k: frozenset(v) for k in AUDIENCE_KEYS if (v := string_list(sub, k)) is not None}
    sub.done()
    if not kwargs:
        raise ConfigError(f"{sub.path}: name at least one of {', '.join(AUDIENCE_KEYS)}")
    return Audience(**kwargs)


def _split_table(name: str, path: str) -> tuple[str, str]:
    parts = name.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"{path}: table names must be schema-qualified (schema.table), got {name!r}")
    return parts[0], parts[1]


def _check_sql_expression(mask: Mask, path: str) -> None:
    if mask.kind != "sql":
        return
    try:
        parse_sql("SELECT " + mask.sql('"c"', "text", None))
    except ParseError as exc:
        raise ConfigError(f"{path}.expression: not a valid SQL expression: {exc.args[0]}") from None


def parse_rules(data: Any, source: Path) -> tuple[ColumnRule, ...]:
    """The column rules in one file's YAML document."""
    root = Section(data, "")
    tables = root.raw("tables")
    root.done()
    if tables is None:
        return ()
    if not isinstance(tables, Mapping):
        raise ConfigError(f"{source}: tables: expected a mapping of schema.table to its columns")
    out: list[ColumnRule] = []
    for table_name, table_data in tables.items():
        tpath = f"tables.{table_name}"
        schema, table = _split_table(str(table_name), f"{source}: {tpath}")
        t = Section(table_data, tpath)
        applies_to = _audience(t, "applies_to", Audience())
        exempt = _audience(t, "exempt", NOBODY)
        columns = t.raw("columns")
        t.done()
        if not isinstance(columns, Mapping) or not columns:
            raise ConfigError(f"{source}: {tpath}.columns: expected a mapping of column name to mask")
        for column, spec in columns.items():
            cpath = f"{tpath}.columns.{column}"
            try:
                mask = build_mask(spec)
            except MaskError as exc:
                raise ConfigError(f"{source}: {cpath}: {exc}") from None
            col_applies, col_exempt = applies_to, exempt
            if isinstance(spec, Mapping):
                c = Section({k: v for k, v in spec.items() if k in ("applies_to", "exempt")}, cpath)
                col_applies = _audience(c, "applies_to", applies_to)
                col_exempt = _audience(c, "exempt", exempt)
            _check_sql_expression(mask, f"{source}: {cpath}")
            out.append(ColumnRule(schema, table, str(column), mask, col_applies, col_exempt, f"{source}: {cpath}"))
    return tuple(out)


def load_rules(directory: Path) -> MaskingRules:
    """Every ``*.yaml``/``*.yml`` file in ``directory``, in name order."""
    if not directory.is_dir():
        raise ConfigError(f"masking.rules_dir: not a directory: {directory}")
    files = sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    rules: list[ColumnRule] = []
    seen: dict[tuple[str, str, str], str] = {}
    for path in files:
        try:
            for rule in parse_rules(load_yaml(path), path):
                key = (rule.schema, rule.table, rule.column)
                if key in seen:
                    raise ConfigError(f"{rule.where}: {'.'.join(key)} is already masked by {seen[key]}")
                seen[key] = rule.where
                rules.append(rule)
        except ConfigError as exc:
            message = str(exc)
            raise ConfigError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    return MaskingRules(tuple(rules), tuple(files))
