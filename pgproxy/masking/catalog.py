"""The live catalog masking needs: relations and their columns, inheritance, view dependencies, user
functions and operators.

A :class:`CatalogSnapshot` is read from the upstream database (pg_catalog is readable by every role, so
the session's own role and credential are used) and cached per database; it is re-read after DDL run
through the proxy and every ``masking.catalog_refresh_seconds``. :func:`resolve` turns a snapshot and the
rules that apply to one identity into a :class:`MaskedSchema`: every relation whose rows carry masked
values — the ruled tables, their partitions and inheritance children, and the views and materialized
views that depend on masked columns (found through pg_depend / pg_rewrite, their columns judged by
pgproxy/masking/lineage.py).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from .lineage import DERIVED, LineageError, view_column_masks
from .masks import Mask, MaskKey, quote_ident
from .rules import ColumnRule

log = logging.getLogger(__name__)

_RELATIONS = """
SELECT c.oid::int8, n.nspname, c.relname, c.relkind::text, a.attnum::int4, a.attname,
       pg_catalog.format_type(a.atttypid, a.atttypmod), t.typname, t.typcategory::text
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
WHERE c.relkind IN ('r', 'v', 'm', 'p', 'f')
  AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
ORDER BY c.oid, a.attnum
"""
_INHERITS = "SELECT inhrelid::int8, inhparent::int8 FROM pg_catalog.pg_inherits"
_VIEW_DEPENDENCIES = """
SELECT DISTINCT r.ev_class::int8, d.refobjid::int8, d.refobjsubid::int4
FROM pg_catalog.pg_depend d
JOIN pg_catalog.pg_rewrite r ON d.classid = 'pg_catalog.pg_rewrite'::regclass AND d.objid = r.oid
WHERE d.refclassid = 'pg_catalog.pg_class'::regclass AND d.refobjid <> r.ev_class
"""
_VIEW_DEFINITIONS = ("SELECT oid::int8, pg_catalog.pg_get_viewdef(oid) FROM pg_catalog.pg_class "
                     "WHERE oid = ANY($1::oid[])")
# Every relation name a statement may use (any kind, any schema: system catalogs, temporary tables,
# sequences...): a name outside this set is an object the snapshot does not know yet.
_NAMES = """
SELECT n.nspname, c.relname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'v', 'm', 'p', 'f', 'S')
"""
# Changes whenever a view or rule is created, replaced, renamed away or dropped (each pg_rewrite row's xmin
# is the transaction that last wrote it): the cheap question "may the snapshot's view definitions be stale?"
_VIEWS_FINGERPRINT = ("SELECT md5(coalesce(string_agg(ev_class::text || '.' || xmin::text, ',' ORDER BY oid), '')) "
                      "FROM pg_catalog.pg_rewrite")
_ROUTINES = """
SELECT DISTINCT p.proname::text FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
"""
# Operators created outside extensions (an extension's operators implement its types).
_OPERATORS = """
SELECT DISTINCT o.oprname::text FROM pg_catalog.pg_operator o JOIN pg_catalog.pg_namespace n ON n.oid = o.oprnamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND NOT EXISTS (
  SELECT FROM pg_catalog.pg_depend d WHERE d.classid = 'pg_catalog.pg_operator'::regclass AND d.objid = o.oid
    AND d.deptype = 'e')
"""


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    attnum: int
    type_sql: str  # format_type(): e.g. "character varying(100)"
    type_name: str  # pg_type.typname
    category: str  # pg_type.typcategory


@dataclass(frozen=True)
class Relation:
    oid: int
    schema: str
    name: str
    kind: str  # pg_class.relkind
    columns: tuple[Column, ...]

    def column(self, name: str) -> Column | None:
        for c in self.columns:
            if c.name == name:
                return c
        return None


@dataclass(frozen=True)
class CatalogSnapshot:
    version: int
    relations: Mapping[int, Relation]
    parents: Mapping[int, tuple[int, ...]]  # child oid -> its direct parents
    view_dependencies: Mapping[int, frozenset[tuple[int, int]]]  # view oid -> {(relation oid, attnum)}
    view_definitions: Mapping[int, str]
    routines: frozenset[str]  # names of the functions, aggregates and procedures outside the system schemas
    by_name: Mapping[tuple[str, str], int] = field(default_factory=dict)
    operators: frozenset[str] = frozenset()  # names of operators outside the system schemas and extensions
    names: frozenset[tuple[str, str]] = frozenset()  # (schema, name) of every relation, any kind
    unqualified: frozenset[str] = frozenset()  # their names alone
    views_fingerprint: str = ""  # _VIEWS_FINGERPRINT when the snapshot began to be read
    view_names: frozenset[str] = frozenset()  # names of views and materialized views (any schema)

    def names_view(self, name: str) -> bool:
        """Whether ``name`` may be a view or materialized view (whose definition may have changed since)."""
        return name in self.view_names

    def knows(self, schema: str | None, name: str) -> bool:
        """Whether a relation so named existed when the snapshot was read (any schema when unqualified)."""
        return (schema, name) in self.names if schema else name in self.unqualified

    def find(self, schema: str, name: str) -> Relation | None:
        oid = self.by_name.get((schema, name))
        return self.relations.get(oid) if oid is not None else None

    @functools.cached_property
    def column_names(self) -> frozenset[str]:
        """The names of every relation's columns (``x.name`` is then read as a column, not a function)."""
        return frozenset(c.name for r in self.relations.values() for c in r.columns)


