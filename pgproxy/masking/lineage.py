"""Which output columns of a view carry masked data, from its definition (sqlglot scopes over the catalog).

A view column that passes a masked column straight through (also via subqueries and CTEs) gets the same
mask; a column computed from a masked column (an expression, an aggregate, a whole-row reference) is
"derived" and becomes NULL for masked identities; the rest are left alone. The test is deliberately
conservative: any reference to a masked column's name, a whole-row reference or a star inside an
expression counts as derived. A definition sqlglot cannot analyse raises :class:`LineageError`, and the
view is then refused for masked identities (fail closed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError
from sqlglot.optimizer.qualify import qualify
from sqlglot.optimizer.scope import Scope, build_scope

from .masks import Mask

DERIVED = Mask("null")

TableKey = tuple[str, str]  # (schema, relation)
SchemaMap = Mapping[str, Mapping[str, Mapping[str, str]]]  # schema -> relation -> column -> type


class LineageError(Exception):
    """The view's definition could not be analysed; treat the view as opaque."""


def view_column_masks(definition: str, columns: Sequence[str], masked: Mapping[TableKey, Mapping[str, Mask]],
                      schema: SchemaMap) -> dict[str, Mask]:
    """Mask per view column name (``DERIVED`` for computed ones) for the view defined by ``definition``."""
    try:
        tree = sqlglot.parse_one(definition.strip().rstrip(";"), read="postgres")
        tree = qualify(tree, schema={k: dict(v) for k, v in schema.items()}, dialect="postgres",
                       validate_qualify_columns=False, identify=False)
        root = build_scope(tree)
    except SqlglotError as exc:
        raise LineageError(str(exc)) from None
    except Exception as exc:  # sqlglot raises assorted errors on unusual input
        raise LineageError(f"{type(exc).__name__}: {exc}") from None
    if root is None:
        raise LineageError("the definition has no SELECT")
    _require_resolved_sources(root, masked, schema)
    selects: list[exp.Expression] = root.expression.selects  # type: ignore[attr-defined]
    if len(selects) != len(columns):
        raise LineageError(f"{len(selects)} output expressions for {len(columns)} view columns")
    names = _sensitive_names(masked, root)
    out: dict[str, Mask] = {}
    for column, projection in zip(columns, selects, strict=True):
        direct = _direct_source(root, projection, 0)
        if direct is not None:
            mask = masked.get(direct[0], {}).get(direct[1])
            if mask is not None:
                out[column] = mask
            continue
        if _mentions(projection, names):
            out[column] = DERIVED
    return out


def _require_resolved_sources(root: Scope, masked: Mapping[TableKey, Mapping[str, Mask]], schema: SchemaMap) -> None:
    """Fail closed on a table the catalog does not know that shares a name with a masked one.

    Definitions are read schema-qualified, so this only happens when the catalog and the definition
    disagree (e.g. a relation created since the snapshot); guessing "unmasked" would leak.
    """
    masked_names = {name.lower() for _, name in masked}
    for scope in root.traverse():
        for source in scope.sources.values():
            if not isinstance(source, exp.Table):
                continue
            known = schema.get(source.db or "pg_catalog", {})
            if source.name not in known and source.name.lower() in masked_names:
                raise LineageError(f"relation {source.sql(dialect='postgres')} could not be resolved")


def _sensitive_names(masked: Mapping[TableKey, Mapping[str, Mask]], root: Scope) -> frozenset[str]:
    """Masked column names, plus every table name and alias in the view (whole-row references)."""
    names = {c.lower() for cols in masked.values() for c in cols}
    for scope in root.traverse():
        for alias, source in scope.sources.items():
            names.add(alias.lower())
            if isinstance(source, exp.Table):
                names.add(source.name.lower())
    return frozenset(names)


def _mentions(node: exp.Expression, names: frozenset[str]) -> bool:
    """Whether the projection may read a masked value: a star, or any identifier (a column, a whole-row
    reference such as ``c::text``, a table in a subquery) named like a masked column, table or alias."""
    if isinstance(node, exp.Alias):
        node = node.this  # the output name itself reads nothing
    for sub in node.walk():
        if isinstance(sub, exp.Star):
            return True
        if isinstance(sub, exp.Identifier) and sub.name.lower() in names:
            return True
    return False


def _direct_source(scope: Scope, projection: exp.Expression, depth: int) -> tuple[TableKey, str] | None:
    """The (table, column) a projection passes through unchanged, or None when it computes something."""
    if depth > 32:
        return None
    node = projection.this if isinstance(projection, exp.Alias) else projection
    if not isinstance(node, exp.Column) or not node.table:
        return None
    source = scope.sources.get(node.table)
    if isinstance(source, exp.Table):
        return (source.db or "", source.name), node.name
    if isinstance(source, Scope):
        for inner in source.expression.selects:  # type: ignore[attr-defined]
            if inner.alias_or_name == node.name:
                return _direct_source(source, inner, depth + 1)
    return None
