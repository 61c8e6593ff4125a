"""The session core without sockets: bytes and events in, exact bytes and actions out."""

from __future__ import annotations

from typing import Any

import pytest
from sessionfakes import (
    EPOCH,
    FakeClock,
    core_config,
    fake_server,
    login,
    make_identity,
    new_core,
    startup_body,
)

from pgproxy.core.plugins import Hold, Refuse, Rewrite
from pgproxy.core.session import (
    CheckMaskedRole,
    ClientGone,
    ConnectUpstream,
    End,
    ForwardCancel,
    HoldClient,
    IllegalEvent,
    ReadMessage,
    ReadPacket,
    ReleaseClient,
    ReleaseUpstream,
    ReuseUpstream,
    SendClient,
    SendUpstream,
    SessionCore,
    SetTimer,
    StartTls,
    StartupTimeout,
    State,
    TokenRefused,
    TokenVerified,
    UpstreamConnected,
    UpstreamLoginRefused,
    UpstreamUnreachable,
    VerifyToken,
    token_fingerprint,
)
from pgproxy.core.statement import Statement
from pgproxy.protocol import errors
from pgproxy.protocol import messages as m
from pgproxy.protocol.codec import frame
from pgproxy.protocol.startup import PROTOCOL_3_0, CancelRequest, GSSENCRequest, SSLRequest
from pgproxy.protocol.types import Backend

RFQ_IDLE = frame(Backend.READY_FOR_QUERY, b"I")
AUTH_OK = m.AuthenticationOk().encode()
CLEARTEXT = m.AuthenticationCleartextPassword().encode()
TERMINATE = m.Terminate().encode()


def _body(packet: bytes) -> bytes:
    return packet[4:]  # the driver hands over what follows the length word


class Conversation:
    """Steps through the startup generator by hand."""

    def __init__(self, core: SessionCore) -> None:
        self.core = core
        self.steps = core.run()
        self.result: bool | None = None
        self.action: Any = next(self.steps)

    def answer(self, value: Any = None) -> Any:
        try:
            self.action = self.steps.send(value)
        except StopIteration as stop:
            self.result, self.action = stop.value, None
        return self.action

    def throw(self, exc: BaseException) -> Any:
        try:
            self.action = self.steps.throw(exc)
        except StopIteration as stop:
            self.result, self.action = stop.value, None
        return self.action


def _events(core: SessionCore) -> list[dict[str, Any]]:
    return core.server.audit.sink.events  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------------------ negotiation


def test_ssl_request_is_answered_n_without_tls_then_startup_goes_on() -> None:
    talk = Conversation(new_core())
    assert talk.action == ReadPacket(core_config().limits.max_startup_packet_bytes)
    assert talk.answer((_body(SSLRequest().encode()), False)) == SendClient(b"N")
    assert talk.answer() == ReadPacket(talk.core.config.limits.max_startup_packet_bytes)
    assert talk.answer((startup_body(), False)) == SendClient(CLEARTEXT)
    assert talk.core.state is State.AUTHENTICATING and talk.core.started


def test_ssl_request_is_answered_s_and_tls_starts() -> None:
    context = object()
    core = new_core(fake_server(tls=context))
    talk = Conversation(core)
    assert talk.answer((_body(SSLRequest().encode()), False)) == SendClient(b"S")
    assert talk.answer() == StartTls(context)  # type: ignore[arg-type]
    assert isinstance(talk.answer(), ReadPacket) and core.tls
    # a second SSLRequest inside TLS is a protocol violation
    assert talk.answer((_body(SSLRequest().encode()), False)) == SendClient(
        errors.fatal("08P01", "SSLRequest received on an encrypted connection"))
    assert talk.answer() is None and talk.result is False and core.state is State.ENDED


def test_bytes_pipelined_after_ssl_request_are_refused() -> None:
    """CVE-2021-23214: bytes sent before our answer could be injected into the TLS session."""
    talk = Conversation(new_core(fake_server(tls=object())))
    assert talk.answer((_body(SSLRequest().encode()), True)) == SendClient(
        errors.fatal("08P01", "received unencrypted data after SSL request"))