_versions = itertools.count(1)


async def read_catalog(conn: asyncpg.Connection, ruled_tables: Iterable[tuple[str, str]]) -> CatalogSnapshot:
    """Read a snapshot; view definitions only for views that may depend on a ruled table."""
    views_fingerprint = await conn.fetchval(_VIEWS_FINGERPRINT)  # first: a change while reading shows later
    relations: dict[int, Relation] = {}
    rows = await conn.fetch(_RELATIONS)
    for oid, group in itertools.groupby(rows, key=lambda r: r[0]):
        cols = list(group)
        first = cols[0]
        relations[oid] = Relation(oid, first[1], first[2], first[3],
                                  tuple(Column(r[5], r[4], r[6], r[7], r[8]) for r in cols))
    parents: dict[int, list[int]] = {}
    for child, parent in await conn.fetch(_INHERITS):
        parents.setdefault(child, []).append(parent)
    deps: dict[int, set[tuple[int, int]]] = {}
    for view, rel, attnum in await conn.fetch(_VIEW_DEPENDENCIES):
        deps.setdefault(view, set()).add((rel, attnum))
    by_name = {(r.schema, r.name): oid for oid, r in relations.items()}
    roots = {by_name[t] for t in ruled_tables if t in by_name}
    wanted = _dependent_views(roots, deps, parents)
    definitions = await _view_definitions(conn, sorted(wanted)) if wanted else {}
    routines = frozenset(r[0] for r in await conn.fetch(_ROUTINES))
    operators = frozenset(r[0] for r in await conn.fetch(_OPERATORS))
    names = frozenset((r[0], r[1]) for r in await conn.fetch(_NAMES))
    view_names = frozenset(r.name for r in relations.values() if r.kind in ("v", "m"))
    return CatalogSnapshot(next(_versions), relations, {k: tuple(v) for k, v in parents.items()},
                           {k: frozenset(v) for k, v in deps.items()}, definitions, routines, by_name,
                           operators, names, frozenset(name for _, name in names), views_fingerprint, view_names)


async def _view_definitions(conn: asyncpg.Connection, oids: list[int]) -> dict[int, str]:
    """View definitions with every relation schema-qualified.

    ``pg_get_viewdef`` leaves out the schema of relations visible on the current search_path, so under
    the default path a view over ``public.customers`` reads ``FROM customers`` and its masked columns
    would not be recognised. With only ``pg_catalog`` on the path every user relation is qualified.
    """
    async with conn.transaction():
        await conn.execute("SET LOCAL search_path = pg_catalog")
        return {oid: text for oid, text in await conn.fetch(_VIEW_DEFINITIONS, oids)}


def _dependent_views(roots: set[int], deps: Mapping[int, Iterable[tuple[int, int]]],
                     parents: Mapping[int, Iterable[int]]) -> set[int]:
    """Views (transitively) depending on any relation in ``roots`` or on their inheritance children."""
    reach = set(roots)
    changed = True
    while changed:
        changed = False
        for child, ps in parents.items():
            if child not in reach and any(p in reach for p in ps):
                reach.add(child)
                changed = True
        for view, on in deps.items():
            if view not in reach and any(rel in reach for rel, _ in on):
                reach.add(view)
                changed = True
    return reach - roots


# --------------------------------------------------------------------------------------- per identity


@dataclass(frozen=True)
class MaskedRelation:
    """A relation whose rows reach masked identities only through ``subquery_columns``."""

    relation: Relation
    masks: Mapping[str, Mask]  # column name -> mask
    opaque: str | None = None  # why it cannot be proven safe: references are refused

    def select_list(self, key: MaskKey | None) -> str:
        """The column list of the masking subquery: masked columns replaced, names and order kept."""
        parts = []
        for col in self.relation.columns:
            ident = quote_ident(col.name)
            mask = self.masks.get(col.name)
            parts.append(ident if mask is None else f"{mask.sql(ident, col.type_sql, key)} AS {ident}")
        return ", ".join(parts)


