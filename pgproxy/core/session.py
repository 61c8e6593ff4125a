"""One client session as a state machine: bytes and events in, actions out, no I/O of its own.

``SessionCore`` holds everything a session decides: startup negotiation, the token login, the upstream
login, the framed byte pump (``MessageRelay``) with its gates, holds and backend hooks, credential
scrubbing, cancel keys, token expiry, idle limits, audit events and termination. It never touches a
socket, an event loop or the system clock (a ``Clock`` is handed in), so it runs the same under the
asyncio driver (``pgproxy.server.session``) and in a test that feeds it bytes.

Startup is a conversation, written as a generator (``SessionCore.run``): it yields what it needs done
or answered (read a packet, send bytes, upgrade to TLS, verify a token, log in upstream) and the driver
resumes it with the result. The established session is a pump: ``client_data`` and ``upstream_data``
return the bytes to forward (the relay's output, handed through untouched) and leave the rarer effects
(a FATAL, a hold, a timer, the end) in ``actions``, which the driver performs in order afterwards.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import logging
import secrets
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..config import ConfigError, ListenerConfig, UpstreamConfig
from ..metrics import ProxyMetrics
from ..protocol import errors
from ..protocol.codec import ProtocolViolation, frame
from ..protocol.framing import HOLD, MessageHandler, MessageRelay
from ..protocol.messages import (
    AuthenticationCleartextPassword,
    AuthenticationOk,
    AuthenticationResponse,
    BackendKeyData,
    Bind,
    ErrorResponse,
    NegotiateProtocolVersion,
    Parse,
    Terminate,
    param_formats,
    parameter_status_fields,
)
from ..protocol.startup import (
    PROTOCOL_3_0,
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    decode_startup,
)
from ..protocol.substitutes import rewritten_message, substitute_for_refusal
from ..protocol.tracker import (
    ExchangeTracker,
    Kind,
    Pending,
    StatementResult,
)
from ..protocol.types import Backend, Frontend
from .capture import ResultCapture, add_result_fields, audit_values
from .plugins import AuditUnavailable, FrontendGate, Hold, Refuse, Rewrite, Verdict
from .reading import is_lexer_neutral, server_reading
from .statement import SqlSyntaxError, Statement

if TYPE_CHECKING:
    import ssl

    from ..identity import Identity
    from ..masking.engine import SessionMasking
    from ..server.listener import ProxyServer

# Session log lines keep the logger name operators filter on (they were written by the driver before).
log = logging.getLogger("pgproxy.server.session")

PASSWORD_MESSAGE_LIMIT = 64 * 1024
_QUERY, _PARSE, _BIND, _EXECUTE = Frontend.QUERY, Frontend.PARSE, Frontend.BIND, Frontend.EXECUTE
_STATEMENT_TYPES = frozenset((_QUERY, _PARSE, _EXECUTE, Frontend.FUNCTION_CALL))
_GATED_TYPES = _STATEMENT_TYPES | {_BIND}
_TEXT_TYPES = (_QUERY, _PARSE)  # carry statement text the server lexes
_ERROR = Backend.ERROR_RESPONSE
_UNDECIDED = object()
TOKEN_EXPIRY = "token expiry"  # the one timer a session sets


class State(enum.Enum):
    """Where a session is; ``SessionCore`` refuses events and transitions that do not fit it."""

    NEGOTIATING = "negotiating"  # SSLRequest, GSSENCRequest, CancelRequest until the StartupMessage
    AUTHENTICATING = "authenticating"  # asks for the token as a password and has it verified
    CONNECTING = "connecting"  # checks the role, logs in upstream with the proxy's credential
    PUMPING = "pumping"  # relays messages both ways through the gates and hooks
    ENDED = "ended"


# Enum attribute lookups cost ~0.2 us each in Python 3.11: the per-message paths compare with these.
_PUMPING, _ENDED = State.PUMPING, State.ENDED

_TRANSITIONS: dict[State, frozenset[State]] = {
    State.NEGOTIATING: frozenset({State.AUTHENTICATING, State.ENDED}),
    State.AUTHENTICATING: frozenset({State.CONNECTING, State.ENDED}),
    State.CONNECTING: frozenset({State.PUMPING, State.ENDED}),
    State.PUMPING: frozenset({State.ENDED}),
    State.ENDED: frozenset(),
}


class IllegalEvent(Exception):
    """An event or transition that the session's state does not allow (a bug in the driver)."""


class Clock(Protocol):
    """Wall and monotonic time (the ``time`` module, or a fake one in tests)."""

    def time(self) -> float: ...

    def monotonic(self) -> float: ...


# ----------------------------------------------------------------------------------------------- actions
# What the driver must do. Startup actions are yielded by ``SessionCore.run`` and answered by sending the
# result back; pump actions are appended to ``SessionCore.actions`` and need no answer.


@dataclass(frozen=True, slots=True)
class ReadPacket:
    """Read an untyped startup packet; answer ``(body after the length, more bytes already buffered)``."""

    limit: int


