"""Statement rewriting for masked identities: the server only ever sees masked values of masked columns.

Every reference to a masked relation in a FROM position (FROM, JOIN, subqueries, CTEs, set operations,
LATERAL, ``TABLE t``, cursors, PREPARE, CREATE TABLE AS, INSERT ... SELECT, UPDATE ... FROM, USING, MERGE
sources) becomes a subquery with the same name, the same columns in the same order and the same types,
in which masked columns are replaced by their mask expressions. Predicates, joins, casts, aggregates,
whole-row references and functions therefore all operate on masked values. ``COPY t TO`` becomes
``COPY (SELECT ...) TO``. In UPDATE / DELETE / MERGE / INSERT ... ON CONFLICT on a masked table, its masked
columns read in conditions, SET values and RETURNING are replaced by their masked values.

What cannot be seen through is refused (:class:`Refused`): DO, CREATE FUNCTION/PROCEDURE, CALL, calls of
functions and system relations not classified safe (pgproxy/masking/functions.py), user-defined
operators, EXPLAIN and CREATE VIEW/RULE/MATERIALIZED VIEW over masked
relations (their output would show the mask expressions, including keyed-hash pads), ambiguous
unqualified names, views whose definitions could not be analysed.

Pure functions over pglast trees; results are cached by the caller per statement text and schema, and a
result that sends the text unchanged per statement shape (its text with the constants taken out). That is
sound because nothing here reads a constant's value: what is refused, wrapped or passed depends on names
(relations, columns, functions, operators) and the statement's structure only. Keep it so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pglast import ast, parse_sql
from pglast.enums.parsenodes import ObjectType

from ..core.statement import SqlSyntaxError, Tree, parse
from ..policy.classify import iter_nodes, node_fields
from .catalog import MaskedRelation, MaskedSchema
from .functions import function_refusal, relation_refusal
from .masks import Mask
from .sqltext import server_sql

# Statements that change how a relation's data can be reached: renaming or retyping a masked column,
# moving the table, generated columns, triggers, rules, row-level policies, foreign keys into it,
# attaching it as a partition. Refused when they name a masked relation anywhere.
_DEFINITION_CHANGES = (ast.AlterTableStmt, ast.RenameStmt, ast.AlterObjectSchemaStmt, ast.CreateTrigStmt,
                       ast.RuleStmt, ast.CreatePolicyStmt, ast.AlterPolicyStmt, ast.CreateStmt)
# Objects that make later statements call a function the statement does not name.
_FUNCTION_BACKED = (ast.CreateCastStmt, ast.CreateConversionStmt, ast.CreateTransformStmt, ast.CreateOpClassStmt,
                    ast.CreateRangeStmt)
_DEFINED_KINDS = frozenset({ObjectType.OBJECT_OPERATOR, ObjectType.OBJECT_AGGREGATE, ObjectType.OBJECT_TYPE})
SYSTEM_COLUMNS = frozenset({"tableoid", "ctid", "xmin", "xmax", "cmin", "cmax"})
_WITH_OWNERS = (ast.SelectStmt, ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)


class Refused(Exception):
    """The statement cannot be proven safe for a masked identity; the message says why."""


@dataclass(frozen=True)
class Rewritten:
    sql: str | None  # the text to send instead; None: send the original unchanged
    refusal: str | None = None
    relations: tuple[str, ...] = ()  # masked relations the statement reads
    unknown: tuple[str, ...] = ()  # relation names the catalog snapshot does not know (created since?)
    reads_views: bool = False  # names a view or materialized view (its definition may have changed since)


def rewrite(sql: str, schema: MaskedSchema) -> Rewritten:
    """Rewrite ``sql`` for ``schema``'s identity (a statement that does not parse is left to the server)."""
    try:
        raws = parse(sql)
    except SqlSyntaxError:
        return Rewritten(None)
    return rewrite_tree(raws, schema)