@dataclass(frozen=True)
class MaskedSchema:
    """Everything masked for one identity in one catalog snapshot."""

    catalog: CatalogSnapshot
    relations: Mapping[int, MaskedRelation]
    by_name: Mapping[str, tuple[MaskedRelation, ...]]  # relname -> masked relations with that name
    by_qualified: Mapping[tuple[str, str], MaskedRelation]
    key: MaskKey | None
    # (table oid, attnum) -> mask: the wire backstop's view of RowDescription columns
    wire: Mapping[tuple[int, int], Mask] = field(default_factory=dict)


def resolve(catalog: CatalogSnapshot, rules: Iterable[ColumnRule], key: MaskKey | None) -> MaskedSchema:
    masks: dict[int, dict[str, Mask]] = {}
    for rule in rules:
        rel = catalog.find(rule.schema, rule.table)
        if rel is None:
            log.warning("masking rule %s: relation %s does not exist in the database", rule.where,
                        rule.qualified_table)
            continue
        col = rel.column(rule.column)
        if col is None:
            log.warning("masking rule %s: column %s.%s does not exist", rule.where, rule.qualified_table,
                        rule.column)
            continue
        mask = rule.mask
        if mask.check_type(col.type_name, col.category) is not None or (mask.needs_key and key is None):
            mask = DERIVED  # cannot apply as written: NULL is the safe, type-valid answer
        masks.setdefault(rel.oid, {})[col.name] = mask
    _inherit(catalog, masks)
    opaque = _views(catalog, masks)
    relations = {oid: MaskedRelation(catalog.relations[oid], m, opaque.get(oid)) for oid, m in masks.items()}
    for oid, reason in opaque.items():
        relations.setdefault(oid, MaskedRelation(catalog.relations[oid], {}, reason))
    by_name: dict[str, list[MaskedRelation]] = {}
    for mr in relations.values():
        by_name.setdefault(mr.relation.name, []).append(mr)
    wire = {(oid, c.attnum): m[c.name] for oid, m in masks.items()
            for c in catalog.relations[oid].columns if c.name in m}
    return MaskedSchema(catalog, relations, {k: tuple(v) for k, v in by_name.items()},
                        {(mr.relation.schema, mr.relation.name): mr for mr in relations.values()}, key, wire)


def _inherit(catalog: CatalogSnapshot, masks: dict[int, dict[str, Mask]]) -> None:
    """Masks flow along inheritance both ways (same column names): partitions and children carry their
    parents' masks, and a parent carries its children's, since reading the parent reads their rows."""
    changed = True
    while changed:
        changed = False
        for child, parents in catalog.parents.items():
            for parent in parents:
                for source, target in ((parent, child), (child, parent)):
                    changed |= _copy_masks(catalog, masks, source, target)


def _copy_masks(catalog: CatalogSnapshot, masks: dict[int, dict[str, Mask]], source: int, target: int) -> bool:
    relation = catalog.relations.get(target)
    if relation is None or not masks.get(source):
        return False
    copied = False
    for name, mask in masks[source].items():
        if relation.column(name) is not None and name not in masks.get(target, {}):
            masks.setdefault(target, {})[name] = mask
            copied = True
    return copied


def _views(catalog: CatalogSnapshot, masks: dict[int, dict[str, Mask]]) -> dict[int, str]:
    """Add masks for views reading masked columns; returns the views that could not be analysed."""
    schema: dict[str, dict[str, dict[str, str]]] = {}
    for rel in catalog.relations.values():
        schema.setdefault(rel.schema, {})[rel.name] = {c.name: c.type_name for c in rel.columns}
    opaque: dict[int, str] = {}
    done: set[int] = set()
    for _ in range(64):  # views on views: a few rounds reach the fixpoint
        progressed = False
        for view, on in catalog.view_dependencies.items():
            if view in done or view not in catalog.relations:
                continue
            if not any(_reads_masked(catalog, masks, rel, attnum) for rel, attnum in on):
                continue
            done.add(view)
            progressed = True
            rel = catalog.relations[view]
            definition = catalog.view_definitions.get(view)
            if definition is None:
                opaque[view] = "its definition could not be read"
                continue
            masked_by_name = {(catalog.relations[o].schema, catalog.relations[o].name): m for o, m in masks.items()}
            try:
                view_masks = view_column_masks(definition, [c.name for c in rel.columns], masked_by_name, schema)
            except LineageError as exc:
                opaque[view] = f"its definition could not be analysed ({exc})"
                continue
            if view_masks:
                masks[view] = view_masks
        if not progressed:
            break
    return opaque