@dataclass(frozen=True, slots=True)
class ReadMessage:
    """Read one typed client message; answer ``(type byte, body)``."""

    limit: int


@dataclass(frozen=True, slots=True)
class SendClient:
    data: bytes


@dataclass(frozen=True, slots=True)
class SendUpstream:
    data: bytes


@dataclass(frozen=True, slots=True)
class StartTls:
    """Upgrade the client connection to TLS (server side) with ``context``."""

    context: ssl.SSLContext


@dataclass(frozen=True, slots=True)
class ForwardCancel:
    """Forward this CancelRequest to the backend it names (if the key is one we issued)."""

    request: CancelRequest
    timeout: float


@dataclass(frozen=True, slots=True)
class VerifyToken:
    """Verify the caller's token; answer ``TokenVerified`` or ``TokenRefused``."""

    token: str


@dataclass(frozen=True, slots=True)
class CheckMaskedRole:
    """Ask masking whether ``identity`` may log in as ``role``; answer None or (SQLSTATE, reason)."""

    identity: Identity
    role: str
    database: str


@dataclass(frozen=True, slots=True)
class ConnectUpstream:
    """Log in upstream; answer ``UpstreamConnected``, ``UpstreamUnreachable`` or ``UpstreamLoginRefused``."""

    params: dict[str, str]
    password: str | None


@dataclass(frozen=True, slots=True)
class ReuseUpstream:
    """Take an idle pooled upstream connection logged in with exactly this startup; answer True if one was taken
    (asked only with ``upstream.pool.enabled``; otherwise, and on False, ``ConnectUpstream`` follows)."""

    params: dict[str, str]
    password: str | None


@dataclass(frozen=True, slots=True)
class ReleaseUpstream:
    """Hand the idle upstream connection to the pool (reset, then kept for the next client) instead of closing
    it; ``parameters`` are the ParameterStatus values the server reported last, ``process_id`` and
    ``secret_key`` its BackendKeyData."""

    parameters: dict[bytes, bytes]
    process_id: int
    secret_key: int


@dataclass(frozen=True, slots=True)
class SetTimer:
    """Call ``SessionCore.timer_fired(name)`` after ``delay`` seconds."""

    name: str
    delay: float


@dataclass(frozen=True, slots=True)
class HoldClient:
    """Stop reading the client; when ``hold`` is given, await its decision and pass it to ``decide``."""

    hold: Hold | None


@dataclass(frozen=True, slots=True)
class ReleaseClient:
    """Read the client again (its held request was decided)."""


@dataclass(frozen=True, slots=True)
class End:
    """Close both connections: the session is over (anything to say was sent before)."""


Action = (ReadPacket | ReadMessage | SendClient | SendUpstream | StartTls | ForwardCancel | VerifyToken
          | CheckMaskedRole | ReuseUpstream | ConnectUpstream | ReleaseUpstream | SetTimer | HoldClient
          | ReleaseClient | End)


# ------------------------------------------------------------------------------------------------ events
# Answers to startup actions; failures of the link itself are thrown into the generator.


@dataclass(frozen=True, slots=True)
class TokenVerified:
    identity: Identity


@dataclass(frozen=True, slots=True)
class TokenRefused:
    reason: str


@dataclass(frozen=True, slots=True)
class UpstreamConnected:
    notices: list[bytes]  # NoticeResponses received during the login, to relay


@dataclass(frozen=True, slots=True)
class UpstreamUnreachable:
    public: str  # what the client is told (never the upstream address)
    detail: str  # for the proxy's own log


@dataclass(frozen=True, slots=True)
class UpstreamLoginRefused:
    error: ErrorResponse


class ClientGone(Exception):
    """Thrown into the startup generator: the client closed the connection (or TLS failed)."""


class StartupTimeout(Exception):
    """Thrown into the startup generator: negotiation and login took longer than allowed."""


StartupGen = Generator[Action, Any, bool]


class SessionRefused(Exception):
    """End the session with a FATAL ErrorResponse carrying this SQLSTATE and message."""

    def __init__(self, sqlstate: str, message: str, *, detail: str | None = None, hint: str | None = None,
                 raw: bytes | None = None) -> None:
        super().__init__(message)
        self.sqlstate, self.message, self.detail, self.hint = sqlstate, message, detail, hint
        self.raw = raw  # an upstream ErrorResponse to relay as it is, instead of building one


class _Ended(Exception):
    """Raised inside the pump after the session was terminated, to stop processing the chunk."""


class _SettingsReported:
    """The decision of a text held until the server reports its lexer settings: the core itself
    resumes it (``upstream_data``), so the driver never awaits it."""

    def __await__(self) -> Generator[Any, None, None]:
        return None
        yield  # a generator function: an awaitable resolving to None at once


