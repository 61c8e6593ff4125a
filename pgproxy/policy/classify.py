"""What a SQL string does, judged by its effect (not its first keyword), with PostgreSQL's own parser.

``classify(sql)`` parses the text with pglast (libpg_query: the PostgreSQL 17 grammar), walks every
node of every statement (so a function call in a subquery, a CTE or a default expression counts) and
returns a frozen :class:`Classification`: one :class:`StatementInfo` per statement of a
multi-statement string, each judged on its own, and their union.

Classes (a statement may have several):

``read``              SELECT, SHOW, FETCH, COPY ... TO, plain EXPLAIN
``write``             INSERT/UPDATE/DELETE/MERGE anywhere (data-modifying CTEs too), SELECT ... FOR
                      UPDATE/SHARE (takes row locks), TRUNCATE, SELECT INTO, CREATE TABLE AS, COPY FROM
``ddl``               CREATE/ALTER/DROP of objects, COMMENT, SECURITY LABEL, REFRESH MATERIALIZED VIEW
``dcl``               GRANT/REVOKE, CREATE/ALTER/DROP ROLE, ALTER DEFAULT PRIVILEGES, REASSIGN OWNED,
                      user mappings, ALTER SYSTEM (server configuration)
``destructive``       DROP, TRUNCATE, DELETE/UPDATE without WHERE (or with a constant-true WHERE)
``session``           SET, RESET, SET ROLE, SET SESSION AUTHORIZATION, DISCARD, set_config()
``transaction``       BEGIN/START/COMMIT/ROLLBACK/SAVEPOINT/RELEASE/PREPARE TRANSACTION/COMMIT
                      PREPARED, SET TRANSACTION, SET CONSTRAINTS
``copy_in``/``copy_out`` COPY FROM / COPY TO; plus ``copy_program`` (PROGRAM) or ``copy_file`` (a
                      server-side file)
``procedural``        DO, CALL, CREATE FUNCTION/PROCEDURE, CREATE LANGUAGE, LOAD
``dangerous_function`` a call of a function that reaches outside the database or the session's data
                      (files, other servers, other backends, server configuration) or runs SQL text
                      the classifier cannot see (``query_to_xml`` family, ``dblink``); see
                      ``DANGEROUS_FUNCTIONS``. ``pg_sleep`` is deliberately not listed: it only costs
                      time, which ``statement_timeout`` bounds.
``multi_statement``   more than one statement in the string
``prepare``/``cursor``/``explain`` markers for PREPARE, DECLARE CURSOR and EXPLAIN; the inner statement
                      is classified as well (for EXPLAIN only with ANALYZE, which runs it)
``execute``           EXECUTE of a prepared statement (what it runs was judged at its PREPARE)
``utility``           everything else (VACUUM, ANALYZE, CLUSTER, REINDEX, CHECKPOINT, LISTEN, NOTIFY,
                      LOCK, DEALLOCATE, CLOSE...)

The fast-path FunctionCall message is not SQL; the gate gives it the class ``function_call``. A statement
pglast cannot parse (its grammar is not exactly the server's) gets the class ``unparsed`` from the gate.

A string that does not parse raises :class:`SqlSyntaxError` with the parser's message and the
1-based character position PostgreSQL itself reports.

:func:`analyse` (which ``classify`` reads) is cached by text and by shape (``shape.statement_shape``), so
statements that differ only in their literals are parsed once; see its docstring for what is never
reused across texts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from cachebox import FIFOCache
from pglast import ast
from pglast.enums.parsenodes import VariableSetKind

from ..core.statement import SqlSyntaxError as SqlSyntaxError  # what classify() raises, importable from here
from ..core.statement import Statement, Tree, parse
from .shape import statement_shape

CLASSES = frozenset({
    "read", "write", "ddl", "dcl", "destructive", "session", "transaction", "copy_in", "copy_out",
    "copy_program", "copy_file", "procedural", "dangerous_function", "multi_statement", "prepare", "cursor",
    "explain", "execute", "utility", "function_call", "unparsed",
})
UNPARSED = "unparsed"  # the proxy's parser could not read the statement (see Policy.decide_unparsed)

# Called by name (the last component, so pg_catalog.pg_read_file counts too).
DANGEROUS_FUNCTIONS = frozenset({
    # server files
    "pg_read_file", "pg_read_binary_file", "pg_ls_dir", "pg_stat_file", "pg_ls_logdir", "pg_ls_waldir",
    "pg_ls_tmpdir", "pg_ls_archive_statusdir", "pg_ls_logicalsnapdir", "pg_ls_logicalmapdir",
    "pg_ls_replslotdir", "pg_file_write", "pg_file_rename", "pg_file_unlink", "pg_file_sync",
    "lo_import", "lo_export",
    # other backends and the server itself
    "pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf", "pg_rotate_logfile", "pg_promote",
    "pg_switch_wal", "pg_create_restore_point", "pg_backup_start", "pg_backup_stop",
    "pg_log_backend_memory_contexts", "pg_create_physical_replication_slot",
    "pg_create_logical_replication_slot", "pg_drop_replication_slot", "pg_copy_logical_replication_slot",
    "pg_copy_physical_replication_slot", "pg_logical_emit_message", "pg_replication_origin_create",
    "pg_replication_origin_drop", "pg_replication_origin_advance",
    # session settings from an expression (SET in disguise)
    "set_config",
    # run SQL text the classifier never sees
    "query_to_xml", "query_to_xmlschema", "query_to_xml_and_xmlschema", "cursor_to_xml",
    "cursor_to_xmlschema", "table_to_xml", "table_to_xmlschema", "table_to_xml_and_xmlschema",
    "schema_to_xml", "schema_to_xmlschema", "schema_to_xml_and_xmlschema", "database_to_xml",
    "database_to_xmlschema", "database_to_xml_and_xmlschema",
})
DANGEROUS_PREFIXES = ("dblink",)  # dblink, dblink_exec, dblink_connect(_u), dblink_send_query...

_DCL_NODES = frozenset({"GrantStmt", "GrantRoleStmt", "CreateRoleStmt", "AlterRoleStmt", "AlterRoleSetStmt",
                        "DropRoleStmt", "AlterDefaultPrivilegesStmt", "ReassignOwnedStmt",
                        "CreateUserMappingStmt", "AlterUserMappingStmt", "DropUserMappingStmt",
                        "AlterSystemStmt"})
_DROP_NODES = frozenset({"DropStmt", "DropdbStmt", "DropOwnedStmt", "DropTableSpaceStmt",
                         "DropSubscriptionStmt", "DropUserMappingStmt", "DropRoleStmt"})
_READ_NODES = frozenset({"SelectStmt", "VariableShowStmt", "FetchStmt"})
_UTILITY_NODES = frozenset({"VacuumStmt", "ClusterStmt", "ReindexStmt", "CheckPointStmt", "ListenStmt",
                            "UnlistenStmt", "NotifyStmt", "LockStmt", "DeallocateStmt", "ClosePortalStmt"})
_DDL_EXTRA = frozenset({"CommentStmt", "SecLabelStmt", "RenameStmt", "RuleStmt", "DefineStmt", "IndexStmt",
                        "ViewStmt", "CompositeTypeStmt", "ImportForeignSchemaStmt", "RefreshMatViewStmt",
                        "ReplicaIdentityStmt", "CreatedbStmt"})
_RESET_KINDS = (VariableSetKind.VAR_RESET, VariableSetKind.VAR_RESET_ALL)
_RELATION_OBJECTS = frozenset({"OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE",
                               "OBJECT_SEQUENCE", "OBJECT_INDEX"})
_PROCEDURAL_NODES = frozenset({"DoStmt", "CallStmt", "CreatePLangStmt", "LoadStmt"})


class StatementInfo(NamedTuple):
    """One statement of the string, judged on its own (a tuple: built for every statement with new literals,
    where a frozen dataclass's ``__init__`` cost several times more)."""

    sql: str  # its text, as written
    node: str  # the parse node, e.g. "DeleteStmt"
    classes: frozenset[str]
    tables: tuple[str, ...]
    columns: tuple[str, ...]
    functions: tuple[str, ...]
    reasons: tuple[str, ...]


class Classification(NamedTuple):
    """What the policy reads from a statement string: its statements and their union."""

    statements: tuple[StatementInfo, ...]
    classes: frozenset[str]
    tables: tuple[str, ...]
    columns: tuple[str, ...]
    functions: tuple[str, ...]
    reasons: tuple[str, ...]

    def summary(self) -> dict[str, Any]:
        """JSON-ready: what audit events and approval requests record."""
        return {"classes": sorted(self.classes), "tables": list(self.tables), "functions": list(self.functions),
                "reasons": list(self.reasons)}


def _uniq(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def dotted_name(parts: Any) -> str:
    out: list[str] = []
    for p in parts or ():
        if isinstance(p, ast.String):
            out.append(p.sval or "")
        elif isinstance(p, ast.A_Star):
            out.append("*")
    return ".".join(out)


def _relname(rv: Any) -> str:
    if rv is None:
        return "?"
    parts = [p for p in (rv.catalogname, rv.schemaname, rv.relname) if p]
    return ".".join(parts)


def is_dangerous_function(name: str) -> bool:
    base = name.rsplit(".", 1)[-1].lower()
    return base in DANGEROUS_FUNCTIONS or base.startswith(DANGEROUS_PREFIXES)


def _always_true(where: Any) -> bool | None:
    """WHERE true, WHERE 1=1, WHERE 'a'='a': a filter that keeps every row. None when the filter does not
    depend on a constant's value (so it keeps rows by what they hold); False or True when it does."""
    if isinstance(where, ast.A_Const):
        return isinstance(where.val, ast.Boolean) and bool(where.val.boolval)
    if isinstance(where, ast.TypeCast):
        return _always_true(where.arg)
    if isinstance(where, ast.A_Expr) and dotted_name(where.name) == "=":
        left, right = where.lexpr, where.rexpr
        if isinstance(left, ast.A_Const) and isinstance(right, ast.A_Const):
            return repr(left.val) == repr(right.val)
    return None


_SLOTS: dict[type, tuple[str, ...]] = {}


def node_fields(cls: type) -> tuple[str, ...]:
    """A node class's fields, reversed so that the walk's stack pops them in source order."""
    slots = _SLOTS.get(cls)
    if slots is None:
        slots = _SLOTS[cls] = tuple(reversed(list(getattr(cls, "__slots__", ()))))
    return slots


def iter_nodes(root: Any) -> Iterator[ast.Node]:
    """Every node of a tree in source order, iteratively (deep expressions must not hit the recursion
    limit). A node's children are read after it is yielded, so the caller may replace them."""
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, (tuple, list)):
            stack.extend(reversed(node))
            continue
        if not isinstance(node, ast.Node):
            continue
        yield node
        for attr in node_fields(type(node)):
            value = getattr(node, attr, None)
            if isinstance(value, (ast.Node, tuple, list)):
                stack.append(value)


class _Walker:
    """Collects classes, tables, columns, functions and reasons from one statement's tree."""

    def __init__(self) -> None:
        self.classes: set[str] = set()
        self.tables: list[str] = []
        self.columns: list[str] = []
        self.functions: list[str] = []
        self.reasons: list[str] = []
        self.ctes: set[str] = set()
        # Whether the result depends on a constant's value (not only on the statement's shape): then it
        # is not cached by shape (see ``classify``).
        self.reads_constants = False

    def add(self, cls: str, reason: str | None = None) -> None:
        self.classes.add(cls)
        if reason is not None and reason not in self.reasons:
            self.reasons.append(reason)

    def walk(self, root: Any, *, effects: bool = True) -> None:
        for node in iter_nodes(root):
            self.visit(node, effects)

    def visit(self, node: ast.Node, effects: bool) -> None:
        if isinstance(node, ast.RangeVar):
            self.tables.append(_relname(node))
        elif isinstance(node, ast.ColumnRef):
            self.columns.append(dotted_name(node.fields))
        elif isinstance(node, ast.FuncCall):
            fname = dotted_name(node.funcname)
            self.functions.append(fname)
            if effects and is_dangerous_function(fname):
                self.add("dangerous_function", f"calls {fname}()")
                if fname.rsplit(".", 1)[-1].lower() == "set_config":
                    self.add("session", "set_config() changes a setting")
        elif isinstance(node, ast.CommonTableExpr):
            self.ctes.add(node.ctename or "")
        elif not effects:
            return
        elif isinstance(node, ast.InsertStmt):
            self.add("write", f"INSERT into {_relname(node.relation)}")
        elif isinstance(node, ast.UpdateStmt):
            target = _relname(node.relation)
            self.add("write", f"UPDATE of {target}")
            if self._keeps_every_row(node.whereClause):
                self.add("destructive", f"UPDATE without WHERE on {target}")
        elif isinstance(node, ast.DeleteStmt):
            target = _relname(node.relation)
            self.add("write", f"DELETE from {target}")
            if self._keeps_every_row(node.whereClause):
                self.add("destructive", f"DELETE without WHERE on {target}")
        elif isinstance(node, ast.MergeStmt):
            self.add("write", f"MERGE into {_relname(node.relation)}")
        elif isinstance(node, ast.SelectStmt):
            if node.lockingClause:
                self.add("write", "SELECT ... FOR UPDATE/SHARE locks rows")
            if node.intoClause is not None:
                self.add("write", f"SELECT INTO creates {_relname(node.intoClause.rel)}")
                self.add("ddl")
            if node.intoClause is not None:
                self.tables.append(_relname(node.intoClause.rel))

    def _keeps_every_row(self, where: Any) -> bool:
        """No WHERE, or a constant-true one (noting that the answer read a constant)."""
        if where is None:
            return True
        verdict = _always_true(where)
        if verdict is None:
            return False
        self.reads_constants = True
        return verdict

    def statement(self, stmt: Any) -> str:
        """Classify the top-level statement ``stmt``; returns its node name."""
        kind = type(stmt).__name__
        if isinstance(stmt, ast.ExplainStmt):
            options = [o for o in stmt.options or () if isinstance(o, ast.DefElem) and o.defname == "analyze"]
            if any(o.arg is not None for o in options):
                self.reads_constants = True  # ANALYZE 'off', ANALYZE 0
            analyze = any(o.arg is None or _truthy(o.arg) for o in options)
            self.add("explain")
            if analyze:
                self.reasons.append("EXPLAIN ANALYZE runs the statement")
                self.statement(stmt.query)
            else:
                self.add("read")
                self.walk(stmt.query, effects=False)
            return kind
        if isinstance(stmt, ast.PrepareStmt):
            self.add("prepare", f"PREPARE {stmt.name}")
            self.statement(stmt.query)
            return kind
        if isinstance(stmt, ast.DeclareCursorStmt):
            self.add("cursor", f"DECLARE CURSOR {stmt.portalname}")
            self.statement(stmt.query)
            return kind
        if isinstance(stmt, ast.ExecuteStmt):
            self.add("execute", f"EXECUTE of prepared statement {stmt.name}")
            self.walk(stmt.params)
            return kind
        if isinstance(stmt, ast.CreateTableAsStmt):
            self.add("ddl")
            created = _relname(getattr(stmt.into, "rel", None))
            self.add("write", f"CREATE ... AS creates {created}")
            self.tables.append(created)
            self.statement(stmt.query)
            return kind
        self._top(stmt, kind)
        self.walk(stmt)
        return kind

    def _top(self, stmt: Any, kind: str) -> None:
        if kind in _READ_NODES:
            self.add("read")
        elif isinstance(stmt, ast.TruncateStmt):
            names = ", ".join(_relname(r) for r in stmt.relations or ())
            self.add("write")
            self.add("destructive", f"TRUNCATE {names}")
        elif kind in _DCL_NODES:
            self.add("dcl", _DCL_REASONS.get(kind))
            if kind in _DROP_NODES:
                self.add("destructive", "DROP ROLE" if kind == "DropRoleStmt" else "DROP USER MAPPING")
        elif kind in _DROP_NODES:
            self.add("ddl")
            self.add("destructive", _drop_what(stmt))
            if isinstance(stmt, ast.DropStmt) and str(getattr(stmt.removeType, "name", "")) in _RELATION_OBJECTS:
                self.tables.extend(dotted_name(o) for o in stmt.objects or () if isinstance(o, (tuple, list)))
            if kind == "DropOwnedStmt":
                self.add("dcl")
        elif isinstance(stmt, ast.CreateFunctionStmt):
            self.add("ddl")
            what = "PROCEDURE" if stmt.is_procedure else "FUNCTION"
            self.add("procedural", f"CREATE {what} {dotted_name(stmt.funcname)}")
        elif kind in _PROCEDURAL_NODES:
            self.add("procedural", {"DoStmt": "DO block runs procedural code", "CallStmt": "CALL of a procedure",
                                    "CreatePLangStmt": "CREATE LANGUAGE", "LoadStmt": "LOAD of a shared library"}
                     [kind])
            if kind == "CreatePLangStmt":
                self.add("ddl")
        elif isinstance(stmt, ast.VariableSetStmt):
            name = (stmt.name or "").lower()
            if name.startswith("transaction") or name == "session characteristics":
                self.add("transaction")
            elif name == "role":
                self.add("session", "SET ROLE changes the effective role")
            elif name == "session_authorization":
                self.add("session", "SET SESSION AUTHORIZATION changes the session user")
            else:
                self.add("session", f"{'RESET' if stmt.kind in _RESET_KINDS else 'SET'} {name or 'ALL'}")
        elif isinstance(stmt, ast.DiscardStmt):
            self.add("session", "DISCARD resets session state")
        elif isinstance(stmt, (ast.TransactionStmt, ast.ConstraintsSetStmt)):
            self.add("transaction")
        elif isinstance(stmt, ast.CopyStmt):
            self._copy(stmt)
        elif kind in _UTILITY_NODES:
            self.add("utility")
        elif kind in _DDL_EXTRA or kind.startswith(("Create", "Alter", "Define")):
            self.add("ddl")
        elif kind not in ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"):
            self.add("utility")

    def _copy(self, stmt: ast.CopyStmt) -> None:
        if stmt.filename is not None:
            self.reads_constants = True  # the reasons name the file or the program
        target = _relname(stmt.relation) if stmt.relation is not None else "a query"
        if stmt.is_from:
            self.add("copy_in")
            self.add("write", f"COPY into {target}")
        else:
            self.add("copy_out")
            self.add("read")
        if stmt.is_program:
            self.add("copy_program", f"COPY {'FROM' if stmt.is_from else 'TO'} PROGRAM {stmt.filename!r}")
        elif stmt.filename is not None:
            self.add("copy_file", f"COPY {'FROM' if stmt.is_from else 'TO'} server file {stmt.filename!r}")


_DCL_REASONS = {"GrantStmt": "GRANT/REVOKE of privileges", "GrantRoleStmt": "GRANT/REVOKE of role membership",
                "CreateRoleStmt": "CREATE ROLE", "AlterRoleStmt": "ALTER ROLE", "AlterRoleSetStmt": "ALTER ROLE SET",
                "DropRoleStmt": "DROP ROLE", "AlterDefaultPrivilegesStmt": "ALTER DEFAULT PRIVILEGES",
                "ReassignOwnedStmt": "REASSIGN OWNED", "AlterSystemStmt": "ALTER SYSTEM changes server configuration"}


def _truthy(arg: Any) -> bool:
    if isinstance(arg, ast.Boolean):
        return bool(arg.boolval)
    if isinstance(arg, ast.Integer):
        return arg.ival != 0
    if isinstance(arg, ast.String):
        return (arg.sval or "").lower() in ("true", "on", "1", "yes")
    return True


def _drop_what(stmt: Any) -> str:
    if isinstance(stmt, ast.DropStmt):
        kind = str(getattr(stmt.removeType, "name", stmt.removeType)).removeprefix("OBJECT_").replace("_", " ")
        names: list[str] = []
        for obj in stmt.objects or ():
            if isinstance(obj, (tuple, list)):
                names.append(dotted_name(obj))
            elif isinstance(obj, ast.String):
                names.append(obj.sval or "")
            elif isinstance(obj, ast.TypeName):
                names.append(dotted_name(obj.names))
        return f"DROP {kind} {', '.join(n for n in names if n)}".rstrip()
    if isinstance(stmt, ast.DropdbStmt):
        return f"DROP DATABASE {stmt.dbname}"
    return {"DropOwnedStmt": "DROP OWNED", "DropTableSpaceStmt": "DROP TABLESPACE",
            "DropSubscriptionStmt": "DROP SUBSCRIPTION"}.get(type(stmt).__name__, "DROP")


def _statement_text(sql: str, raw: ast.RawStmt) -> str:
    start = raw.stmt_location or 0
    length = raw.stmt_len or (len(sql) - start)
    return sql[start:start + length].strip()


@dataclass(frozen=True, slots=True)
class _Template:
    """The classification of every single statement of one shape, without its text."""

    info: StatementInfo  # its sql is the text of the statement it was made from
    start: int  # where the statement begins: the text before it holds no constant, so it is the same
    tail: int  # characters after its end (the semicolon, comments): the same for every text of the shape

    def bind(self, sql: str) -> Classification:
        i = self.info
        info = StatementInfo(sql[self.start:len(sql) - self.tail].strip(), i.node, i.classes, i.tables, i.columns,
                             i.functions, i.reasons)
        return Classification((info,), info.classes, info.tables, info.columns, info.functions, info.reasons)


class Analysis(NamedTuple):
    """What the proxy reads from one statement text, once for all its consumers (made for every new text)."""

    shape: str | None  # ``statement_shape``: the key of analyses that hold for new literals
    classification: Classification
    # The classification holds for every text of ``shape`` (read from its template, or made one): what
    # depends on the classification alone (a policy decision) may be cached by the shape.
    shaped: bool = False


CACHED = 4096  # analyses by text, and classifications by shape
_READS_CONSTANTS = False  # cached by shape: this shape's classification depends on its constants
_by_text: FIFOCache[str, Analysis] = FIFOCache(CACHED)
_by_shape: FIFOCache[str, _Template | bool] = FIFOCache(CACHED)


def classify(sql: str) -> Classification:
    """Classify ``sql``; raises SqlSyntaxError when it does not parse."""
    return analyse(sql).classification


def analyse(sql: str, tree: Callable[[], Tree] | None = None) -> Analysis:
    """The shape and classification of ``sql``; raises SqlSyntaxError when it does not parse.

    Cached by text, and the classification by shape (the text with its constants taken out) for a single
    statement whose classification never read a constant's value, so new literals do not parse again. A
    shape whose classification did read one (``DELETE ... WHERE 1 = 1``, ``EXPLAIN (ANALYZE 'on')``,
    ``COPY ... PROGRAM 'cmd'``) is parsed and classified in full for every text. ``tree`` gives the parse
    when one is needed (a Statement's, shared with the other consumers); by default ``sql`` is parsed.
    """
    found = _by_text.get(sql)
    if found is not None:
        return found
    shape = statement_shape(sql)
    template = _by_shape.get(shape) if shape is not None else None
    if isinstance(template, _Template):
        classification, shaped = template.bind(sql), True
    else:
        classification, made = _classify_tree(sql, tree() if tree is not None else parse(sql))
        shaped = shape is not None and template is None and made is not None
        if shape is not None and template is None:
            _by_shape[shape] = made if made is not None else _READS_CONSTANTS
    found = _by_text[sql] = Analysis(shape, classification, shaped)
    return found


def analysed(sql: str) -> Analysis | None:
    """The cached analysis of ``sql``, None when there is none (never parses)."""
    return _by_text.get(sql)


def analyse_statement(statement: Statement) -> Analysis:
    """The analysis of the text the server reads (``statement.server_text()``), memoized on the statement;
    a parse it needs is the statement's own (shared with masking). Raises SqlSyntaxError."""
    return statement.derive(_analyse_statement)


def classify_statement(statement: Statement) -> Classification:
    """The classification of the text the server reads; raises SqlSyntaxError when it does not parse."""
    return analyse_statement(statement).classification


def _analyse_statement(statement: Statement) -> Analysis:
    return analyse(statement.server_text(), lambda: statement.tree)


def _classify_tree(sql: str, raws: Tree) -> tuple[Classification, _Template | None]:
    """Classify the parse of ``sql``; with the template of its shape when that classification holds for every
    text of the shape (one statement, no constant's value read)."""
    multi = len(raws) > 1
    infos = []
    reads_constants = False
    for raw in raws:
        w = _Walker()
        node = w.statement(raw.stmt)
        if multi:
            w.add("multi_statement")
        reads_constants = reads_constants or w.reads_constants
        tables = [t for t in w.tables if "." in t or t not in w.ctes]
        infos.append(StatementInfo(_statement_text(sql, raw), node, frozenset(w.classes), _uniq(tables),
                                   _uniq(w.columns), _uniq(w.functions), _uniq(w.reasons)))
    reasons = [r for i in infos for r in i.reasons]
    if multi:
        reasons.append(f"{len(infos)} statements in one string")
    classification = Classification(
        statements=tuple(infos),
        classes=frozenset().union(*(i.classes for i in infos)) if infos else frozenset(),
        tables=_uniq([t for i in infos for t in i.tables]),
        columns=_uniq([c for i in infos for c in i.columns]),
        functions=_uniq([f for i in infos for f in i.functions]),
        reasons=_uniq(reasons),
    )
    if len(raws) != 1 or reads_constants:
        return classification, None
    start = raws[0].stmt_location or 0
    end = start + raws[0].stmt_len if raws[0].stmt_len else len(sql)
    return classification, _Template(infos[0], start, len(sql) - end)