def _reads_masked(catalog: CatalogSnapshot, masks: Mapping[int, Mapping[str, Mask]], rel: int, attnum: int) -> bool:
    """Whether a view depending on column ``attnum`` of ``rel`` may read masked values: whenever ``rel``
    has masked columns. pg_depend names the columns a view reads by name, but a whole-row reference
    (``c::text``, ``row_to_json(c)``) leaves no dependency on the columns it reads, so any dependency on
    a masked relation sends the view to the lineage analysis, which judges each of its columns."""
    return bool(masks.get(rel)) and rel in catalog.relations


# -------------------------------------------------------------------------------------------- caching


class CatalogCache:
    """One snapshot per database, re-read when stale or invalidated; concurrent readers share one load."""

    def __init__(self, refresh_seconds: float, ruled_tables: Iterable[tuple[str, str]]) -> None:
        self.refresh_seconds = refresh_seconds
        self.ruled_tables = tuple(ruled_tables)
        self._snapshots: dict[str, tuple[CatalogSnapshot, float, float]] = {}  # snapshot, read at, started at
        self._loading: dict[str, asyncio.Future[CatalogSnapshot]] = {}
        self._load_started: dict[str, float] = {}
        self._probes: dict[str, Any] = {}  # database -> asyncpg connection for views_changed
        self._probe_locks: dict[str, asyncio.Lock] = {}

    def current(self, database: str, connect: Callable[[], Awaitable[Any]] | None = None) -> CatalogSnapshot | None:
        """The cached snapshot, None when there is none (or it was invalidated by DDL).

        A snapshot older than ``refresh_seconds`` is still returned while a fresh one is read in the
        background (with ``connect``), so the interval refresh never makes a statement wait.
        """
        entry = self._snapshots.get(database)
        if entry is None:
            return None
        if (connect is not None and time.monotonic() - entry[1] > self.refresh_seconds
                and database not in self._loading):
            self._loading[database] = asyncio.ensure_future(self._load(database, connect))
            self._loading[database].add_done_callback(_log_failure)
        return entry[0]

    def invalidate(self, database: str) -> None:
        self._snapshots.pop(database, None)

    async def read_since(self, database: str, connect: Callable[[], Awaitable[Any]], since: float) -> CatalogSnapshot:
        """A snapshot read entirely after ``since`` (time.monotonic()): objects created before it are in it."""
        entry = self._snapshots.get(database)
        if entry is not None and entry[2] >= since:
            return entry[0]
        loading = self._loading.get(database)
        if loading is None or self._load_started.get(database, 0.0) < since:
            loading = asyncio.ensure_future(self._load(database, connect))
            self._loading[database] = loading
        return await asyncio.shield(loading)

    async def views_changed(self, database: str, connect: Callable[[], Awaitable[Any]],
                            snapshot: CatalogSnapshot) -> bool:
        """Whether a view or rule changed since ``snapshot`` began to be read (one query on a kept connection)."""
        lock = self._probe_locks.setdefault(database, asyncio.Lock())
        async with lock:
            conn = self._probes.get(database)
            try:
                if conn is None or conn.is_closed():
                    conn = self._probes[database] = await connect()
                fingerprint = await conn.fetchval(_VIEWS_FINGERPRINT)
            except BaseException:
                self._probes.pop(database, None)
                if conn is not None and not conn.is_closed():
                    conn.terminate()
                raise
        return bool(fingerprint != snapshot.views_fingerprint)

    async def aclose(self) -> None:
        """Close the connections kept for probes."""
        for conn in self._probes.values():
            await conn.close()
        self._probes.clear()

    async def get(self, database: str, connect: Callable[[], Awaitable[Any]]) -> CatalogSnapshot:
        snapshot = self.current(database, connect)
        if snapshot is not None:
            return snapshot
        loading = self._loading.get(database)
        if loading is None:
            loading = self._loading[database] = asyncio.ensure_future(self._load(database, connect))
        return await asyncio.shield(loading)

    async def _load(self, database: str, connect: Callable[[], Awaitable[Any]]) -> CatalogSnapshot:
        started = self._load_started[database] = time.monotonic()
        try:
            conn = await connect()
            try:
                snapshot = await read_catalog(conn, self.ruled_tables)
            finally:
                await conn.close()
            current = self._snapshots.get(database)
            if current is None or current[2] <= started:  # a later load may have finished first
                self._snapshots[database] = (snapshot, time.monotonic(), started)
            return snapshot
        finally:
            if self._load_started.get(database) == started:
                self._loading.pop(database, None)


def _log_failure(future: asyncio.Future[CatalogSnapshot]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("reading the catalog for masking failed (the previous snapshot stays in use): %s",
                    future.exception())
