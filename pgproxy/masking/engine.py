"""Masking in a running proxy: the gate that rewrites statements and the per-session wire hooks.

``Masking`` is built once per proxy from the ``masking:`` config section; it is a FrontendGate (the last
one, after policy) and attaches a ``SessionMasking`` to each session whose identity has masking rules.
Plans (rewrite, refuse or pass) are cached per catalog version and rule set: those that send the text
unchanged by the statement's shape (its text with the constants taken out: the rewrite check never reads a
constant's value), so statements with new literals are not parsed again, the others by text. The catalog
is read per database when first needed (the statement waits for it, the stream is held) and again after
DDL run through the proxy or every ``catalog_refresh_seconds``. Never lets a statement of a masked identity through
without a rewrite check, and never records rewritten text (it carries mask expressions) in the audit log.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import weakref
from typing import TYPE_CHECKING, Any

import asyncpg
from cachebox import FIFOCache, LRUCache

from ..config import ConfigError, MaskingConfig, UpstreamConfig
from ..core.plugins import Hold, Refuse, Rewrite, SessionContext, Verdict
from ..core.reading import unparsed_error
from ..core.statement import SqlSyntaxError, Statement
from ..policy.classify import analyse_statement, analysed, classify_statement
from ..policy.shape import statement_shape
from ..protocol import errors
from ..protocol.messages import RowDescription
from ..protocol.tracker import Kind, StatementResult
from ..protocol.types import Backend, Frontend
from ..upstream_login import upstream_dsn
from .catalog import CatalogCache, CatalogSnapshot, MaskedSchema, resolve
from .masks import MaskKey
from .rewrite import Rewritten, rewrite_tree
from .roles import RoleCheck, refusal_message
from .rules import ColumnRule, MaskingRules, load_rules
from .wire import WireMasker, may_return_rows

if TYPE_CHECKING:
    from ..identity import Identity

    Session = SessionContext[Identity]

log = logging.getLogger(__name__)

REWRITE_CACHE_SIZE = 4096
SCHEMA_CACHE_SIZE = 256
_QUERY, _PARSE, _EXECUTE, _FUNCTION = Frontend.QUERY, Frontend.PARSE, Frontend.EXECUTE, Frontend.FUNCTION_CALL


def refusal(reason: str) -> Refuse:
    return Refuse(errors.error(errors.INSUFFICIENT_PRIVILEGE, f"pgproxy masking: {reason}",
                               hint="Masked columns can only be read through plain SQL the proxy can rewrite."))


class Masking:
    """Column masking for one proxy (a FrontendGate)."""

    def __init__(self, config: MaskingConfig, upstream: UpstreamConfig, rules: MaskingRules | None = None) -> None:
        self.config = config
        self.upstream = upstream
        self.rules = rules if rules is not None else load_rules(config.rules_dir)
        secret = config.key()
        if self.rules.needs_key and secret is None:
            raise ConfigError("masking: a rule uses keyed_hash: set masking.key_env or masking.key_file")
        self.key = MaskKey(secret) if secret is not None else None
        self.channels = frozenset(config.notification_channels)
        self.catalogs = CatalogCache(config.catalog_refresh_seconds,
                                     {(r.schema, r.table) for r in self.rules.rules})
        self.roles = RoleCheck(config.catalog_refresh_seconds)
        self._schemas: LRUCache[tuple[int, tuple[str, ...]], MaskedSchema] = LRUCache(maxsize=SCHEMA_CACHE_SIZE)
        # (catalog version, rule set, statement text) -> a plan that rewrites, or of a text without a shape;
        # (catalog version, rule set, shape) -> a plan that sends the text unchanged (or refuses it)
        self._rewrites: FIFOCache[tuple[int, tuple[str, ...], str], Rewritten] = FIFOCache(REWRITE_CACHE_SIZE)
        self._by_shape: FIFOCache[tuple[int, tuple[str, ...], str], Rewritten] = FIFOCache(REWRITE_CACHE_SIZE)
        self._attached: weakref.WeakKeyDictionary[Session, SessionMasking] = weakref.WeakKeyDictionary()

    async def aclose(self) -> None:
        """Close the catalog cache's kept connections when the proxy shuts down."""
        await self.catalogs.aclose()

    def attach(self, session: Session) -> SessionMasking | None:
        """Per-session state and wire hooks when any rule applies to the session's identity."""
        assert session.identity is not None
        rules = self.rules.for_identity(session.identity, session.db_role)
        if not rules:
            return None
        masking = self._attached[session] = SessionMasking(self, session, rules)
        masking.install()
        return masking

    async def refuse_role(self, identity: Identity, role: str, database: str) -> tuple[str, str] | None:
        """(SQLSTATE, reason) when a masked identity may not log in as ``role``; None when it may."""
        if not self.rules.for_identity(identity, role):
            return None
        try:
            reasons = await self.roles.reasons(database, role, functools.partial(self.connect, role, database))
        except (TimeoutError, OSError, asyncpg.PostgresError, ConfigError) as exc:
            log.error("masking: cannot check the capabilities of role %r: %s", role, exc)
            return errors.CANNOT_CONNECT_NOW, f'the capabilities of database role "{role}" could not be checked'
        return (errors.INVALID_AUTHORIZATION, refusal_message(role, reasons)) if reasons else None

    async def connect(self, role: str, database: str) -> Any:
        """A catalog connection upstream as ``role`` (its own credential)."""
        dsn = upstream_dsn(self.upstream, role, database)
        return await asyncpg.connect(dsn, timeout=self.upstream.connect_timeout_seconds)

    def inspect(self, session: Session, statement: Statement) -> Verdict:
        masking = self._attached.get(session)
        return masking.inspect(statement) if masking is not None else None

    def schema_for(self, catalog: CatalogSnapshot, rules: tuple[ColumnRule, ...]) -> MaskedSchema:
        key = (catalog.version, tuple(r.where for r in rules))
        schema = self._schemas.get(key)
        if schema is None:
            schema = self._schemas[key] = resolve(catalog, rules, self.key)
        return schema

    def rewrite(self, schema: MaskedSchema, rules_key: tuple[str, ...], statement: Statement | str) -> Rewritten:
        """The plan for the text the server reads under ``schema``: cached by shape when it sends the text
        unchanged (a rewritten text carries the statement's own constants), else by text. A parse it needs
        is the statement's own (the rewrite takes it over: it changes the tree)."""
        if isinstance(statement, str):
            statement = Statement(_QUERY, statement)
        sql = statement.server_text()
        version = schema.catalog.version
        result = self._rewrites.get((version, rules_key, sql))
        if result is not None:
            return result
        try:
            shape = analyse_statement(statement).shape
        except SqlSyntaxError:  # left to the server (the gates refuse what they cannot read)
            return Rewritten(None)
        if shape is not None:
            result = self._by_shape.get((version, rules_key, shape))
            if result is not None:
                return result
        result = rewrite_tree(statement.take_tree(), schema)
        if shape is not None and result.sql is None:
            # A text with a shape parses, so this is never the pass given to a text the parser cannot read.
            self._by_shape[(version, rules_key, shape)] = result
        else:
            self._rewrites[(version, rules_key, sql)] = result
        return result

    def cached(self, catalog_version: int, rules_key: tuple[str, ...], sql: str) -> Rewritten | None:
        """The plan ``rewrite`` made for ``sql``, if it is still cached (never parses into a tree)."""
        result = self._rewrites.get((catalog_version, rules_key, sql))
        if result is None:
            analysis = analysed(sql)
            shape = analysis.shape if analysis is not None else statement_shape(sql)
            if shape is not None:
                result = self._by_shape.get((catalog_version, rules_key, shape))
        return result