def test_gssenc_request_is_answered_n() -> None:
    talk = Conversation(new_core())
    assert talk.answer((_body(GSSENCRequest().encode()), False)) == SendClient(b"N")
    assert isinstance(talk.answer(), ReadPacket)


def test_cancel_request_is_forwarded_and_ends_quietly() -> None:
    core = new_core()
    talk = Conversation(core)
    request = CancelRequest(4242, 99)
    assert talk.answer((_body(request.encode()), False)) == ForwardCancel(
        request, core.config.upstream.connect_timeout_seconds)
    assert talk.answer() is None and talk.result is False
    assert core.state is State.ENDED and core.end_reason == "cancel request" and not core.started


def test_newer_protocol_minor_and_options_are_negotiated_down_to_3_0() -> None:
    talk = Conversation(new_core())
    body = startup_body(version=PROTOCOL_3_0 | 2, **{"_pq_.compression": "on"})
    assert talk.answer((body, False)) == SendClient(
        m.NegotiateProtocolVersion(PROTOCOL_3_0, ("_pq_.compression",)).encode())
    assert talk.answer() == SendClient(CLEARTEXT)


def test_unsupported_major_version_is_refused() -> None:
    talk = Conversation(new_core())
    action = talk.answer((startup_body(version=4 << 16), False))
    assert action == SendClient(errors.fatal("0A000", "unsupported frontend protocol 4.0: server supports 3.0 to 3.0"))


# ------------------------------------------------------------------------------------------------ login


def test_login_sends_cleartext_request_verifies_and_connects() -> None:
    core = new_core()
    identity = make_identity()
    actions = login(core, identity, notices=(m.NoticeResponse.build("NOTICE", "00000", "hello").encode(),))
    assert [type(a) for a in actions] == [ReadPacket, SendClient, ReadMessage, VerifyToken, ConnectUpstream,
                                          SendClient, SendClient, SetTimer]
    assert actions[1] == SendClient(CLEARTEXT)
    assert actions[3] == VerifyToken("the-token")
    assert actions[4] == ConnectUpstream({"user": "app_reader", "database": "app"}, None)
    assert actions[5] == SendClient(AUTH_OK)
    assert actions[6] == SendClient(m.NoticeResponse.build("NOTICE", "00000", "hello").encode())
    assert actions[7] == SetTimer("token expiry", 3600.0)
    assert core.state is State.PUMPING and core.identity is identity
    assert (core.database, core.db_role) == ("app", "app_reader")
    [start] = _events(core)
    assert start["event"] == "session_start" and start["upstream_role"] == "app_reader" and start["tls"] is False


def test_refused_token_ends_with_28p01_and_an_audited_fingerprint() -> None:
    core = new_core()
    talk = Conversation(core)
    talk.answer((startup_body(), False))
    assert talk.answer() == ReadMessage(64 * 1024)
    assert talk.answer((ord("p"), b"bad-token\x00")) == VerifyToken("bad-token")
    assert talk.answer(TokenRefused("token expired")) == SendClient(
        errors.fatal("28P01", 'password authentication failed for user "app_reader": token expired'))
    assert talk.answer() is None and talk.result is False
    assert core.auth_failed and core.identity is None
    [event] = _events(core)
    assert event["event"] == "auth_failed" and event["token"] == token_fingerprint("bad-token")
    assert "bad-token" not in repr(event)


def test_role_the_token_does_not_allow_ends_with_28000() -> None:
    core = new_core()
    talk = Conversation(core)
    talk.answer((startup_body("postgres"), False))
    talk.answer()
    talk.answer((ord("p"), b"t\x00"))
    assert talk.answer(TokenVerified(make_identity(roles=("app_reader", "app_writer")))) == SendClient(
        errors.fatal("28000", 'token for "agent-1" does not allow database role "postgres"',
                     hint="Connect as one of: app_reader, app_writer"))
    assert core.auth_failed and _events(core)[0]["reason"] == "role not allowed by token"