def token_fingerprint(token: str) -> str:
    """A stable, non-reversible name for a token, for logs: never log the token itself."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()[:16]


class SessionCore:
    """Everything one client session decides, from its first packet to its end; no I/O."""

    def __init__(self, server: ProxyServer, listener: ListenerConfig, clock: Clock, *, peer: str = "unknown",
                 session_id: str | None = None) -> None:
        self.server = server
        self.config = server.config
        self.listener = listener
        self.clock = clock
        self.peer = peer  # the client's address, for audit events
        self.id = session_id or secrets.token_hex(8)
        self.state = State.NEGOTIATING
        self.actions: list[Action] = []  # pump-phase effects for the driver, in order
        self.tls = False  # the client connection was upgraded to TLS
        self.upstream_connected = False
        self.identity: Identity | None = None
        self.database = ""  # the upstream database and role this session logged in to (set at login)
        self.db_role = ""
        self.tracker = ExchangeTracker(on_desync=server.metrics.protocol_desync)
        self.started_at = clock.time()
        self.statements = 0
        self.expired = False
        self.started = False  # sent its startup packet: counts against limits.max_connections
        self.auth_failed = False  # its token, or the role it asked for, was refused (for the metrics)
        self.last_activity = clock.monotonic()  # last client bytes, or last answer that left it idle
        self._deadline = 0.0  # epoch seconds after which no statement may start
        self.end_reason = "client disconnected"
        self._upstream_fatal = False
        self._client_terminated = False
        self._upstream_lost = False
        self._secret: bytes | None = None
        self._cancel_key: tuple[int, int] | None = None
        self._pooling = self.config.upstream.pool.enabled  # the upstream may go back to the pool at the end
        self._upstream_key: tuple[int, int] | None = None  # the server's BackendKeyData (pid, secret)
        self._parameters: dict[bytes, bytes] = {}  # ParameterStatus as the server last reported (kept when pooling)
        self.gates: list[FrontendGate] = []  # taken at login, with the masking attached then
        # Backend rewrite hooks per message type, run in order (masking before result capture).
        self._backend_hooks: dict[int, list[MessageHandler]] = {}
        self.masking: SessionMasking | None = None  # set at login when masking rules apply to the identity
        self._capturing = False  # result capture for the signed audit log (pgproxy.audit.capture)
        self._decided: Verdict | object = _UNDECIDED
        self._held_gate = 0  # index of the gate that held the current request
        self._awaiting_settings = False  # a held text waits for the server's lexer settings
        max_size = self.config.limits.max_message_bytes
        self._front = MessageRelay(max_size, {})  # handlers installed when the pump starts
        self._back = MessageRelay(max_size, {})

    # ------------------------------------------------------------------------------------------ state

    def _enter(self, state: State) -> None:
        if state not in _TRANSITIONS[self.state]:
            raise IllegalEvent(f"session {self.id}: cannot go from {self.state.name} to {state.name}")
        self.state = state

    def _expect_pumping(self, event: str) -> bool:
        """True when pumping; False once ended (late events are dropped); an error before the pump."""
        if self.state is _PUMPING:
            return True
        if self.state is _ENDED:
            return False
        raise IllegalEvent(f"session {self.id}: {event} while {self.state.name}")

    @property
    def ended(self) -> bool:
        return self.state is _ENDED

    @property
    def held(self) -> bool:
        """The client's stream is stopped at a request awaiting a decision."""
        return self._front.held

    def take_actions(self) -> list[Action]:
        """The pending pump-phase actions, oldest first (the list is emptied)."""
        actions, self.actions = self.actions, []
        return actions

    # ----------------------------------------------------------------------------------------- startup

    def run(self) -> StartupGen:
        """The startup conversation; returns True once the session pumps, False when it ended instead."""
        try:
            try:
                startup = yield from self._negotiate()
                if startup is None:
                    self._enter(_ENDED)
                    return False
                self._enter(State.AUTHENTICATING)
                if self.server.over_connection_limit():
                    raise SessionRefused(errors.TOO_MANY_CONNECTIONS, "sorry, too many clients already")
                self.started = True
                identity = yield from self._authenticate(startup)
            except StartupTimeout:
                raise SessionRefused(errors.CONNECTION_FAILURE, "canceling authentication due to timeout") from None
            self._enter(State.CONNECTING)
            self._check_identity_limit(identity)
            yield from self._connect_upstream(startup, identity)
            self._start_pumping()
            self.server.metrics.connection_outcome("accepted")
            return True
        except SessionRefused as exc:
            self.server.metrics.connection_outcome("auth_failed" if self.auth_failed else "refused")
            self.end_reason = exc.message
            yield SendClient(exc.raw or errors.fatal(exc.sqlstate, exc.message, detail=exc.detail, hint=exc.hint))
        except ProtocolViolation as exc:
            self.server.metrics.connection_outcome("refused")
            self.end_reason = f"protocol violation: {exc}"
            yield SendClient(errors.fatal(exc.sqlstate, str(exc)))
        except ClientGone:
            self.end_reason = "client disconnected during startup"
        except Exception:
            log.exception("session %s: internal error", self.id)
            self.end_reason = "internal error"
            yield SendClient(errors.fatal(errors.INTERNAL_ERROR, "internal error in pgproxy; the session was closed"))
        if self.state is not _ENDED:
            self._enter(_ENDED)
        return False

    def _negotiate(self) -> Generator[Action, Any, StartupMessage | None]:
        """Handle SSLRequest/GSSENCRequest/CancelRequest until the real StartupMessage arrives."""
        limit = self.config.limits.max_startup_packet_bytes
        while True:
            body, buffered = yield ReadPacket(limit)
            packet = decode_startup(body)
            if isinstance(packet, SSLRequest):
                if self.tls:
                    raise ProtocolViolation("SSLRequest received on an encrypted connection")
                if buffered:  # bytes sent before our answer could be injected (CVE-2021-23214)
                    raise ProtocolViolation("received unencrypted data after SSL request")
                context = self.server.tls_context(self.listener)
                if context is None:
                    yield SendClient(b"N")
                    continue
                yield SendClient(b"S")
                yield StartTls(context)
                self.tls = True
                continue
            if isinstance(packet, GSSENCRequest):
                yield SendClient(b"N")
                continue
            if isinstance(packet, CancelRequest):
                self.end_reason = "cancel request"
                yield ForwardCancel(packet, self.config.upstream.connect_timeout_seconds)
                return None
            return packet

    def _check_identity_limit(self, identity: Identity) -> None:
        limit = self.config.limits.max_connections_per_identity
        same = sum(1 for s in self.server.sessions if s.identity is not None and s.identity.subject == identity.subject)
        if same >= limit:
            raise self._refuse_login(identity, identity.subject, "too many connections for identity",
                                     errors.TOO_MANY_CONNECTIONS,
                                     f'too many connections for "{identity.subject}" (limit {limit})')

    def _authenticate(self, startup: StartupMessage) -> Generator[Action, Any, Identity]:
        user = startup.params.get("user", "")
        if not self.tls and not self.listener.insecure_plaintext:
            raise SessionRefused(errors.INVALID_AUTHORIZATION,
                                 "pgproxy requires an encrypted connection: the token is sent as a password",
                                 hint="Connect with sslmode=require (or verify-full).")
        minor = startup.protocol_version & 0xFFFF
        if minor > 0 or startup.protocol_options:
            yield SendClient(NegotiateProtocolVersion(PROTOCOL_3_0, tuple(startup.protocol_options)).encode())
        yield SendClient(AuthenticationCleartextPassword().encode())
        msg_type, body = yield ReadMessage(PASSWORD_MESSAGE_LIMIT)
        if msg_type != Frontend.PASSWORD:
            raise ProtocolViolation(f"expected password response, got message type {chr(msg_type)!r}")
        token = AuthenticationResponse.decode(body).password()
        verified = yield VerifyToken(token)
        if isinstance(verified, TokenRefused):
            self.auth_failed = True
            self._audit({"event": "auth_failed", "user": user, "reason": verified.reason, "client": self.peer,
                         "token": token_fingerprint(token)})
            raise SessionRefused(errors.INVALID_PASSWORD,
                                 f'password authentication failed for user "{user}": {verified.reason}')
        identity: Identity = verified.identity
        return identity

    def _refuse_login(self, identity: Identity, user: str, reason: str, sqlstate: str, message: str,
                      hint: str | None = None) -> SessionRefused:
        """Record a refused login of a valid token (e.g. a role it does not allow) and build the error."""
        self._audit({"event": "auth_failed", "user": user, "reason": reason, "client": self.peer,
                     "identity": identity.audit_fields()})
        return SessionRefused(sqlstate, message, hint=hint)

    def _connect_upstream(self, startup: StartupMessage, identity: Identity) -> Generator[Action, Any, None]:
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
            refused = yield CheckMaskedRole(identity, role, params["database"])
            if refused is not None:
                self.auth_failed = True
                raise self._refuse_login(identity, user, refused[1], refused[0], f"pgproxy masking: {refused[1]}")
        self.identity = identity
        self.database, self.db_role = params["database"], role
        self._secret = password.encode() if password else None
        start = {"event": "session_start", "identity": identity.audit_fields(), "client": self.peer,
                 "tls": self.tls, "database": params["database"], "upstream_role": role,
                 "application_name": startup.params.get("application_name")}
        reused = False
        if self._pooling:
            reused = yield ReuseUpstream(params, password)
            start["upstream_reused"] = reused
            self.add_backend_hook(Backend.PARAMETER_STATUS, self._remember_parameter)
        self._audit(start)
        outcome = UpstreamConnected([]) if reused else (yield ConnectUpstream(params, password))
        if isinstance(outcome, UpstreamUnreachable):
            self.server.metrics.upstream_error("connect_failed")
            log.warning("session %s: %s", self.id, outcome.detail)
            raise SessionRefused(errors.UNABLE_TO_CONNECT, outcome.public)  # never the upstream address
        if isinstance(outcome, UpstreamLoginRefused):
            if outcome.error.sqlstate in (errors.INVALID_PASSWORD, errors.INVALID_AUTHORIZATION):
                self.server.metrics.upstream_error("login_refused")
                log.error("session %s: upstream refused the proxy's login as %r: %s", self.id, role,
                          outcome.error.message)
                raise SessionRefused(errors.INVALID_AUTHORIZATION,
                                     f'the proxy could not log in upstream as role "{role}"',
                                     hint="Ask the operator to check the upstream credential.")
            raise SessionRefused(outcome.error.sqlstate or errors.CONNECTION_FAILURE, outcome.error.message or "",
                                 raw=self._scrub(outcome.error.encode()))
        self.upstream_connected = True
        # The gates and the masking in force now (one loop turn: a reload during the login cannot split them).
        self.gates = list(self.server.gates)
        if self.server.masking is not None:
            self.masking = self.server.masking.attach(self)
        yield SendClient(AuthenticationOk().encode())
        for notice in outcome.notices:
            yield SendClient(self._scrub(notice))
        # The session ends at the token's exp: a hard limit (the leeway only covers nbf and iat).
        self._deadline = identity.expires_at
        yield SetTimer(TOKEN_EXPIRY, max(0.0, self._deadline - self.clock.time()))

    def idle_check(self, now: float) -> None:
        """End the session if it sat idle (or idle in a transaction) longer than the configured limits."""
        if self.state is not _PUMPING or not self.tracker.idle or self._front.held:
            return
        limits = self.config.limits
        idle_for = now - self.last_activity
        if self.tracker.transaction_status == "I":
            if limits.idle_timeout_seconds and idle_for > limits.idle_timeout_seconds:
                self.terminate(errors.IDLE_SESSION_TIMEOUT, "terminating connection due to idle-session timeout")
        elif limits.idle_in_transaction_timeout_seconds and idle_for > limits.idle_in_transaction_timeout_seconds:
            self.terminate(errors.IDLE_IN_TRANSACTION_TIMEOUT,
                           "terminating connection due to idle-in-transaction timeout")

    # -------------------------------------------------------------------------------------------- pump

    def _start_pumping(self) -> None:
        if self.server.audit.capture_results:  # the signed audit log records results
            capture = ResultCapture(self.tracker, self.server.audit.max_result_rows)
            for msg_type, hook in ((Backend.ROW_DESCRIPTION, capture.on_row_description),
                                   (Backend.DATA_ROW, capture.on_data_row),
                                   (Backend.NOTICE_RESPONSE, capture.on_notice),
                                   (Backend.COPY_DATA, capture.on_copy_data)):
                self._backend_hooks.setdefault(msg_type, []).append(hook)
            self._capturing = True
        self._front.handlers.update(self._frontend_handlers())
        self._install_backend_handlers()
        self.tracker.queue.append(Pending(Kind.SYNC))  # the ReadyForQuery that ends the startup
        self._enter(_PUMPING)

    def client_data(self, data: bytes) -> bytes:
        """Bytes from the client: returns what to forward upstream (effects wait in ``actions``)."""
        if self.state is not _PUMPING and not self._expect_pumping("client data"):
            return b""
        self.last_activity = self.clock.monotonic()
        try:
            out = self._front.feed(data)
        except Exception as exc:
            return self._client_failed(exc)
        return b"" if self.state is _ENDED else out

    def _resume_client(self) -> bytes:
        """Relay what waited behind a held request; returns the output for upstream."""
        try:
            out = self._front.resume()
        except Exception as exc:
            return self._client_failed(exc)
        return b"" if self.state is _ENDED else out

    def _client_failed(self, exc: Exception) -> bytes:
        """End the session on what relaying client bytes raised (unless it ended already)."""
        if isinstance(exc, ProtocolViolation):
            self.terminate(exc.sqlstate, str(exc))
        elif not isinstance(exc, _Ended):
            log.error("session %s: internal error on client data", self.id, exc_info=exc)
            self.terminate(errors.INTERNAL_ERROR, "internal error in pgproxy; the session was closed")
        return b""

    def _frontend_handlers(self) -> dict[int, MessageHandler]:
        """Per message type: the tracker's accounting, behind the expiry check and gates for statements."""
        tracked = self.tracker.frontend_handlers
        handlers: dict[int, MessageHandler] = dict(tracked)
        checked = _STATEMENT_TYPES | (_GATED_TYPES if self.gates else frozenset())
        for msg_type in checked:
            handlers[msg_type] = functools.partial(self._on_statement_request, msg_type, tracked[msg_type])
        handlers[Frontend.TERMINATE] = self._on_terminate
        return handlers

    def _on_statement_request(self, msg_type: int, track: Callable[[memoryview], None],
                              body: memoryview) -> bytes | None:
        if self.state is _ENDED:
            raise _Ended()
        if self.clock.time() >= self._deadline:
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
            substitute, expected = substitute_for_refusal(msg_type, body, self.tracker.codec)
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
        described = msg_type != _EXECUTE or tracker.portal_described(body)
        return Statement(msg_type, sql, statement_name, bind_body, prepared, described=described)

    def _judge(self, msg_type: int, body: memoryview, first_gate: int) -> tuple[Verdict, Statement | None]:
        """The first verdict of the gates from ``first_gate`` on (remembering which gate gave it), and the
        Statement they judged."""
        if (msg_type in _TEXT_TYPES and not self.tracker.settings_known
                and not is_lexer_neutral(_statement_bytes(msg_type, body))):
            # An earlier statement may have changed a setting the server reads this text with.
            if self.tracker.settings_will_be_known:  # wait for the server's report
                self._held_gate = -1  # then every gate judges it
                return self._settled(), None
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

    def _settled(self) -> Hold:
        """A hold that ends once the server reported the settings that apply to the next text."""
        self._awaiting_settings = True
        return Hold(_SettingsReported())

    def _hold(self, hold: Hold) -> None:
        """Stop reading the client until the held request is decided (responses keep flowing)."""
        if hold.notice is not None:
            self.actions.append(SendClient(hold.notice.encode()))
        self.actions.append(HoldClient(None if self._awaiting_settings else hold))

    def decide(self, decision: Refuse | Rewrite | None) -> bytes:
        """The held request's decision: returns what to forward upstream."""
        if not self._expect_pumping("a decision"):
            return b""
        self._decided = decision
        out = self._resume_client()
        if not self._front.held:
            self.actions.append(ReleaseClient())
        return out

    def decision_failed(self, exc: Exception) -> bytes:
        """Awaiting the held request's decision failed: the request is refused."""
        log.warning("session %s: held request failed: %s", self.id, exc)
        return self.decide(Refuse(errors.error(errors.INSUFFICIENT_PRIVILEGE, f"request not approved: {exc}")))

    def _on_terminate(self, body: memoryview) -> bytes | None:
        self.end_reason = "client terminated"  # forwarded: the upstream closes, and so do we
        self._client_terminated = True  # that close is the client's doing, not an upstream failure
        if self.upstream_reusable:  # not forwarded: the connection goes back to the pool
            self._release_upstream()
            return b""
        return None

    @property
    def upstream_reusable(self) -> bool:
        """The upstream connection may serve another client after a reset: pooling is on, the session is live and
        the server idle outside any transaction, with nothing asked, held, half-read or failed on the way."""
        tracker = self.tracker
        return (self._pooling and self.state is _PUMPING and self._upstream_key is not None
                and not self._upstream_lost and not self._upstream_fatal and tracker.transaction_status == "I"
                and tracker.synced and not self._front.held and not self._back.buffered
                and not self._awaiting_settings)

    def _release_upstream(self) -> None:
        """End the session, handing its idle upstream connection to the pool."""
        assert self._upstream_key is not None
        self._enter(_ENDED)
        self.actions.append(ReleaseUpstream(dict(self._parameters), *self._upstream_key))
        self.actions.append(End())

    def _remember_parameter(self, body: memoryview) -> None:
        """Keep what the server reports (after scrubbing): a reused connection replays it to its next client."""
        name, value = parameter_status_fields(body)
        self._parameters[name] = value  # kept as sent (the client's encoding)

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
        if self.state is _PUMPING:
            self._install_backend_handlers()

    def _install_backend_handlers(self) -> None:
        handlers = self._back.handlers  # the relay holds this dict while it relays a chunk: update it
        handlers.clear()
        handlers.update(self._backend_handlers())

    def upstream_data(self, data: bytes) -> bytes:
        """Bytes from the server: returns what to send the client (effects wait in ``actions``)."""
        if self.state is not _PUMPING and not self._expect_pumping("upstream data"):
            return b""
        try:
            out = self._back.feed(data)
            if self.tracker.finished:  # recorded before the client sees the answers (fsync: always holds)
                self._emit_finished()
        except ProtocolViolation as exc:
            log.error("session %s: invalid message from upstream: %s", self.id, exc)
            if exc.sqlstate == errors.PROGRAM_LIMIT_EXCEEDED:  # a legitimate but oversized result
                self.terminate(errors.PROGRAM_LIMIT_EXCEEDED,
                               f"a message from the upstream database is over limits.max_message_bytes: {exc}")
            else:
                self.terminate(errors.PROTOCOL_VIOLATION, "the upstream database sent an invalid message")
            return b""
        except Exception:
            log.exception("session %s: internal error on upstream data", self.id)
            self.terminate(errors.INTERNAL_ERROR, "internal error in pgproxy; the session was closed")
            return b""
        if self.state is _ENDED:
            return b""
        if self._awaiting_settings and self.tracker.settings_known:
            self._awaiting_settings = False
            resumed = self.decide(None)
            if resumed:
                self.actions.append(SendUpstream(resumed))
        if not self.tracker.queue:  # idle
            self.last_activity = self.clock.monotonic()
            if self.expired and not self.ended:
                self._expire()
        return out

    def _backend_handlers(self) -> dict[int, MessageHandler]:
        """Per message type: tracking, FATAL detection, credential scrubbing, cancel keys, then hooks; each
        type's chain built into one handler here (when the hooks change), not walked per message."""
        chains: dict[int, list[MessageHandler]] = {t: [h] for t, h in self.tracker.backend_handlers.items()}
        chains[_ERROR] = [self._on_error_response]
        scrubbed: tuple[int, ...] = (Backend.PARAMETER_STATUS, Backend.NOTICE_RESPONSE, Backend.NOTIFICATION_RESPONSE)
        for msg_type in scrubbed:
            chains.setdefault(msg_type, []).append(functools.partial(self._scrub_body, msg_type))
        chains[Backend.BACKEND_KEY_DATA] = [self._on_backend_key_data]
        for msg_type, hooks in self._backend_hooks.items():
            chains.setdefault(msg_type, []).extend(hooks)
        return {msg_type: _chained(*chain) for msg_type, chain in chains.items()}

    def _on_error_response(self, body: memoryview) -> bytes | None:
        replacement = self.tracker.backend_handlers[_ERROR](body)
        raw = bytes(body)  # errors are rare: copying is affordable
        if b"SFATAL\x00" in raw or b"SPANIC\x00" in raw:
            self._upstream_fatal = True
        return replacement if replacement is not None else self._scrub_body(_ERROR, body)

    def _scrub_body(self, msg_type: int, body: memoryview) -> bytes | None:
        """The message without the upstream password, or None if it does not contain it."""
        raw = bytes(body)
        if not self._secret or self._secret not in raw:
            return None
        return self._scrub(frame(msg_type, raw))

    def _on_backend_key_data(self, body: memoryview) -> bytes:
        """Keep the upstream pid, hand the client a secret key of our own."""
        key = BackendKeyData.decode(body)
        self._upstream_key = (key.process_id, key.secret_key)
        cfg = self.config.upstream
        proxy_secret = self.server.cancels.register(key.process_id, key.secret_key, cfg.host, cfg.port)
        self._cancel_key = (key.process_id, proxy_secret)
        return BackendKeyData(key.process_id, proxy_secret).encode()

    def _scrub(self, message: bytes) -> bytes:
        """Remove the upstream password from a message that is about to reach the client."""
        if not self._secret or self._secret not in message[5:]:
            return message
        body = message[5:].replace(self._secret, b"********")
        return frame(message[0], body)

    # ------------------------------------------------------------------------------------- termination

    def timer_fired(self, name: str) -> None:
        """A timer set with ``SetTimer`` went off."""
        if name != TOKEN_EXPIRY:
            raise IllegalEvent(f"session {self.id}: unknown timer {name!r}")
        if self.state is _ENDED:
            return
        self.expired = True
        self._deadline = 0.0
        if self.tracker.idle:
            self._expire()

    def _expire(self) -> None:
        self.terminate(errors.INVALID_AUTHORIZATION, "terminating connection because the session token expired",
                       hint="Reconnect with a fresh token.")

    def terminate(self, sqlstate: str, message: str, *, hint: str | None = None) -> None:
        """End the session now with a FATAL to the client; safe to call more than once."""
        if self.state is _ENDED:
            return
        self._enter(_ENDED)
        self.end_reason = message
        self.actions.append(SendClient(errors.fatal(sqlstate, message, hint=hint)))
        if self.upstream_connected:
            self.actions.append(SendUpstream(Terminate().encode()))
        self.actions.append(End())

    def client_lost(self) -> None:
        """The client connection closed."""
        if not self._expect_pumping("client lost"):
            return
        if self.upstream_reusable:
            self._release_upstream()
            return
        self._enter(_ENDED)
        if not self._upstream_lost:
            self.actions.append(SendUpstream(Terminate().encode()))
        self.actions.append(End())

    def upstream_lost(self) -> None:
        """The upstream connection closed (after the driver relayed everything it had received)."""
        self._upstream_lost = True
        if not self._expect_pumping("upstream lost"):
            return
        self._enter(_ENDED)
        if self._client_terminated:
            pass  # the server closed because the client said Terminate: a clean end
        elif self._upstream_fatal:
            self.server.metrics.upstream_error("lost")
            self.end_reason = "upstream ended the session with FATAL"
        else:
            self.server.metrics.upstream_error("lost")
            self.end_reason = "upstream closed the connection"
            self.actions.append(SendClient(errors.fatal(errors.CONNECTION_FAILURE,
                                                        "the upstream database closed the connection unexpectedly")))
        self.actions.append(End())

    def finish(self) -> None:
        """Both connections are closed: release the cancel key and record the session's end."""
        if self.state is not _ENDED:
            self._enter(_ENDED)
        self.actions.clear()  # nothing left to send to
        if self._cancel_key is not None:
            self.server.cancels.unregister(*self._cancel_key)
            self._cancel_key = None
        if self.identity is not None:
            self._emit_finished()
            self._audit({"event": "session_end", "reason": self.end_reason, "statements": self.statements,
                         "duration_s": round(self.clock.time() - self.started_at, 3)})
        self._secret = None

    # ------------------------------------------------------------------------------------------- audit

    def _emit_finished(self) -> None:
        observe = self.server.metrics.statement_seconds.observe
        for result in self.tracker.drain():
            self.statements += 1
            observe(result.duration_ms / 1000.0)
            self._audit(*self._statement_event(result))

    def _statement_event(self, r: StatementResult) -> tuple[dict[str, Any], list[str | None] | None]:
        """The statement's audit event and every string in it redaction reads (for the emitter's secret
        check), or None when the emitter must check the whole event (masking added fields)."""
        sql = r.sql
        texts: list[str | None] = [sql]
        event: dict[str, Any] = {"event": "statement", "protocol": r.protocol, "sql": sql,
                                 "started_at": r.started_at, "duration_ms": r.duration_ms,
                                 "tags": r.tags, "rows": r.rows}
        checked: list[str | None] | None = texts
        if self.masking is not None:
            fields = len(event)
            self.masking.annotate(event, r)
            if len(event) != fields:  # annotate adds fields (never changes one): the emitter checks them all
                checked = None
        bind = Bind.lenient(r.bind_body)
        codec = self.tracker.server_codec
        if bind is not None:
            formats, params, _ = bind.values
            if params:
                values = event["params"] = audit_values(params, param_formats(formats, len(params)), codec)
                texts += values
        if r.statement_name:
            event["statement_name"] = r.statement_name
            texts.append(r.statement_name)
        if r.error is not None:
            error = r.error
            event["error"] = {"severity": error.severity, "sqlstate": error.sqlstate, "message": error.message}
            texts += (error.severity, error.sqlstate, error.message)
        if r.refused:
            event["refused"] = True
        if self._capturing:
            add_result_fields(event, r, bind, codec, texts)
        return event, checked

    def _check_audit(self) -> None:
        """Refuse a statement before it reaches the server while the audit log cannot record it."""
        audit = self.server.audit
        if audit.problem is None:  # recording (checked per request: nothing more to do)
            return
        try:
            audit.check()
        except AuditUnavailable as exc:
            log.error("session %s: %s", self.id, exc)
            self.terminate(errors.CANNOT_CONNECT_NOW, "the audit log is unavailable; the statement was NOT sent to "
                                                      "the database (safe to retry once the log is back)")
            raise _Ended() from None

    def _audit(self, event: dict[str, Any], texts: list[str | None] | None = None) -> None:
        """Record ``event`` (``texts``: see ``AuditEmitter.emit``), failing closed."""
        event["session"] = self.id  # the emitter stamps ts
        try:
            self.server.audit.emit(event, texts=texts)
        except AuditUnavailable as exc:
            log.error("session %s: %s", self.id, exc)
            if event["event"] == "session_end":
                return
            if not self.upstream_connected:
                raise SessionRefused(errors.CANNOT_CONNECT_NOW, "the audit log is unavailable") from None
            if self.state is not _ENDED:
                ran = event["event"] == "statement" and not event.get("refused")
                self.terminate(errors.CANNOT_CONNECT_NOW, "the audit log is unavailable; refusing to continue"
                               + ("; the last statement DID run on the database (its effects stand: check them "
                                  "before retrying), but could not be recorded" if ran else ""))