class SessionMasking:
    """Masking state of one session: its rules, its catalog, its wire hooks."""

    def __init__(self, engine: Masking, session: Session, rules: tuple[ColumnRule, ...]) -> None:
        self.engine = engine
        self.session = session
        self.rules = rules
        self.rules_key = tuple(r.where for r in rules)
        self.ddl_pending = False
        self._schema: MaskedSchema | None = None
        self._on_masked = session.metrics.masked_values
        # Per statement text: how many result columns a rewritten statement returns masked (for the count).
        self._masked_columns: dict[str, int] = {}
        self._statement_sql: dict[str, str] = {}  # prepared statement name -> its text
        self.wire = WireMasker(session.tracker, self.current_schema, engine.channels, self._hook_rows,
                               self._on_masked)

    def install(self) -> None:
        s = self.session
        s.add_backend_hook(Backend.ROW_DESCRIPTION, self.wire.on_row_description)
        s.add_backend_hook(Backend.ROW_DESCRIPTION, self._on_row_description)
        for msg_type in (Backend.ERROR_RESPONSE, Backend.NOTICE_RESPONSE):
            s.add_backend_hook(msg_type, functools.partial(self.wire.on_error_or_notice, msg_type))
        s.add_backend_hook(Backend.NOTIFICATION_RESPONSE, self.wire.on_notification)
        s.add_backend_hook(Backend.READY_FOR_QUERY, self._on_ready)
        asyncio.ensure_future(self._load()).add_done_callback(_ignore_result)  # read the catalog early

    def _hook_rows(self) -> None:
        self.session.add_backend_hook(Backend.DATA_ROW, self.wire.on_data_row, first=True)  # before result capture

    def current_schema(self) -> MaskedSchema | None:
        """The masked schema for the current catalog (the last known one while a reload is pending)."""
        catalog = self.engine.catalogs.current(self.session.database, self._connect)
        return self._schema_for(catalog) if catalog is not None else self._schema

    def _schema_for(self, catalog: CatalogSnapshot) -> MaskedSchema:
        schema = self._schema
        if schema is None or schema.catalog is not catalog:
            schema = self._schema = self.engine.schema_for(catalog, self.rules)
        return schema

    def _plan(self, result: StatementResult) -> Rewritten | None:
        """The plan the gate used for a result's statement (kept on it), else the cached one for its text."""
        request = result.statement
        if isinstance(request, Statement):
            used = request.recall(_plan_used)
            if used is not None:
                return used
        schema = self._schema
        if schema is None:
            return None
        # The text the gate rewrote: as the server reads it (the Statement the gate saw), else as sent.
        sql = (request.server_text() if isinstance(request, Statement) and request.reading_error is None
               else result.sql)
        return self.engine.cached(schema.catalog.version, self.rules_key, sql)

    async def _load(self) -> MaskedSchema:
        catalog = await self.engine.catalogs.get(self.session.database, self._connect)
        self._schema = self.engine.schema_for(catalog, self.rules)
        return self._schema

    async def _connect(self) -> Any:
        return await self.engine.connect(self.session.db_role, self.session.database)

    def _on_ready(self, body: memoryview) -> None:
        if self.ddl_pending and self.session.tracker.transaction_status == "I":
            self.ddl_pending = False
            self.engine.catalogs.invalidate(self.session.database)

    def _on_row_description(self, body: memoryview) -> None:
        """Note how many columns of a rewritten statement's result carry masked values.

        Those are the result columns named as a masked column of a relation the statement reads that
        the server computed (table OID 0: the mask expression); each of their values in each row is
        counted in ``pgproxy_masked_values_total`` once the statement completes (``annotate``).
        """
        tracker = self.session.tracker
        head = tracker.queue[0] if tracker.queue else None
        schema = self._schema
        if schema is None:
            return
        if head is not None and head.kind in (Kind.QUERY, Kind.EXECUTE) and head.result is not None:
            sql = head.result.sql
            rewritten = self._plan(head.result)
        else:  # a prepared statement's Describe: its executions will not describe their rows again
            described = self._statement_sql.get(tracker.last_described) if tracker.last_described is not None else None
            if described is None:
                return
            sql = described
            rewritten = self.engine.cached(schema.catalog.version, self.rules_key, sql)
        if rewritten is None or rewritten.sql is None or not rewritten.relations:
            return
        names = {name for qualified in rewritten.relations
                 for name in _masked_names(schema, qualified)}
        n = sum(1 for f in RowDescription.decode(body, tracker.server_codec).fields
                if f.table_oid == 0 and f.name in names)
        if len(self._masked_columns) > 1024:
            self._masked_columns.clear()
        self._masked_columns[sql] = n

    def annotate(self, event: dict[str, Any], result: StatementResult) -> None:
        """Add what masking did to a statement's audit event (never the rewritten text)."""
        masked_columns = self._masked_columns.get(result.sql, 0)
        rows = event.get("rows")
        if masked_columns and isinstance(rows, int) and rows > 0 and self._on_masked is not None:
            self._on_masked(masked_columns * rows)  # values the rewrite masked, as sent to the client
        rewritten = self._plan(result)
        if rewritten is None:
            return
        if rewritten.relations:
            event["masked_relations"] = list(rewritten.relations)
        if rewritten.refusal is not None:
            event["masking_refusal"] = rewritten.refusal

    # ----------------------------------------------------------------------------------------- gate

    def inspect(self, request: Statement) -> Verdict:
        if request.msg_type == _FUNCTION:
            return refusal("the fast-path function call is not available to masked identities")
        if request.msg_type == _EXECUTE and not request.described and may_return_rows(request.server_text()):
            return refusal("the rows of an Execute whose portal was never described cannot be checked: "
                           "send Describe (of the statement or the portal) before Execute")
        if request.msg_type not in (_QUERY, _PARSE):
            return None
        if request.msg_type == _PARSE:
            self.wire.forget(request.statement_name or "")
            if len(self._statement_sql) > 1024:
                self._statement_sql.clear()
            self._statement_sql[request.statement_name or ""] = request.sql
        try:
            if "ddl" in classify_statement(request).classes:
                self.ddl_pending = True
        except SqlSyntaxError as exc:  # what the proxy cannot read, it cannot prove safe
            return Refuse(unparsed_error(exc, "masking rules apply to this session"))
        catalog = self.engine.catalogs.current(self.session.database, self._connect)
        if catalog is None:
            return Hold(self._decide_later(request))  # no catalog yet, or DDL invalidated it
        return self._verdict(self._schema_for(catalog), request, time.monotonic())

    async def _decide_later(self, statement: Statement, since: float | None = None) -> Refuse | Rewrite | None:
        """The verdict once the catalog is read (``since``: read entirely after that moment)."""
        try:
            if since is None:
                schema = await self._load()
            else:
                catalog = await self.engine.catalogs.read_since(self.session.database, self._connect, since)
                schema = self._schema = self.engine.schema_for(catalog, self.rules)
        except (TimeoutError, OSError, asyncpg.PostgresError, ConfigError) as exc:
            log.error("session %s: cannot read the catalog for masking: %s", self.session.id, exc)
            return Refuse(errors.error(errors.CANNOT_CONNECT_NOW,
                                       "pgproxy masking: the database catalog could not be read; "
                                       "refusing statements of masked identities"))
        verdict = self._verdict(schema, statement, None)
        assert not isinstance(verdict, Hold)
        return verdict

    async def _check_views(self, statement: Statement, schema: MaskedSchema,
                           arrived: float) -> Refuse | Rewrite | None:
        """A statement naming a view: judged on the snapshot only if no view changed since it was read."""
        catalogs = self.engine.catalogs
        try:
            changed = await catalogs.views_changed(self.session.database, self._connect, schema.catalog)
        except (TimeoutError, OSError, asyncpg.PostgresError, ConfigError) as exc:
            log.error("session %s: cannot check the catalog for masking: %s", self.session.id, exc)
            return Refuse(errors.error(errors.CANNOT_CONNECT_NOW,
                                       "pgproxy masking: the database catalog could not be read; "
                                       "refusing statements of masked identities"))
        if changed:
            return await self._decide_later(statement, arrived)
        verdict = self._verdict(schema, statement, None)
        assert not isinstance(verdict, Hold)
        return verdict

    def _verdict(self, schema: MaskedSchema, statement: Statement, arrived: float | None) -> Verdict:
        """Refuse, rewrite or pass ``statement``; a name the snapshot does not know (an object created
        upstream since it was read) first makes the catalog be read again, once per statement (``arrived``)."""
        result = self.engine.rewrite(schema, self.rules_key, statement)
        statement.remember(_plan_used, result)  # for the row description and the audit event
        if arrived is not None:
            if result.unknown:
                return Hold(self._decide_later(statement, arrived))
            if result.reads_views:
                return Hold(self._check_views(statement, schema, arrived))
        if result.refusal is not None:
            return refusal(result.refusal)
        if result.sql is None:
            return None
        return Rewrite(result.sql)


def _plan_used(statement: Statement) -> Rewritten:
    """The key of the plan ``_verdict`` kept on a statement (never computed: ``Statement.remember`` sets it)."""
    raise LookupError("the masking plan of a statement is kept, not derived")


def _masked_names(schema: MaskedSchema, qualified: str) -> frozenset[str]:
    """The masked column names of the relation ``schema.table`` (empty if it is not masked)."""
    namespace, _, name = qualified.partition(".")
    relation = schema.by_qualified.get((namespace, name))
    return frozenset(relation.masks) if relation is not None else frozenset()


def _ignore_result(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("masking catalog preload failed: %s", future.exception())