def test_plaintext_is_refused_unless_the_listener_allows_it() -> None:
    config = core_config()
    server = fake_server(config)
    listener = config.listeners[0]
    object.__setattr__(listener, "insecure_plaintext", False)
    core = SessionCore(server, listener, FakeClock())
    talk = Conversation(core)
    assert talk.answer((startup_body(), False)) == SendClient(errors.fatal(
        "28000", "pgproxy requires an encrypted connection: the token is sent as a password",
        hint="Connect with sslmode=require (or verify-full)."))


def test_a_message_other_than_the_password_is_a_protocol_violation() -> None:
    talk = Conversation(new_core())
    talk.answer((startup_body(), False))
    talk.answer()
    assert talk.answer((ord("Q"), b"select 1\x00")) == SendClient(
        errors.fatal("08P01", "expected password response, got message type 'Q'"))


def test_startup_timeout_and_client_gone() -> None:
    talk = Conversation(new_core())
    talk.answer((startup_body(), False))
    talk.answer()
    assert talk.throw(StartupTimeout()) == SendClient(errors.fatal("08006", "canceling authentication due to timeout"))
    gone = Conversation(new_core())
    assert gone.throw(ClientGone()) is None and gone.result is False
    assert gone.core.end_reason == "client disconnected during startup"


def test_upstream_failures_never_name_the_upstream() -> None:
    def until_connect(core: SessionCore) -> Conversation:
        talk = Conversation(core)
        for answer in ((startup_body(), False), None, (ord("p"), b"t\x00"), TokenVerified(make_identity())):
            talk.answer(answer)
        assert isinstance(talk.action, ConnectUpstream)
        return talk

    talk = until_connect(new_core())
    assert talk.answer(UpstreamUnreachable("could not connect to the upstream database: refused",
                                           "... (upstream 10.0.0.9:5432)")) == SendClient(
        errors.fatal("08001", "could not connect to the upstream database: refused"))
    talk = until_connect(new_core())
    refused = m.ErrorResponse.build("FATAL", "28P01", "password authentication failed")
    assert talk.answer(UpstreamLoginRefused(refused)) == SendClient(
        errors.fatal("28000", 'the proxy could not log in upstream as role "app_reader"',
                     hint="Ask the operator to check the upstream credential."))


def test_masking_may_refuse_the_role_before_login() -> None:
    server = fake_server()
    server.masking = object()  # only consulted through the CheckMaskedRole action here
    talk = Conversation(new_core(server))
    for answer in ((startup_body(), False), None, (ord("p"), b"t\x00")):
        talk.answer(answer)
    assert talk.answer(TokenVerified(make_identity())) == CheckMaskedRole(make_identity(), "app_reader", "app")
    assert talk.answer(("28000", "role bypasses row security")) == SendClient(
        errors.fatal("28000", "pgproxy masking: role bypasses row security"))


# ------------------------------------------------------------------------------------------------- pump


def _pumping(gates: tuple[Any, ...] = (), clock: FakeClock | None = None, **limits: Any) -> SessionCore:
    core = new_core(fake_server(core_config(**limits), gates=gates), clock)
    login(core)
    assert core.upstream_data(RFQ_IDLE) == RFQ_IDLE  # the startup's ReadyForQuery
    assert core.take_actions() == []
    return core


def test_a_query_is_forwarded_as_sent_and_its_answer_relayed_and_audited() -> None:
    core = _pumping()
    query = m.Query("select 1").encode()
    assert core.client_data(query) == query
    answer = (m.RowDescription((m.FieldDescription("x", 0, 0, 23, 4, -1, 0),)).encode()
              + m.DataRow((b"1",)).encode() + m.CommandComplete("SELECT 1").encode() + RFQ_IDLE)
    assert core.upstream_data(answer) == answer
    assert core.actions == []
    statement = _events(core)[-1]
    assert statement["event"] == "statement" and statement["sql"] == "select 1" and statement["rows"] == 1
    assert core.statements == 1