def _statement_bytes(msg_type: int, body: memoryview) -> bytes:
    """The statement text's bytes in a Query or Parse body, as sent (no decoding)."""
    if msg_type == _QUERY:
        return bytes(body)
    return Parse.view(body).query_bytes


def _chained(first: MessageHandler, *then: MessageHandler) -> MessageHandler:
    """One handler running ``first`` (e.g. tracking) and then each of ``then`` (hooks), each on the message
    as the ones before it left it (their replacement's body); returns the last replacement, or None."""
    if not then:
        return first
    if len(then) == 1:  # the common chain: one frame per message, no loop
        second = then[0]

        def chained_two(body: memoryview) -> bytes | None:
            replaced = first(body)
            if replaced is None:
                return second(body)
            again = second(memoryview(replaced)[5:])
            return replaced if again is None else again

        return chained_two

    def chained(body: memoryview) -> bytes | None:
        replaced = first(body)
        for hook in then:
            again = hook(body if replaced is None else memoryview(replaced)[5:])
            if again is not None:
                replaced = again
        return replaced

    return chained


__all__ = [
    "Action", "CheckMaskedRole", "ClientGone", "Clock", "ConnectUpstream", "End", "ForwardCancel", "HoldClient",
    "IllegalEvent", "ReadMessage", "ReadPacket", "ReleaseClient", "ReleaseUpstream", "ReuseUpstream", "SendClient",
    "SendUpstream", "SessionCore",
    "SessionRefused", "SetTimer", "StartTls", "StartupGen", "StartupTimeout", "State", "TokenRefused",
    "TokenVerified", "UpstreamConnected", "UpstreamLoginRefused", "UpstreamUnreachable", "VerifyToken",
    "token_fingerprint",
]
