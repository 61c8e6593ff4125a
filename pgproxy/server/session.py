"""One client session: startup, token check, upstream login, then a framed byte pump.

The pump hands each frontend message to the seams that may inspect or refuse it (token expiry now;
policy and approvals plug in here) and each tracked backend message to the response tracker (audit,
refusal substitution) before forwarding; everything else is forwarded by slicing, untouched.
This module never logs or stores the caller's token or the upstream password.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..audit.capture import ResultCapture, audit_value, result_fields
from ..audit.sink import AuditUnavailable
from ..config import ConfigError, ListenerConfig, UpstreamConfig
from ..core.plugins import FrontendGate, Hold, Refuse, Rewrite, Verdict
from ..core.statement import SqlSyntaxError, Statement
from ..identity import Identity, TokenError
from ..metrics import ProxyMetrics
from ..policy.reading import is_lexer_neutral, server_reading
from ..protocol import errors
from ..protocol.codec import ProtocolViolation
from ..protocol.framing import HOLD, MessageHandler, MessageRelay
from ..protocol.messages import (
    AuthenticationCleartextPassword,
    AuthenticationOk,
    AuthenticationResponse,
    BackendKeyData,
    NegotiateProtocolVersion,
    Terminate,
    param_formats,
)
from ..protocol.startup import (
    PROTOCOL_3_0,
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    decode_startup,
)
from ..protocol.tracker import (
    ExchangeTracker,
    Kind,
    Pending,
    StatementResult,
    bind_fields_leniently,
)
from .gates import rewritten_message, substitute_for_refusal
from .link import Link, LinkClosed
from .upstream import UpstreamRefused, UpstreamUnavailable, connect_upstream

if TYPE_CHECKING:
    from ..masking.engine import SessionMasking
    from .listener import ProxyServer

log = logging.getLogger(__name__)

PASSWORD_MESSAGE_LIMIT = 64 * 1024
_STATEMENT_TYPES = frozenset(b"QPEF")
_GATED_TYPES = frozenset(b"QPBEF")
_TEXT_TYPES = (0x51, 0x50)  # Query, Parse: carry statement text the server lexes
_PARSE = 0x50
_UNDECIDED = object()
# Requests a client may have outstanding before we stop reading it until the server catches up.
MAX_OUTSTANDING_REQUESTS = 10_000
# Upstream bytes relayed per event-loop turn. A read brings up to 256 KiB (thousands of rows or CopyData
# messages); relayed in one go it would make every other connection on the loop (a cancel request among
# them) wait behind it. Slices of this size keep that wait around a millisecond.
UPSTREAM_SLICE_BYTES = 16 * 1024


class SessionRefused(Exception):
    """End the session with a FATAL ErrorResponse carrying this SQLSTATE and message."""

    def __init__(self, sqlstate: str, message: str, *, detail: str | None = None, hint: str | None = None,
                 raw: bytes | None = None) -> None:
        super().__init__(message)
        self.sqlstate, self.message, self.detail, self.hint = sqlstate, message, detail, hint
        self.raw = raw  # an upstream ErrorResponse to relay as it is, instead of building one


class _Ended(Exception):
    """Raised inside the pump after the session was terminated, to stop processing the chunk."""


def token_fingerprint(token: str) -> str:
    """A stable, non-reversible name for a token, for logs: never log the token itself."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()[:16]