def test_backend_hooks_run_in_order_each_on_the_message_the_previous_left(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each type's hooks are built into one handler: tracking first, then the hooks in order (``first``
    before the others), each seeing the replacement the ones before it made; on a scrubbed type, after
    the scrubbing."""
    monkeypatch.setenv("CORE_TEST_UPSTREAM_PASSWORD", "s3cret")
    core = new_core(fake_server(core_config(password_env="CORE_TEST_UPSTREAM_PASSWORD")))
    login(core)
    assert core.upstream_data(RFQ_IDLE) == RFQ_IDLE
    seen: list[tuple[str, bytes]] = []

    def hook(name: str, replace: bytes | None) -> Any:
        def run(body: memoryview) -> bytes | None:
            seen.append((name, bytes(body)))
            return None if replace is None else m.DataRow((replace,)).encode()
        return run

    core.add_backend_hook(Backend.DATA_ROW, hook("second", b"two"))
    core.add_backend_hook(Backend.DATA_ROW, hook("third", None))
    core.add_backend_hook(Backend.DATA_ROW, hook("first", b"one"), first=True)
    query = m.Query("select 'raw'").encode()
    assert core.client_data(query) == query
    rows = m.DataRow((b"raw",)).encode()
    done = m.CommandComplete("SELECT 1").encode() + RFQ_IDLE
    out = core.upstream_data(m.RowDescription((m.FieldDescription("x", 0, 0, 25, -1, -1, 0),)).encode() + rows + done)
    assert m.DataRow((b"two",)).encode() in out and rows not in out
    assert seen == [("first", rows[5:]), ("second", m.DataRow((b"one",)).encode()[5:]),
                    ("third", m.DataRow((b"two",)).encode()[5:])]
    assert _events(core)[-1]["sql"] == "select 'raw'"  # the tracker ran before the hooks
    # A hook on a scrubbed type sees the message without the upstream password.
    notices: list[bytes] = []
    core.add_backend_hook(Backend.NOTICE_RESPONSE, lambda body: notices.append(bytes(body)))
    leak = m.NoticeResponse.build("NOTICE", "00000", "password s3cret rejected").encode()
    out = core.upstream_data(leak)
    assert b"s3cret" not in out and notices and b"s3cret" not in notices[0] and b"********" in notices[0]


def test_client_data_before_the_pump_is_an_illegal_event() -> None:
    core = new_core()
    with pytest.raises(IllegalEvent):
        core.client_data(m.Query("select 1").encode())
    with pytest.raises(IllegalEvent):
        core.upstream_lost()


class Gate:
    """Answers each request with the next verdict (None once they run out) and records what it saw."""

    def __init__(self, *verdicts: Any) -> None:
        self.verdicts = list(verdicts)
        self.seen: list[Statement] = []

    def inspect(self, session: Any, request: Statement) -> Any:
        self.seen.append(request)
        return self.verdicts.pop(0) if self.verdicts else None


def test_a_refused_query_is_substituted_and_the_gates_error_replaces_the_servers() -> None:
    refusal = errors.error("42501", "not allowed here")
    core = _pumping((Gate(Refuse(refusal)),))
    assert core.client_data(m.Query("delete from t").encode()) == m.Query("pgproxy refused this statement").encode()
    server_error = m.ErrorResponse.build("ERROR", "42601", 'syntax error at or near "pgproxy"').encode()
    assert core.upstream_data(server_error + RFQ_IDLE) == refusal.encode() + RFQ_IDLE
    assert _events(core)[-1]["refused"] is True


def test_a_rewritten_query_is_forwarded_with_the_new_text() -> None:
    core = _pumping((Gate(Rewrite("select masked(1)")),))
    assert core.client_data(m.Query("select 1").encode()) == m.Query("select masked(1)").encode()


def test_a_hold_stops_the_stream_until_decided() -> None:
    decision = object()
    notice = m.NoticeResponse.build("NOTICE", "00000", "waiting for approval 7")
    hold = Hold(decision, notice)  # type: ignore[arg-type]
    gate = Gate(hold)
    core = _pumping((gate,))
    first, second = m.Query("update t set x = 1").encode(), m.Query("select 2").encode()
    assert core.client_data(first + second) == b""
    assert core.held and core.take_actions() == [SendClient(notice.encode()), HoldClient(hold)]
    assert core.client_data(m.Query("select 3").encode()) == b""  # waits behind the held request
    assert core.decide(None) == first + second + m.Query("select 3").encode()
    assert not core.held and core.take_actions() == [ReleaseClient()]
    assert [r.sql for r in gate.seen] == ["update t set x = 1", "select 2", "select 3"]


def test_a_hold_that_fails_refuses_the_request() -> None:
    core = _pumping((Gate(Hold(object())),))  # type: ignore[arg-type]
    core.client_data(m.Query("update t set x = 1").encode())
    core.take_actions()
    assert core.decision_failed(RuntimeError("store down")) == m.Query("pgproxy refused this statement").encode()


def test_a_text_waits_for_the_settings_an_earlier_statement_may_change() -> None:
    """Without sockets or tasks: the core itself resumes the held text once the server reported them."""
    gate = Gate()
    core = _pumping((gate,))
    change, text = m.Query("set standard_conforming_strings = off").encode(), m.Query("select 'a\\b'").encode()
    assert core.client_data(change + text) == change
    assert core.held and core.take_actions() == [HoldClient(None)]  # nothing for the driver to await
    assert [r.sql for r in gate.seen] == ["set standard_conforming_strings = off"]
    report = (m.CommandComplete("SET").encode() + frame(Backend.PARAMETER_STATUS, b"standard_conforming_strings\0off\0")
              + RFQ_IDLE)
    assert core.upstream_data(report) == report
    assert core.take_actions() == [ReleaseClient(), SendUpstream(text)]
    # judged as the server now reads it: with standard_conforming_strings off, '\\b' is a backspace
    assert gate.seen[-1].sql == "select 'a\\b'" and gate.seen[-1].server_text() == "SELECT 'a\x08'"


# ------------------------------------------------------------------------------------------ termination

EXPIRED = errors.fatal("28000", "terminating connection because the session token expired",
                       hint="Reconnect with a fresh token.")


def test_token_expiry_while_idle_ends_the_session_at_once() -> None:
    core = _pumping()
    core.timer_fired("token expiry")
    assert core.take_actions() == [SendClient(EXPIRED), SendUpstream(TERMINATE), End()]
    assert core.state is State.ENDED and core.end_reason.startswith("terminating connection because")


def test_token_expiry_while_busy_waits_for_the_answer() -> None:
    core = _pumping()
    core.client_data(m.Query("select pg_sleep(1)").encode())
    core.timer_fired("token expiry")
    assert core.take_actions() == []  # the statement in flight finishes first
    answer = m.CommandComplete("SELECT 1").encode() + RFQ_IDLE
    assert core.upstream_data(answer) == answer
    assert core.take_actions() == [SendClient(EXPIRED), SendUpstream(TERMINATE), End()]


def test_no_statement_starts_after_the_token_expired() -> None:
    clock = FakeClock()
    core = _pumping(clock=clock)
    clock.wall = EPOCH + 3600  # the token's exp, before its timer fired
    assert core.client_data(m.Query("select 1").encode()) == b""
    assert core.take_actions() == [SendClient(EXPIRED), SendUpstream(TERMINATE), End()]


def test_statements_run_until_the_token_expires_on_the_cores_clock() -> None:
    """The deadline is the token's exp read on the clock the core was given: a second before, the statement
    goes upstream; at exp, the next one ends the session with FATAL 28000 and never leaves the proxy."""
    clock = FakeClock()
    core = _pumping(clock=clock)
    clock.wall = EPOCH + 3600 - 1
    before = m.Query("select 'before'").encode()
    assert core.client_data(before) == before
    assert core.take_actions() == []
    answer = m.CommandComplete("SELECT 1").encode() + RFQ_IDLE
    assert core.upstream_data(answer) == answer
    clock.wall = EPOCH + 3600
    assert core.client_data(m.Query("select 'after'").encode()) == b""
    assert core.take_actions() == [SendClient(EXPIRED), SendUpstream(TERMINATE), End()]
    assert [e["sql"] for e in core.server.audit.sink.events if e["event"] == "statement"] == ["select 'before'"]


def test_idle_in_transaction_limit_counts_from_the_last_activity() -> None:
    clock = FakeClock()
    core = _pumping(clock=clock, idle_in_transaction_timeout_seconds=30)
    begin = m.Query("begin").encode()
    assert core.client_data(begin) == begin
    in_tx = m.CommandComplete("BEGIN").encode() + frame(Backend.READY_FOR_QUERY, b"T")
    clock.advance(5)
    assert core.upstream_data(in_tx) == in_tx  # the answer left the session idle in a transaction: from now on
    core.idle_check(clock.monotonic() + 30)
    assert core.take_actions() == []
    core.idle_check(clock.monotonic() + 30.5)
    assert core.take_actions() == [
        SendClient(errors.fatal("25P03", "terminating connection due to idle-in-transaction timeout")),
        SendUpstream(TERMINATE), End()]


def test_idle_limit_is_not_the_idle_in_transaction_limit() -> None:
    clock = FakeClock()
    core = _pumping(clock=clock, idle_timeout_seconds=0, idle_in_transaction_timeout_seconds=30)
    core.idle_check(clock.monotonic() + 3600)  # idle outside a transaction, with no idle limit: left alone
    assert core.take_actions() == []


def test_idle_limit_uses_the_clock_it_is_given() -> None:
    clock = FakeClock()
    core = _pumping(clock=clock, idle_timeout_seconds=30)
    core.idle_check(clock.monotonic() + 29)
    assert core.take_actions() == []
    core.idle_check(clock.monotonic() + 31)
    assert core.take_actions() == [
        SendClient(errors.fatal("57P05", "terminating connection due to idle-session timeout")),
        SendUpstream(TERMINATE), End()]


def test_upstream_fatal_then_close_ends_quietly() -> None:
    core = _pumping()
    fatal = m.ErrorResponse.build("FATAL", "57P01", "terminating connection due to administrator command").encode()
    assert core.upstream_data(fatal) == fatal  # relayed to the client as the server sent it
    core.upstream_lost()
    assert core.take_actions() == [End()]
    assert core.end_reason == "upstream ended the session with FATAL"


def test_upstream_closing_without_a_word_gets_a_fatal_08006() -> None:
    core = _pumping()
    core.upstream_lost()
    assert core.take_actions() == [
        SendClient(errors.fatal("08006", "the upstream database closed the connection unexpectedly")), End()]
    assert core.client_data(m.Query("select 1").encode()) == b""  # late bytes are dropped


def test_client_terminate_is_forwarded_and_the_close_that_follows_is_clean() -> None:
    core = _pumping()
    assert core.client_data(TERMINATE) == TERMINATE
    core.upstream_lost()
    assert core.take_actions() == [End()]
    core.finish()
    end = _events(core)[-1]
    assert end["event"] == "session_end" and end["reason"] == "client terminated"


def test_client_lost_tells_the_upstream() -> None:
    core = _pumping()
    core.client_lost()
    assert core.take_actions() == [SendUpstream(TERMINATE), End()]
    assert core.end_reason == "client disconnected"


def test_terminate_is_idempotent_and_finish_records_the_duration() -> None:
    clock = FakeClock()
    core = _pumping(clock=clock)
    clock.advance(2.5)
    core.terminate("57P01", "terminating connection due to administrator command")
    core.terminate("57P01", "again")
    assert core.take_actions() == [
        SendClient(errors.fatal("57P01", "terminating connection due to administrator command")),
        SendUpstream(TERMINATE), End()]
    core.finish()
    end = _events(core)[-1]
    assert end["duration_s"] == 2.5 and end["reason"] == "terminating connection due to administrator command"


def test_the_upstream_password_never_reaches_the_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORE_TEST_UPSTREAM_PASSWORD", "s3cret")
    core = new_core(fake_server(core_config(password_env="CORE_TEST_UPSTREAM_PASSWORD")))
    assert login(core)[4] == ConnectUpstream({"user": "app_reader", "database": "app"}, "s3cret")
    leak = m.NoticeResponse.build("NOTICE", "00000", "password s3cret rejected").encode()
    out = core.upstream_data(leak)
    assert b"s3cret" not in out and b"********" in out


def test_the_gates_are_those_in_force_when_the_login_completes() -> None:
    """A reload during the login (here: one that turns a gate on) must not leave the session with the gates
    of before it, while its masking is attached from after it."""
    server = fake_server()
    core = new_core(server)
    steps = core.run()
    answer: Any = None
    answers = {ReadPacket: (startup_body(), False), ReadMessage: (ord("p"), b"the-token\x00"),
               VerifyToken: TokenVerified(make_identity()), ConnectUpstream: UpstreamConnected([])}
    with pytest.raises(StopIteration):
        while True:
            action = steps.send(answer)
            if isinstance(action, ConnectUpstream):
                server.gates = (Gate(Refuse(errors.error("42501", "refused by the reloaded policy"))),)
            answer = answers.get(type(action))
    core.upstream_data(RFQ_IDLE)
    assert core.client_data(m.Query("select 1").encode()) == m.Query("pgproxy refused this statement").encode()


# ------------------------------------------------------------------------------------------ upstream pool

KEY = m.BackendKeyData(4242, 0xDEADBEEF).encode()


def _pooled_pumping() -> SessionCore:
    core = new_core(fake_server(core_config(pool=True)))
    asked = login(core)
    assert ReuseUpstream({"user": "app_reader", "database": "app"}, None) in asked
    tail = m.parameter_status(b"application_name", b"app") + KEY + RFQ_IDLE
    assert b"4242" not in core.upstream_data(tail)
    assert core.take_actions() == []
    assert _events(core)[0]["upstream_reused"] is False
    return core


def test_a_reused_upstream_skips_the_login_and_is_audited_as_reused() -> None:
    core = new_core(fake_server(core_config(pool=True)))
    talk = Conversation(core)
    talk.answer((startup_body(), False))
    talk.answer()
    talk.answer((ord("p"), b"the-token\x00"))
    assert isinstance(talk.answer(TokenVerified(make_identity())), ReuseUpstream)
    assert talk.answer(True) == SendClient(AUTH_OK)  # no ConnectUpstream
    assert _events(core)[0]["upstream_reused"] is True


def test_with_the_pool_an_idle_clean_end_releases_the_upstream_instead_of_terminating_it() -> None:
    core = _pooled_pumping()
    set_name = m.Query("set application_name = 'x'").encode()
    core.client_data(set_name)
    core.upstream_data(m.CommandComplete("SET").encode() + m.parameter_status(b"application_name", b"x") + RFQ_IDLE)
    assert core.upstream_reusable
    assert core.client_data(TERMINATE) == b""  # not forwarded
    assert core.take_actions() == [ReleaseUpstream({b"application_name": b"x"}, 4242, 0xDEADBEEF), End()]
    assert core.ended


@pytest.mark.parametrize("case", ["in-transaction", "no-sync", "outstanding", "upstream-fatal"])
def test_with_the_pool_an_unclean_end_terminates_the_upstream(case: str) -> None:
    core = _pooled_pumping()
    if case == "in-transaction":
        core.client_data(m.Query("begin").encode())
        core.upstream_data(m.CommandComplete("BEGIN").encode() + frame(Backend.READY_FOR_QUERY, b"T"))
    elif case == "no-sync":
        core.client_data(m.Parse("", "select 1", ()).encode() + frame(ord("H"), b""))
        core.upstream_data(frame(Backend.PARSE_COMPLETE, b""))
    elif case == "outstanding":
        core.client_data(m.Query("select pg_sleep(1)").encode())
    else:
        core.upstream_data(m.ErrorResponse.build("FATAL", "57P01", "terminating").encode())
    assert not core.upstream_reusable
    core.client_lost()
    assert core.take_actions() == [SendUpstream(TERMINATE), End()]


def test_without_the_pool_an_idle_end_terminates_the_upstream() -> None:
    core = _pumping()
    assert not core.upstream_reusable
    assert core.client_data(TERMINATE) == TERMINATE