def rewrite_tree(raws: Tree, schema: MaskedSchema) -> Rewritten:
    """``rewrite`` of a statement's parse, which it changes (a tree nothing else reads)."""
    rewriter = _Rewriter(schema)
    try:
        for raw in raws:
            rewriter.statement(raw.stmt)
    except Refused as exc:
        return Rewritten(None, str(exc), tuple(rewriter.touched), tuple(rewriter.unknown), rewriter.views)
    except RecursionError:
        return Rewritten(None, "the statement is too deeply nested to be checked", tuple(rewriter.touched))
    if not rewriter.changed:
        return Rewritten(None, None, tuple(rewriter.touched), tuple(rewriter.unknown), rewriter.views)
    return Rewritten("; ".join(server_sql(raw) for raw in raws), None, tuple(rewriter.touched),
                     tuple(rewriter.unknown), rewriter.views)


def _first_statement(sql: str) -> Any:
    return parse_sql(sql)[0].stmt


def _expression(text: str) -> ast.Node:
    value: ast.Node = _first_statement("SELECT " + text).targetList[0].val
    return value


class _Rewriter:
    def __init__(self, schema: MaskedSchema) -> None:
        self.schema = schema
        self.changed = False
        self.touched: list[str] = []
        self.unknown: list[str] = []
        self.views = False
        self._inserted: set[int] = set()  # ids of nodes this rewrite created: never visited again
        self._wrapped_qualified: set[tuple[str, str]] = set()

    # --------------------------------------------------------------------------------------- statements

    def statement(self, stmt: Any) -> None:
        if isinstance(stmt, ast.DoStmt):
            raise Refused("DO blocks run code the proxy cannot inspect")
        if isinstance(stmt, ast.CreateFunctionStmt):
            raise Refused("creating functions or procedures is not allowed for masked identities")
        if isinstance(stmt, ast.CallStmt):
            raise Refused("CALL runs procedural code the proxy cannot inspect")
        if isinstance(stmt, _FUNCTION_BACKED) or (isinstance(stmt, ast.DefineStmt) and stmt.kind in _DEFINED_KINDS):
            raise Refused("creating operators, aggregates, types, casts, conversions, transforms or operator "
                          "classes is not allowed for masked identities: they call functions by name")
        if isinstance(stmt, _DEFINITION_CHANGES):
            self._check_definition_change(stmt)
        if isinstance(stmt, ast.CopyStmt) and stmt.relation is not None and not stmt.is_from:
            self._copy_to_query(stmt)
        before = len(self.touched)
        self.visit(stmt, frozenset())
        if len(self.touched) > before:
            what = _persisting(stmt)
            if what is not None:
                raise Refused(f"{what} over masked relations ({', '.join(self.touched[before:])}) is not allowed: "
                              "it would expose the masking expressions")
        if self._wrapped_qualified:
            self._unqualify_columns(stmt)
        if self.changed:
            self._check_system_columns(stmt)

    def _check_definition_change(self, stmt: Any) -> None:
        own = stmt.relation if isinstance(stmt, ast.CreateStmt) else None  # the table being created
        for n in iter_nodes(stmt):
            if isinstance(n, ast.RangeVar) and n is not own:
                masked = self.lookup(n, frozenset())
                if masked is not None:
                    raise Refused(f"changing the definition of, or linking to, the masked relation "
                                  f"{masked.relation.schema}.{masked.relation.name} is not allowed")

    def _copy_to_query(self, stmt: ast.CopyStmt) -> None:
        rv: Any = stmt.relation
        if self.lookup(rv, frozenset()) is None:
            return
        columns = ", ".join(_quote(s.sval) for s in stmt.attlist or ()) or "*"
        select = _first_statement(f"SELECT {columns} FROM {server_sql(rv)}")
        stmt.relation, stmt.attlist, stmt.query = None, None, select
        self.changed = True

    # ------------------------------------------------------------------------------------------ walking

    def visit(self, node: object, ctes: frozenset[str]) -> None:
        if isinstance(node, (tuple, list)):
            for item in node:
                self.visit(item, ctes)
            return
        if not isinstance(node, ast.Node) or id(node) in self._inserted:
            return
        if isinstance(node, _WITH_OWNERS) and node.withClause is not None:
            ctes = self._with(node.withClause, ctes)
        if isinstance(node, ast.SelectStmt):
            if node.fromClause:
                node.fromClause = tuple(self.from_item(x, ctes) for x in node.fromClause)
        elif isinstance(node, ast.UpdateStmt):
            self._dml_target(node, ("targetList", "whereClause", "returningClause"), ctes,
                             others=bool(node.fromClause))
            if node.fromClause:
                node.fromClause = tuple(self.from_item(x, ctes) for x in node.fromClause)
        elif isinstance(node, ast.DeleteStmt):
            self._dml_target(node, ("whereClause", "returningClause"), ctes, others=bool(node.usingClause))
            if node.usingClause:
                node.usingClause = tuple(self.from_item(x, ctes) for x in node.usingClause)
        elif isinstance(node, ast.InsertStmt):
            self._dml_target(node, ("onConflictClause", "returningClause"), ctes, others=False)
            if node.onConflictClause is not None:
                self._check_conflict_target(node)
        elif isinstance(node, ast.MergeStmt):
            self._dml_target(node, ("joinCondition", "mergeWhenClauses", "returningClause"), ctes, others=True)
            node.sourceRelation = self.from_item(node.sourceRelation, ctes)
        elif isinstance(node, ast.JoinExpr):
            node.larg = self.from_item(node.larg, ctes)
            node.rarg = self.from_item(node.rarg, ctes)
        elif isinstance(node, ast.RangeVar):
            if node.relname not in ctes or node.schemaname is not None:
                self._refuse_if(relation_refusal(node.schemaname, node.relname or ""))
        elif isinstance(node, ast.FuncCall):
            self._refuse_if(function_refusal(_parts(node.funcname), self.schema.catalog.routines))
        elif isinstance(node, (ast.A_Expr, ast.SubLink)):
            self._check_operator(node)
        elif isinstance(node, (ast.ColumnRef, ast.A_Indirection)):
            self._check_attribute_call(node)
        for attr in node_fields(type(node)):
            if attr == "withClause":
                continue
            value = getattr(node, attr, None)
            if isinstance(value, (ast.Node, tuple, list)):
                self.visit(value, ctes)

    def _with(self, clause: ast.WithClause, ctes: frozenset[str]) -> frozenset[str]:
        """Visit each CTE with exactly the names visible to it; return the names visible after WITH."""
        names = [c.ctename for c in clause.ctes or ()]
        for i, cte in enumerate(clause.ctes or ()):
            visible = ctes | frozenset(names if clause.recursive else names[:i])
            self.visit(cte.ctequery, visible)
        return ctes | frozenset(names)

    def from_item(self, item: Any, ctes: frozenset[str]) -> Any:
        if isinstance(item, ast.RangeVar):
            masked = self.lookup(item, ctes)
            return item if masked is None else self._wrap(item, item, masked)
        if isinstance(item, ast.RangeTableSample) and isinstance(item.relation, ast.RangeVar):
            masked = self.lookup(item.relation, ctes)
            return item if masked is None else self._wrap(item, item.relation, masked)
        return item

    def lookup(self, rv: ast.RangeVar, ctes: frozenset[str]) -> MaskedRelation | None:
        """The masked relation ``rv`` names, None if it names no masked relation (or a CTE)."""
        name = rv.relname or ""
        if name not in ctes and self.schema.catalog.names_view(name):
            self.views = True
        if rv.schemaname:
            masked = self.schema.by_qualified.get((rv.schemaname, name))
        else:
            if name in ctes:
                return None
            candidates = self.schema.by_name.get(name, ())
            if len(candidates) > 1:
                raise Refused(f'"{name}" may be any of several masked relations '
                              f"({', '.join(f'{m.relation.schema}.{name}' for m in candidates)}): "
                              "qualify it with its schema")
            masked = candidates[0] if candidates else None
        if masked is None:
            if not self.schema.catalog.knows(rv.schemaname, name):
                self.unknown.append(f"{rv.schemaname}.{name}" if rv.schemaname else name)
            return None
        qualified = f"{masked.relation.schema}.{masked.relation.name}"
        if masked.opaque is not None:
            raise Refused(f"{qualified} cannot be proven safe: {masked.opaque}")
        if qualified not in self.touched:
            self.touched.append(qualified)
        return masked

    def _wrap(self, item: Any, rv: ast.RangeVar, masked: MaskedRelation) -> Any:
        alias = rv.alias
        rv.alias = None
        source = server_sql(item)
        inner = f"SELECT {masked.select_list(self.schema.key)} FROM {source}"
        node = _first_statement(f"SELECT * FROM ({inner}) AS _").fromClause[0]
        node.alias = alias if alias is not None else ast.Alias(aliasname=rv.relname)
        if rv.schemaname and alias is None:
            self._wrapped_qualified.add((rv.schemaname, rv.relname or ""))
        self._mark(node)
        self.changed = True
        return node

    def _mark(self, node: ast.Node) -> None:
        self._inserted.update(id(n) for n in iter_nodes(node))

    @staticmethod
    def _refuse_if(reason: str | None) -> None:
        if reason is not None:
            raise Refused(reason)

    def _check_operator(self, node: ast.A_Expr | ast.SubLink) -> None:
        """A user-defined operator (not an extension's) may run any function, e.g. one refused by name."""
        parts = _parts(node.name if isinstance(node, ast.A_Expr) else node.operName)
        if parts and parts[-1] in self.schema.catalog.operators and (len(parts) == 1 or parts[-2] != "pg_catalog"):
            raise Refused(f"the operator {'.'.join(parts)} is user-defined: the proxy cannot see what it reads")

    def _check_attribute_call(self, node: ast.ColumnRef | ast.A_Indirection) -> None:
        """``x.f`` and ``(x).f`` call the function f(x) when x has no column f: refused for user functions."""
        names = (node.fields or ())[1:] if isinstance(node, ast.ColumnRef) else node.indirection
        catalog = self.schema.catalog
        for name in (getattr(n, "sval", None) for n in names or ()):
            if name in catalog.routines and name not in catalog.column_names:
                raise Refused(f".{name} may call the user-defined function {name}() in attribute notation: "
                              "the proxy cannot see what it reads")

    # ----------------------------------------------------------------------------- written relations

    def _dml_target(self, stmt: ast.Node, fields: tuple[str, ...], ctes: frozenset[str], *, others: bool) -> None:
        rv = stmt.relation  # type: ignore[attr-defined]
        masked = self.lookup(rv, ctes) if isinstance(rv, ast.RangeVar) else None
        if masked is None or not masked.masks:
            return
        names = {rv.alias.aliasname if rv.alias is not None else rv.relname}
        replacer = _TargetColumns(masked, names, self.schema, others=others)
        for attr in fields:
            value = getattr(stmt, attr, None)
            if isinstance(value, ast.ReturningClause):
                value.exprs = replacer.replace(replacer.expand_star(value.exprs or ()))  # type: ignore[assignment]
            else:
                setattr(stmt, attr, replacer.replace(value))
        if replacer.changed:
            for node in replacer.created:
                self._mark(node)
            self.changed = True

    def _check_conflict_target(self, stmt: ast.InsertStmt) -> None:
        """ON CONFLICT on a masked column answers "does this raw value exist?": refused."""
        masked = self.lookup(stmt.relation, frozenset()) if stmt.relation is not None else None
        if masked is None or not masked.masks:
            return
        infer = stmt.onConflictClause.infer if stmt.onConflictClause is not None else None
        columns = [getattr(e, "name", None) for e in (infer.indexElems or ()) ] if infer is not None else []
        if infer is None or infer.conname or any(c is None or c in masked.masks for c in columns):
            raise Refused("ON CONFLICT on masked columns (or without naming its columns) would reveal "
                          "whether a raw value exists")

    def _check_system_columns(self, stmt: ast.Node) -> None:
        """A masked relation became a subquery, which has no system columns: say so clearly."""
        for n in iter_nodes(stmt):
            if isinstance(n, ast.ColumnRef) and n.fields and id(n) not in self._inserted:
                name = getattr(n.fields[-1], "sval", None)
                if name in SYSTEM_COLUMNS:
                    raise Refused(f"the system column {name} of a masked relation is not available")

    def _unqualify_columns(self, stmt: ast.Node) -> None:
        """``schema.table.column`` cannot name a column of the subquery that replaced the table."""
        for n in iter_nodes(stmt):
            fields = (n.fields or ()) if isinstance(n, ast.ColumnRef) else ()
            if len(fields) in (3, 4):
                schema, table = (getattr(f, "sval", None) for f in fields[-3:-1])
                if (schema, table) in self._wrapped_qualified:
                    n.fields = tuple(fields[-2:])