class Session:
    """Everything about one client connection, from its first byte to its close."""

    def __init__(self, server: ProxyServer, client: Link, listener: ListenerConfig) -> None:
        self.server = server
        self.config = server.config
        self.client = client
        self.listener = listener
        self.id = secrets.token_hex(8)
        self.upstream: Link | None = None
        self.identity: Identity | None = None
        self.database = ""  # the upstream database and role this session logged in to (set at login)
        self.db_role = ""
        self.tracker = ExchangeTracker()
        self.started_at = time.time()
        self.statements = 0
        self.expired = False
        self.started = False  # sent its startup packet: counts against limits.max_connections
        self.auth_failed = False  # its token, or the role it asked for, was refused (for the metrics)
        self.last_activity = time.monotonic()  # last client bytes, or last answer that left it idle
        self._deadline = 0.0  # epoch seconds after which no statement may start
        self.end_reason = "client disconnected"
        self._ended = False
        self._upstream_fatal = False
        self._client_terminated = False
        self._secret: bytes | None = None
        self._cancel_key: tuple[int, int] | None = None
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.gates: list[FrontendGate] = list(server.gates)
        # Backend rewrite hooks per message type, run in order (masking before result capture).
        self._backend_hooks: dict[int, list[MessageHandler]] = {}
        self.masking: SessionMasking | None = None  # set at login when masking rules apply to the identity
        self._capturing = False  # result capture for the signed audit log (pgproxy.audit.capture)
        self._decided: Verdict | object = _UNDECIDED
        self._held_gate = 0  # index of the gate that held the current request
        self._hold_task: asyncio.Future[None] | None = None
        self._settings_waiter: asyncio.Future[None] | None = None  # a text waits for the lexer settings
        self._upstream_rest = b""  # a large upstream chunk relayed in slices (UPSTREAM_SLICE_BYTES) ...
        self._upstream_at = 0  # ... from this offset on

    # ------------------------------------------------------------------------------------------ driver

    async def run(self) -> None:
        try:
            try:
                async with asyncio.timeout(self.config.limits.startup_timeout_seconds):
                    startup = await self._negotiate()
                    if startup is None:
                        return
                    if self.server.over_connection_limit():
                        raise SessionRefused(errors.TOO_MANY_CONNECTIONS, "sorry, too many clients already")
                    self.started = True
                    identity = await self._authenticate(startup)
            except TimeoutError:
                raise SessionRefused(errors.CONNECTION_FAILURE, "canceling authentication due to timeout") from None
            self._check_identity_limit(identity)
            await self._connect_upstream(startup, identity)
            self._start_pumping()
            self.server.metrics.connection_outcome("accepted")
            await self._closed
        except SessionRefused as exc:
            self.server.metrics.connection_outcome("auth_failed" if self.auth_failed else "refused")
            self.end_reason = exc.message
            self.client.write(exc.raw or errors.fatal(exc.sqlstate, exc.message, detail=exc.detail, hint=exc.hint))
        except ProtocolViolation as exc:
            self.server.metrics.connection_outcome("refused")
            self.end_reason = f"protocol violation: {exc}"
            self.client.write(errors.fatal(exc.sqlstate, str(exc)))
        except LinkClosed:
            self.end_reason = "client disconnected during startup"
        except Exception:
            log.exception("session %s: internal error", self.id)
            self.end_reason = "internal error"
            self.client.write(errors.fatal(errors.INTERNAL_ERROR, "internal error in pgproxy; the session was closed"))
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        self._ended = True
        if self._hold_task is not None:
            self._hold_task.cancel()
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        if self._cancel_key is not None:
            self.server.cancels.unregister(*self._cancel_key)
        self.client.close()
        if self.upstream is not None:
            self.upstream.close()
        if self.identity is not None:
            self._emit_finished()
            self._audit({"event": "session_end", "reason": self.end_reason, "statements": self.statements,
                         "duration_s": round(time.time() - self.started_at, 3)})
        self._secret = None

    # ----------------------------------------------------------------------------------------- startup

    async def _negotiate(self) -> StartupMessage | None:
        """Handle SSLRequest/GSSENCRequest/CancelRequest until the real StartupMessage arrives."""
        limit = self.config.limits.max_startup_packet_bytes
        while True:
            packet = decode_startup(await self.client.read_startup_packet(limit))
            if isinstance(packet, SSLRequest):
                if self.client.tls:
                    raise ProtocolViolation("SSLRequest received on an encrypted connection")
                if self.client.buffer:  # bytes sent before our answer could be injected (CVE-2021-23214)
                    raise ProtocolViolation("received unencrypted data after SSL request")
                context = self.server.tls_context(self.listener)
                if context is None:
                    self.client.write(b"N")
                    continue
                self.client.write(b"S")
                await self.client.start_tls(context, server_side=True)
                continue
            if isinstance(packet, GSSENCRequest):
                self.client.write(b"N")
                continue
            if isinstance(packet, CancelRequest):
                self.end_reason = "cancel request"
                await self.server.cancels.cancel(packet, self.config.upstream.connect_timeout_seconds)
                return None
            return packet

    def _check_identity_limit(self, identity: Identity) -> None:
        limit = self.config.limits.max_connections_per_identity
        same = sum(1 for s in self.server.sessions if s.identity is not None and s.identity.subject == identity.subject)
        if same >= limit:
            raise self._refuse_login(identity, identity.subject, "too many connections for identity",
                                     errors.TOO_MANY_CONNECTIONS,
                                     f'too many connections for "{identity.subject}" (limit {limit})')

    def idle_check(self, now: float) -> None:
        """End the session if it sat idle (or idle in a transaction) longer than the configured limits."""
        if self._ended or self.upstream is None or not self.tracker.idle or self._front.held:
            return
        limits = self.config.limits
        idle_for = now - self.last_activity
        if self.tracker.transaction_status == "I":
            if limits.idle_timeout_seconds and idle_for > limits.idle_timeout_seconds:
                self.terminate(errors.IDLE_SESSION_TIMEOUT, "terminating connection due to idle-session timeout")
        elif limits.idle_in_transaction_timeout_seconds and idle_for > limits.idle_in_transaction_timeout_seconds:
            self.terminate(errors.IDLE_IN_TRANSACTION_TIMEOUT,
                           "terminating connection due to idle-in-transaction timeout")

    async def _authenticate(self, startup: StartupMessage) -> Identity:
        user = startup.params.get("user", "")
        if not self.client.tls and not self.listener.insecure_plaintext:
            raise SessionRefused(errors.INVALID_AUTHORIZATION,
                                 "pgproxy requires an encrypted connection: the token is sent as a password",
                                 hint="Connect with sslmode=require (or verify-full).")
        minor = startup.protocol_version & 0xFFFF
        if minor > 0 or startup.protocol_options:
            self.client.write(NegotiateProtocolVersion(PROTOCOL_3_0, tuple(startup.protocol_options)).encode())
        self.client.write(AuthenticationCleartextPassword().encode())
        msg_type, body = await self.client.read_message(PASSWORD_MESSAGE_LIMIT)
        if msg_type != ord("p"):
            raise ProtocolViolation(f"expected password response, got message type {chr(msg_type)!r}")
        token = AuthenticationResponse.decode(body).password()
        try:
            identity = await self.server.verifier.verify(token)
        except TokenError as exc:
            self.auth_failed = True
            self._audit({"event": "auth_failed", "user": user, "reason": exc.reason, "client": self.client.peer(),
                         "token": token_fingerprint(token)})
            raise SessionRefused(errors.INVALID_PASSWORD,
                                 f'password authentication failed for user "{user}": {exc.reason}') from None
        return identity

    def _refuse_login(self, identity: Identity, user: str, reason: str, sqlstate: str, message: str,
                      hint: str | None = None) -> SessionRefused:
        """Record a refused login of a valid token (e.g. a role it does not allow) and build the error."""
        self._audit({"event": "auth_failed", "user": user, "reason": reason, "client": self.client.peer(),
                     "identity": identity.audit_fields()})
        return SessionRefused(sqlstate, message, hint=hint)

    async def _connect_upstream(self, startup: StartupMessage, identity: Identity) -> None:
        user = startup.params.get("user", "")
        role = identity.role_for(user)
        if role is None:
            self.auth_failed = True
            raise self._refuse_login(identity, user, "role not allowed by token", errors.INVALID_AUTHORIZATION,
                                     f'token for "{identity.subject}" does not allow database role "{user}"',
                                     hint=f"Connect as one of: {', '.join(identity.db_roles)}")
        upstream_cfg = self.config.upstream
        credential = upstream_cfg.credential_for(role)
        if credential is None:
            raise self._refuse_login(identity, user, "no upstream credential for role", errors.INVALID_AUTHORIZATION,
                                     f'no upstream credential is configured for database role "{role}"')
        try:
            password = credential.password()
        except ConfigError as exc:
            log.error("session %s: %s", self.id, exc)
            raise self._refuse_login(identity, user, "upstream credential unavailable", errors.CANNOT_CONNECT_NOW,
                                     "the proxy's upstream credential is unavailable") from None
        params = dict(startup.params)
        params["user"] = role
        # PostgreSQL's default database is the user's name: here, the role we log in as.
        params["database"] = upstream_cfg.database or startup.params.get("database") or role
        if self.server.masking is not None:  # a role that can step around masking: refused before any statement
            refused = await self.server.masking.refuse_role(identity, role, params["database"])
            if refused is not None:
                self.auth_failed = True
                raise self._refuse_login(identity, user, refused[1], refused[0], f"pgproxy masking: {refused[1]}")
        self.identity = identity
        self.database, self.db_role = params["database"], role
        self._secret = password.encode() if password else None
        self._audit({"event": "session_start", "identity": identity.audit_fields(), "client": self.client.peer(),
                     "tls": self.client.tls, "database": params["database"], "upstream_role": role,
                     "application_name": startup.params.get("application_name")})
        try:
            self.upstream, notices = await connect_upstream(upstream_cfg, params, password)
        except UpstreamUnavailable as exc:
            self.server.metrics.upstream_error("connect_failed")
            log.warning("session %s: %s", self.id, exc)
            raise SessionRefused(errors.UNABLE_TO_CONNECT, exc.public) from None  # never the upstream address
        except UpstreamRefused as exc:
            if exc.error.sqlstate in (errors.INVALID_PASSWORD, errors.INVALID_AUTHORIZATION):
                self.server.metrics.upstream_error("login_refused")
                log.error("session %s: upstream refused the proxy's login as %r: %s", self.id, role, exc.error.message)
                raise SessionRefused(errors.INVALID_AUTHORIZATION,
                                     f'the proxy could not log in upstream as role "{role}"',
                                     hint="Ask the operator to check the upstream credential.") from None
            raise SessionRefused(exc.error.sqlstate or errors.CONNECTION_FAILURE, exc.error.message or "",
                                 raw=self._scrub(exc.error.encode())) from None
        if self.server.masking is not None:
            self.masking = self.server.masking.attach(self)
        self.client.write(AuthenticationOk().encode())
        for notice in notices:
            self.client.write(self._scrub(notice))
        # The session ends at the token's exp: a hard limit (the leeway only covers nbf and iat).
        self._deadline = identity.expires_at
        delay = max(0.0, self._deadline - time.time())
        self._expiry_timer = asyncio.get_running_loop().call_later(delay, self._on_token_expired)

    # -------------------------------------------------------------------------------------------- pump

    def _start_pumping(self) -> None:
        assert self.upstream is not None
        client, upstream = self.client, self.upstream
        max_size = self.config.limits.max_message_bytes
        if self.server.audit.capture_results:  # the signed audit log records results
            capture = ResultCapture(self.tracker, self.server.audit.max_result_rows)
            for msg_type, hook in ((0x54, capture.on_row_description), (0x44, capture.on_data_row),
                                   (0x4E, capture.on_notice), (0x64, capture.on_copy_data)):
                self._backend_hooks.setdefault(msg_type, []).append(hook)
            self._capturing = True
        self._front = MessageRelay(max_size, self._frontend_handlers())
        self._back = MessageRelay(max_size, self._backend_handlers())
        client.on_lost = self._on_client_lost
        upstream.on_lost = self._on_upstream_lost
        client.on_pause_writing, client.on_resume_writing = upstream.pause_reading, upstream.resume_reading
        upstream.on_pause_writing, upstream.on_resume_writing = client.pause_reading, client.resume_reading
        self.tracker.queue.append(Pending(Kind.SYNC))  # the ReadyForQuery that ends the startup
        if client.closed:
            self._on_client_lost()
            return
        upstream.start_pump(self._on_upstream_data)
        client.start_pump(self._on_client_data)

    def _on_client_data(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        self._pump_client(data)
        if self._front.held:
            self.client.pause_reading("hold")  # bytes after a held request wait in the relay, bounded
        elif len(self.tracker.queue) > MAX_OUTSTANDING_REQUESTS:
            self.client.pause_reading("backlog")  # a client that sends without reading: wait for answers

    def _pump_client(self, data: bytes | None) -> None:
        """Relay client bytes (None: resume after a hold) and forward the output upstream."""
        try:
            out = self._front.feed(data) if data is not None else self._front.resume()
        except ProtocolViolation as exc:
            self.terminate(exc.sqlstate, str(exc))
            return
        except _Ended:
            return
        except Exception:
            log.exception("session %s: internal error on client data", self.id)
            self.terminate(errors.INTERNAL_ERROR, "internal error in pgproxy; the session was closed")
            return
        if out and self.upstream is not None:
            self.upstream.write(out)

    def _frontend_handlers(self) -> dict[int, MessageHandler]:
        """Per message type: the tracker's accounting, behind the expiry check and gates for statements."""
        tracked = self.tracker.frontend_handlers
        handlers: dict[int, MessageHandler] = dict(tracked)
        checked = _STATEMENT_TYPES | (_GATED_TYPES if self.gates else frozenset())
        for msg_type in checked:
            handlers[msg_type] = functools.partial(self._on_statement_request, msg_type, tracked[msg_type])
        handlers[0x58] = self._on_terminate
        return handlers

    def _on_statement_request(self, msg_type: int, track: Callable[[memoryview], None],
                              body: memoryview) -> bytes | None:
        if self._ended:
            raise _Ended()
        if time.time() >= self._deadline:
            self._expire()
            raise _Ended()
        self._check_audit()
        verdict: Verdict = None
        statement: Statement | None = None
        first_gate = 0
        if self._decided is not _UNDECIDED:  # the held request, now decided: later gates still judge it
            verdict, self._decided = self._decided, _UNDECIDED  # type: ignore[assignment]
            first_gate = self._held_gate + 1
        if verdict is None and first_gate < len(self.gates):
            verdict, statement = self._judge(msg_type, body, first_gate)
            if isinstance(verdict, Hold):
                self._hold(verdict)
                return HOLD
        if statement is not None:  # read once: the tracker and the audit event use the gates' Statement
            self.tracker.track_statement(msg_type, body, statement)
        else:
            track(body)
        if self.gates:
            self._follow_settings(msg_type, body)
        if verdict is None:
            return None
        if isinstance(verdict, Rewrite):
            return rewritten_message(msg_type, body, verdict.sql, self.tracker.codec or "utf-8")
        pending = self.tracker.last_request
        if isinstance(verdict, Refuse) and pending is not None:
            substitute, expected = substitute_for_refusal(msg_type, body)
            pending.refusal, pending.refusal_expected_sqlstate = verdict.error, expected
            return substitute
        return None

    def _request(self, msg_type: int, body: memoryview) -> Statement:
        """The request as gates see it, with its text as the server will read it."""
        tracker = self.tracker
        sql, statement_name, bind_body = tracker.peek(msg_type, body)
        if msg_type in _TEXT_TYPES:
            try:
                reading = server_reading(sql, standard_conforming_strings=tracker.standard_conforming_strings)
            except SqlSyntaxError as exc:
                return Statement(msg_type, sql, statement_name, bind_body, reading_error=exc)
            return Statement(msg_type, sql, statement_name, bind_body, reading if reading != sql else None)
        prepared = tracker.readings.get(statement_name or "") if tracker.readings else None
        described = msg_type != 0x45 or tracker.portal_described(body)
        return Statement(msg_type, sql, statement_name, bind_body, prepared, described=described)

    def _judge(self, msg_type: int, body: memoryview, first_gate: int) -> tuple[Verdict, Statement | None]:
        """The first verdict of the gates from ``first_gate`` on (remembering which gate gave it), and the
        Statement they judged."""
        if (msg_type in _TEXT_TYPES and not self.tracker.settings_known
                and not is_lexer_neutral(_statement_bytes(msg_type, body))):
            # An earlier statement may have changed a setting the server reads this text with.
            if self.tracker.settings_will_be_known:  # wait for the server's report
                self._held_gate = -1  # then every gate judges it
                return Hold(self._settled()), None
            return Refuse(errors.error(
                errors.INSUFFICIENT_PRIVILEGE,
                "pgproxy cannot read this statement as the server will: an earlier statement in this pipeline "
                "may have changed standard_conforming_strings or client_encoding",
                hint="Send a Sync (end the pipeline) before statements with backslashes or non-ASCII text.")), None
        statement = self._request(msg_type, body)
        for index in range(first_gate, len(self.gates)):
            verdict = self.gates[index].inspect(self, statement)
            if verdict is not None:
                self._held_gate = index
                return verdict, statement
        return None, statement

    def _follow_settings(self, msg_type: int, body: memoryview) -> None:
        """Note requests that run statements (a later text may need the settings they change); prepared
        statements keep the reading of their Parse."""
        if self.tracker.last_request is None:  # the server will not run it (skipping to Sync, or in COPY)
            return
        if msg_type == _PARSE:
            self._remember_reading(body)
        else:
            self.tracker.note_run()

    def _remember_reading(self, body: memoryview) -> None:
        """A prepared statement keeps the reading of its Parse (the settings may change before Bind)."""
        tracker = self.tracker
        if tracker.standard_conforming_strings and not tracker.readings:
            return
        sql, name, _ = tracker.peek(_PARSE, body)
        try:
            reading = server_reading(sql, standard_conforming_strings=tracker.standard_conforming_strings)
        except SqlSyntaxError:
            reading = sql  # the server refuses it too: nothing will be bound to it
        if reading == sql:
            tracker.readings.pop(name or "", None)
        else:
            tracker.readings[name or ""] = reading

    async def _settled(self) -> None:
        """Resolves once the server reported the settings that apply to the next text."""
        if not self.tracker.settings_known:
            self._settings_waiter = asyncio.get_running_loop().create_future()
            await self._settings_waiter

    def _hold(self, hold: Hold) -> None:
        """Stop reading the client until the held request is decided (responses keep flowing)."""
        self.client.pause_reading("hold")
        if hold.notice is not None:
            self.client.write(hold.notice.encode())
        self._hold_task = asyncio.ensure_future(self._await_decision(hold))

    async def _await_decision(self, hold: Hold) -> None:
        try:
            decision = await hold.decision
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("session %s: held request failed: %s", self.id, exc)
            decision = Refuse(errors.error(errors.INSUFFICIENT_PRIVILEGE, f"request not approved: {exc}"))
        if self._ended or self.client.closed:
            return
        self._decided = decision
        self._pump_client(None)
        if not self._front.held:
            self.client.resume_reading("hold")

    def _on_terminate(self, body: memoryview) -> None:
        self.end_reason = "client terminated"  # forwarded: the upstream closes, and so do we
        self._client_terminated = True  # that close is the client's doing, not an upstream failure

    # ------------------------------------------------------------ what gates and hooks see (SessionContext)

    @property
    def upstream_config(self) -> UpstreamConfig:
        return self.config.upstream

    @property
    def metrics(self) -> ProxyMetrics:
        return self.server.metrics

    def emit_audit(self, event: dict[str, Any]) -> None:
        """Write ``event`` to the audit log as it is (raises AuditUnavailable; ``_audit`` fails closed)."""
        self.server.audit.emit(event)

    def add_backend_hook(self, msg_type: int, hook: MessageHandler, *, first: bool = False) -> None:
        """Let ``hook`` rewrite every backend message of ``msg_type`` (return None to keep it).

        Hooks run in the order added (``first``: before the others), each on the message as the previous
        ones left it. Takes effect from the next message, also within the chunk being relayed.
        """
        hooks = self._backend_hooks.setdefault(msg_type, [])
        hooks.insert(0, hook) if first else hooks.append(hook)
        if hasattr(self, "_back"):
            handlers = self._back.handlers  # the relay holds this dict while it relays a chunk: update it
            handlers.clear()
            handlers.update(self._backend_handlers())

    def _on_upstream_data(self, data: bytes) -> None:
        """Relay a chunk from the server: a large one in slices, one per loop turn, reading paused meanwhile."""
        if self._upstream_at < len(self._upstream_rest):  # still relaying an earlier chunk: keep the order
            self._upstream_rest = self._upstream_rest[self._upstream_at:] + data
            self._upstream_at = 0
        elif len(data) <= UPSTREAM_SLICE_BYTES:
            self._relay_upstream(data)
        else:
            self._upstream_rest, self._upstream_at = data, 0
            assert self.upstream is not None
            self.upstream.pause_reading("slice")
            self._relay_upstream_slice()

    def _relay_upstream_slice(self) -> None:
        start = self._upstream_at
        rest = self._upstream_rest
        if start >= len(rest):  # relayed already (the upstream closed) or dropped (the session ended)
            return
        self._upstream_at = end = start + UPSTREAM_SLICE_BYTES
        self._relay_upstream(rest[start:end])
        if self._ended:
            self._upstream_rest = b""
        elif end < len(rest):
            asyncio.get_running_loop().call_soon(self._relay_upstream_slice)
        else:
            self._upstream_rest = b""
            if self.upstream is not None:
                self.upstream.resume_reading("slice")

    def _relay_upstream(self, data: bytes) -> None:
        try:
            out = self._back.feed(data)
            if self.tracker.finished:  # recorded before the client sees the answers (fsync: always holds)
                self._emit_finished()
            if out and not self._ended:
                self.client.write(out)
        except ProtocolViolation as exc:
            log.error("session %s: invalid message from upstream: %s", self.id, exc)
            if exc.sqlstate == errors.PROGRAM_LIMIT_EXCEEDED:  # a legitimate but oversized result
                self.terminate(errors.PROGRAM_LIMIT_EXCEEDED,
                               f"a message from the upstream database is over limits.max_message_bytes: {exc}")
            else:
                self.terminate(errors.PROTOCOL_VIOLATION, "the upstream database sent an invalid message")
            return
        except Exception:
            log.exception("session %s: internal error on upstream data", self.id)
            self.terminate(errors.INTERNAL_ERROR, "internal error in pgproxy; the session was closed")
            return
        queue = self.tracker.queue
        if len(queue) < MAX_OUTSTANDING_REQUESTS // 2:
            self.client.resume_reading("backlog")
        waiter = self._settings_waiter
        if waiter is not None and not waiter.done() and self.tracker.settings_known:
            waiter.set_result(None)
        if not queue:  # idle
            self.last_activity = time.monotonic()
            if self.expired and not self._ended:
                self._expire()

    def _backend_handlers(self) -> dict[int, MessageHandler]:
        """Per message type: tracking, FATAL detection, credential scrubbing, cancel keys, then hooks."""
        handlers: dict[int, MessageHandler] = dict(self.tracker.backend_handlers)
        handlers[0x45] = self._on_error_response
        for msg_type in (0x53, 0x4E, 0x41):  # ParameterStatus, NoticeResponse, NotificationResponse
            scrub = functools.partial(self._scrub_body, msg_type)
            tracked = handlers.get(msg_type)
            handlers[msg_type] = scrub if tracked is None else functools.partial(_chain, tracked, scrub)
        handlers[0x4B] = self._on_backend_key_data
        for msg_type, hooks in self._backend_hooks.items():
            for hook in hooks:
                first = handlers.get(msg_type)
                handlers[msg_type] = hook if first is None else functools.partial(_chain, first, hook)
        return handlers

    def _on_error_response(self, body: memoryview) -> bytes | None:
        replacement = self.tracker.backend_handlers[0x45](body)
        raw = bytes(body)  # errors are rare: copying is affordable
        if b"SFATAL\x00" in raw or b"SPANIC\x00" in raw:
            self._upstream_fatal = True
        return replacement if replacement is not None else self._scrub_body(0x45, body)

    def _scrub_body(self, msg_type: int, body: memoryview) -> bytes | None:
        """The message without the upstream password, or None if it does not contain it."""
        raw = bytes(body)
        if not self._secret or self._secret not in raw:
            return None
        return self._scrub(bytes([msg_type]) + (len(raw) + 4).to_bytes(4, "big") + raw)

    def _on_backend_key_data(self, body: memoryview) -> bytes:
        """Keep the upstream pid, hand the client a secret key of our own."""
        key = BackendKeyData.decode(body)
        cfg = self.config.upstream
        proxy_secret = self.server.cancels.register(key.process_id, key.secret_key, cfg.host, cfg.port)
        self._cancel_key = (key.process_id, proxy_secret)
        return BackendKeyData(key.process_id, proxy_secret).encode()

    def _scrub(self, message: bytes) -> bytes:
        """Remove the upstream password from a message that is about to reach the client."""
        if not self._secret or self._secret not in message[5:]:
            return message
        body = message[5:].replace(self._secret, b"********")
        return message[:1] + (len(body) + 4).to_bytes(4, "big") + body

    # ------------------------------------------------------------------------------------- termination

    def _on_token_expired(self) -> None:
        self.expired = True
        self._deadline = 0.0
        if self.tracker.idle:
            self._expire()

    def _expire(self) -> None:
        self.terminate(errors.INVALID_AUTHORIZATION, "terminating connection because the session token expired",
                       hint="Reconnect with a fresh token.")

    def terminate(self, sqlstate: str, message: str, *, hint: str | None = None) -> None:
        """End the session now with a FATAL to the client; safe to call more than once."""
        if self._ended:
            return
        self._ended = True
        self.end_reason = message
        self.client.write(errors.fatal(sqlstate, message, hint=hint))
        self.client.close()
        if self.upstream is not None:
            self.upstream.write(Terminate().encode())
            self.upstream.close()
        if not self._closed.done():
            self._closed.set_result(None)

    def _on_client_lost(self) -> None:
        if self.upstream is not None and not self.upstream.closed:
            self.upstream.write(Terminate().encode())
            self.upstream.close()
        if not self._closed.done():
            self._closed.set_result(None)

    def _on_upstream_lost(self) -> None:
        if self._upstream_at < len(self._upstream_rest) and not self._ended:  # what the server sent first
            rest, self._upstream_rest = self._upstream_rest[self._upstream_at:], b""
            self._relay_upstream(rest)
        if self._client_terminated:
            pass  # the server closed because the client said Terminate: a clean end
        elif self._upstream_fatal and not self._ended:
            self.server.metrics.upstream_error("lost")
            self.end_reason = "upstream ended the session with FATAL"
        elif not self._ended and not self._upstream_fatal and not self.client.closed:
            self.server.metrics.upstream_error("lost")
            self.end_reason = "upstream closed the connection"
            self.client.write(errors.fatal(errors.CONNECTION_FAILURE,
                                           "the upstream database closed the connection unexpectedly"))
        self.client.close()
        if not self._closed.done():
            self._closed.set_result(None)

    # ------------------------------------------------------------------------------------------- audit

    def _emit_finished(self) -> None:
        for result in self.tracker.drain():
            self.statements += 1
            self.server.metrics.statement_seconds.observe(result.duration_ms / 1000.0)
            self._audit(self._statement_event(result))

    def _statement_event(self, r: StatementResult) -> dict[str, Any]:
        event: dict[str, Any] = {"event": "statement", "protocol": r.protocol, "sql": r.sql,
                                 "started_at": r.started_at, "duration_ms": r.duration_ms,
                                 "tags": r.tags, "rows": r.rows}
        if self.masking is not None:
            self.masking.annotate(event, r)
        bind = bind_fields_leniently(r.bind_body) if r.bind_body is not None else None
        if bind is not None and bind[3]:
            params = bind[3]
            codec = self.tracker.server_codec
            event["params"] = [audit_value(value, fmt, codec)
                               for value, fmt in zip(params, param_formats(bind[2], len(params)), strict=True)]
        if r.statement_name:
            event["statement_name"] = r.statement_name
        if r.error is not None:
            event["error"] = {"severity": r.error.severity, "sqlstate": r.error.sqlstate, "message": r.error.message}
        if r.refused:
            event["refused"] = True
        if self._capturing:
            event.update(result_fields(r, bind, encoding=self.tracker.server_codec))
        return event

    def _check_audit(self) -> None:
        """Refuse a statement before it reaches the server while the audit log cannot record it."""
        try:
            self.server.audit.check()
        except AuditUnavailable as exc:
            log.error("session %s: %s", self.id, exc)
            self.terminate(errors.CANNOT_CONNECT_NOW, "the audit log is unavailable; the statement was NOT sent to "
                                                      "the database (safe to retry once the log is back)")
            raise _Ended() from None

    def _audit(self, event: dict[str, Any]) -> None:
        event["session"] = self.id  # the emitter stamps ts
        try:
            self.server.audit.emit(event)
        except AuditUnavailable as exc:
            log.error("session %s: %s", self.id, exc)
            if event["event"] == "session_end":
                return
            if self.upstream is None:
                raise SessionRefused(errors.CANNOT_CONNECT_NOW, "the audit log is unavailable") from None
            if not self._ended:
                ran = event["event"] == "statement" and not event.get("refused")
                self.terminate(errors.CANNOT_CONNECT_NOW, "the audit log is unavailable; refusing to continue"
                               + ("; the last statement DID run on the database (its effects stand: check them "
                                  "before retrying), but could not be recorded" if ran else ""))


def _statement_bytes(msg_type: int, body: memoryview) -> bytes:
    """The statement text's bytes in a Query or Parse body, as sent (no decoding)."""
    if msg_type == 0x51:
        return bytes(body)
    raw = bytes(body)
    start = raw.find(0) + 1
    end = raw.find(0, start)
    return raw[start:end] if start and end >= 0 else raw  # malformed: the tracker refuses it next


def _chain(first: MessageHandler, second: MessageHandler, body: memoryview) -> bytes | None:
    """Run ``first`` (e.g. tracking) and then ``second`` (a hook) on the message ``first`` left."""
    replaced = first(body)
    if replaced is None:
        return second(body)
    again = second(memoryview(replaced)[5:])
    return replaced if again is None else again