class _TargetColumns:
    """Replaces reads of a written masked table's masked columns by their masked values."""

    def __init__(self, masked: MaskedRelation, names: set[str | None], schema: MaskedSchema, *, others: bool) -> None:
        self.masked = masked
        self.names = {n for n in names if n}
        self.schema = schema
        self.others = others  # other relations are in scope (UPDATE ... FROM, DELETE ... USING, MERGE)
        self.changed = False
        self.created: list[ast.Node] = []

    def expand_star(self, targets: tuple[ast.ResTarget, ...]) -> tuple[ast.ResTarget, ...]:
        out: list[ast.ResTarget] = []
        for target in targets:
            ref = target.val
            if isinstance(ref, ast.ColumnRef) and ref.fields and isinstance(ref.fields[-1], ast.A_Star):
                qualifier = [getattr(f, "sval", None) for f in ref.fields[:-1]]
                if (not qualifier and self.others) or (qualifier and qualifier[-1] not in self.names):
                    if qualifier:
                        out.append(target)
                        continue
                    raise Refused("RETURNING * with other relations in scope: list the columns")
                out.extend(ast.ResTarget(name=c.name, val=ast.ColumnRef(fields=(ast.String(sval=c.name),)))
                           for c in self.masked.relation.columns)
                self.changed = True
            else:
                out.append(target)
        return tuple(out)

    def replace(self, node: object) -> object:
        if isinstance(node, tuple):
            return tuple(self.replace(x) for x in node)
        if isinstance(node, list):
            return [self.replace(x) for x in node]
        if not isinstance(node, ast.Node):
            return node
        if isinstance(node, ast.ColumnRef):
            return self._column(node)
        for attr in node_fields(type(node)):
            value = getattr(node, attr, None)
            if isinstance(value, (ast.Node, tuple, list)):
                setattr(node, attr, self.replace(value))
        return node

    def _column(self, ref: ast.ColumnRef) -> ast.Node:
        parts = [getattr(f, "sval", None) for f in ref.fields or ()]
        if parts and parts[-1] is None:  # t.*
            if len(parts) == 2 and parts[0] in self.names:
                raise Refused(f"{parts[0]}.* reads every column of the masked table being written")
            return ref
        column = parts[-1] if parts else None
        qualifier = parts[-2] if len(parts) >= 2 else None
        if len(parts) == 1 and column in self.names and self.masked.relation.column(column or "") is None:
            raise Refused(f"the whole-row reference {column} reads masked columns of the table being written")
        if qualifier is not None and qualifier not in self.names:
            return ref
        mask: Mask | None = self.masked.masks.get(column or "")
        if mask is None:
            return ref
        col = self.masked.relation.column(column or "")
        assert col is not None
        node = _expression(mask.sql(server_sql(ref), col.type_sql, self.schema.key))
        self.created.append(node)
        self.changed = True
        return node


def _persisting(stmt: ast.Node) -> str | None:
    """Statements whose text the server keeps and shows back (so must not hold mask expressions)."""
    if isinstance(stmt, ast.ExplainStmt):
        return "EXPLAIN"
    if isinstance(stmt, ast.ViewStmt):
        return "CREATE VIEW"
    if isinstance(stmt, ast.RuleStmt):
        return "CREATE RULE"
    if isinstance(stmt, ast.CreateTableAsStmt) and stmt.objtype == ObjectType.OBJECT_MATVIEW:
        return "CREATE MATERIALIZED VIEW"
    return None


def _parts(name: object) -> tuple[str, ...]:
    """The dotted parts of a function or operator name node list."""
    return tuple(str(getattr(p, "sval", "")) for p in name or ()) if isinstance(name, (tuple, list)) else ()


def _quote(name: str | None) -> str:
    return '"' + (name or "").replace('"', '""') + '"'
