"""/metrics on the admin listener, scraped over HTTP while real clients use the proxy."""

from __future__ import annotations

import copy
import os
import secrets
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from click.testing import CliRunner
from harness import ProxyUnderTest
from prometheus_client.parser import text_string_to_metric_families

from pgproxy.audit.keys import generate_key
from pgproxy.cli import main
from pgproxy.config import parse_config
from pgproxy.testing import RunningProxy

POLICY = """
rules:
  - name: no-code
    match: {classes: [procedural]}
    action: deny
    message: no server-side code
  - name: hold-delete
    match: {classes: [destructive], tables: ["*metrics_hold*"]}
    action: approve
    approvers: [dba]
    mode: hold
    timeout: 30
default: allow
"""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int, token: str | None = None) -> Samples:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(port: int, check: Callable[[Samples], bool], what: str) -> Samples:
    """Scrape until ``check`` holds (metrics of closed sessions and audit flushes settle asynchronously)."""
    deadline = time.monotonic() + 15
    while True:
        samples = scrape(port)
        if check(samples):
            return samples
        assert time.monotonic() < deadline, f"metrics never showed {what}"
        time.sleep(0.05)


@dataclass
class Metered:
    running: RunningProxy
    admin_port: int
    listener: str  # the plaintext listener's label
    dsn: str


def _with_admin(data: dict[str, Any], tmp: Path) -> None:
    data["approvals"] = {"store": "sqlite", "path": str(tmp / "approvals.sqlite")}
    data["admin"] = {"host": "127.0.0.1", "port": 0}


@pytest.fixture(scope="module")
def metered(proxy: ProxyUnderTest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Metered]:
    """A proxy with a policy, hold-mode approvals, the signed audit log and the admin listener."""
    tmp = tmp_path_factory.mktemp("metrics")
    (tmp / "policy.yaml").write_text(POLICY)
    generate_key(tmp / "audit.key")
    data = copy.deepcopy(proxy.config_data)
    _with_admin(data, tmp)
    data["policy"] = {"file": str(tmp / "policy.yaml")}
    data["audit"] = {"dir": str(tmp / "audit"), "signing_key_file": str(tmp / "audit.key")}
    running = RunningProxy(parse_config(data, tmp)).start()
    assert running.server is not None and running.server.admin is not None
    port = running.ports[1]
    dsn = proxy.dsn(tls=False, user="agent_writer", token=proxy.token(roles=("agent_writer",)), port=str(port))
    with psycopg.connect(proxy.database.dsn(), autocommit=True) as conn:  # directly: DROP would need an approval
        conn.execute("drop table if exists metrics_hold")
        conn.execute("create table metrics_hold (x int)")
        conn.execute("grant all on metrics_hold to agent_writer")
    yield Metered(running, running.server.admin.port, f"127.0.0.1:{port}", dsn)
    running.stop()


def test_statements_by_class_and_decision(metered: Metered) -> None:
    before = scrape(metered.admin_port)
    with psycopg.connect(metered.dsn, autocommit=True) as conn:
        for _ in range(3):
            conn.execute("select 1")
        conn.execute("insert into metrics_hold values (1)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DO $$ begin perform 1; end $$")
        assert conn.pgconn.exec_(b"selec 1").error_field(ord("C")) == b"42601"  # simple protocol: judged at once
    after = scrape(metered.admin_port)

    def moved(cls: str, decision: str) -> float:
        return (value(after, "pgproxy_statements_total", **{"class": cls, "decision": decision})
                - value(before, "pgproxy_statements_total", **{"class": cls, "decision": decision}))

    assert moved("read", "allow") == 3
    assert moved("write", "allow") == 1
    assert moved("procedural", "deny") == 1
    assert moved("syntax_error", "refused") == 1
    assert moved("ddl", "allow") == 0
    # every statement that reached the server is timed (the refused ones too: the server answered them)
    assert (value(after, "pgproxy_statement_duration_seconds_count")
            - value(before, "pgproxy_statement_duration_seconds_count")) >= 6


def test_connections_by_listener_and_outcome(metered: Metered, proxy: ProxyUnderTest) -> None:
    def idle(s: Samples) -> bool:
        return value(s, "pgproxy_connections_open", listener=metered.listener) == 0

    before = wait_for(metered.admin_port, idle, "no open connection")
    port, tls_port = str(metered.running.ports[1]), str(metered.running.ports[0])
    with psycopg.connect(metered.dsn, autocommit=True) as conn:
        conn.execute("select 1")
        during = scrape(metered.admin_port)
        assert value(during, "pgproxy_connections_open", listener=metered.listener) >= 1
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(proxy.dsn(tls=False, token="not-a-jwt", port=port))
    with pytest.raises(psycopg.OperationalError, match="does not allow database role"):
        psycopg.connect(proxy.dsn(tls=False, user="agent_writer", token=proxy.token(roles=("agent_reader",)),
                                  port=port))
    with pytest.raises(psycopg.OperationalError, match="requires an encrypted connection"):
        psycopg.connect(proxy.dsn(tls=False, port=tls_port))
    after = wait_for(metered.admin_port, idle, "the closed connections")
    for outcome, n in (("accepted", 1), ("auth_failed", 2), ("refused", 1)):
        assert (value(after, "pgproxy_connections_total", outcome=outcome)
                - value(before, "pgproxy_connections_total", outcome=outcome)) == n, outcome


def test_held_approval_is_pending_then_timed(metered: Metered) -> None:
    server = metered.running.server
    assert server is not None and server.approval_store is not None
    store = server.approval_store
    before = scrape(metered.admin_port)
    errors: list[BaseException] = []

    def hold() -> None:
        try:
            with psycopg.connect(metered.dsn, autocommit=True) as conn:
                conn.execute("delete from metrics_hold")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    wait_for(metered.admin_port, lambda s: value(s, "pgproxy_approvals_pending") == 1, "a pending approval")
    [pending] = metered.running.call(store.list("pending"))
    metered.running.call(store.decide(pending.id, "dba-alice", ["dba"], True, None))
    thread.join(20)
    assert not thread.is_alive() and not errors, errors
    after = scrape(metered.admin_port)
    assert value(after, "pgproxy_approvals_pending") == 0
    assert (value(after, "pgproxy_approval_wait_seconds_count", outcome="approved")
            - value(before, "pgproxy_approval_wait_seconds_count", outcome="approved")) == 1
    assert (value(after, "pgproxy_statements_total", **{"class": "destructive", "decision": "approve"})
            - value(before, "pgproxy_statements_total", **{"class": "destructive", "decision": "approve"})) == 1


def test_audit_writes_are_timed(metered: Metered) -> None:
    before = scrape(metered.admin_port)
    with psycopg.connect(metered.dsn, autocommit=True) as conn:
        conn.execute("select 1")
    after = wait_for(metered.admin_port, lambda s: value(s, "pgproxy_audit_write_seconds_count")
                     > value(before, "pgproxy_audit_write_seconds_count"), "an audit write")
    assert value(after, "pgproxy_audit_write_seconds_sum") > 0
    assert ("pgproxy_audit_pending_records", ()) in after


def test_masked_values_reach_the_scrape(metered: Metered) -> None:
    """The call the masking layer makes (``session.server.metrics``), as a scraper sees it."""
    server = metered.running.server
    assert server is not None
    before = value(scrape(metered.admin_port), "pgproxy_masked_values_total")
    metered.running.loop.call_soon_threadsafe(server.metrics.masked_values, 7)
    wait_for(metered.admin_port, lambda s: value(s, "pgproxy_masked_values_total") == before + 7, "7 masked values")


def test_lost_upstream_is_counted(metered: Metered, proxy: ProxyUnderTest) -> None:
    before = scrape(metered.admin_port)
    with psycopg.connect(metered.dsn, autocommit=True) as conn:
        pid = conn.execute("select pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        with psycopg.connect(proxy.database.dsn(), autocommit=True) as admin:
            assert admin.execute("select pg_terminate_backend(%s)", [pid]).fetchone() == (True,)
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")
    wait_for(metered.admin_port, lambda s: value(s, "pgproxy_upstream_errors_total", kind="lost")
             == value(before, "pgproxy_upstream_errors_total", kind="lost") + 1, "the lost upstream")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_upstream_failures_and_the_metrics_token(make_proxy: Callable[..., ProxyUnderTest], proxy: ProxyUnderTest,
                                                 tmp_path: Path) -> None:
    token_env = "PGPROXY_TEST_METRICS_TOKEN"
    os.environ[token_env] = secrets.token_urlsafe(16)
    os.environ["PGPROXY_TEST_WRONG_PASSWORD"] = "wrong-" + secrets.token_hex(4)

    def broken(data: dict[str, Any]) -> None:
        _with_admin(data, tmp_path)
        data["admin"]["metrics_token_env"] = token_env
        wrong = {"role": "agent_reader", "password_env": "PGPROXY_TEST_WRONG_PASSWORD"}
        data["upstream"]["credentials"].insert(0, wrong)

    refusing = make_proxy(broken)
    port = refusing.running.server.admin.port  # type: ignore[union-attr]
    with pytest.raises(urllib.error.HTTPError) as unauthorized:
        scrape(port)
    assert unauthorized.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as wrong:
        scrape(port, token="nope")
    assert wrong.value.code == 401
    with pytest.raises(psycopg.OperationalError, match="could not log in upstream"):
        psycopg.connect(refusing.dsn(tls=False))
    samples = scrape(port, token=os.environ[token_env])
    assert value(samples, "pgproxy_upstream_errors_total", kind="login_refused") == 1
    assert value(samples, "pgproxy_connections_total", outcome="refused") == 1

    def unreachable(data: dict[str, Any]) -> None:
        _with_admin(data, tmp_path)
        data["upstream"]["port"] = _free_port()

    down = make_proxy(unreachable)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(down.dsn(tls=False))
    samples = scrape(down.running.server.admin.port)  # type: ignore[union-attr]
    assert value(samples, "pgproxy_upstream_errors_total", kind="connect_failed") == 1
    assert value(samples, "pgproxy_upstream_errors_total", kind="login_refused") == 0


def test_check_reports_an_unset_metrics_token(proxy: ProxyUnderTest, tmp_path: Path) -> None:
    data = copy.deepcopy(proxy.config_data)
    _with_admin(data, tmp_path)
    data["admin"]["metrics_token_env"] = "PGPROXY_TEST_METRICS_TOKEN_UNSET"
    data["audit"] = {"jsonl_path": str(tmp_path / "audit.jsonl")}
    (tmp_path / "pgproxy.yaml").write_text(yaml.safe_dump(data))
    os.environ.pop("PGPROXY_TEST_METRICS_TOKEN_UNSET", None)
    result = CliRunner().invoke(main, ["check", "-c", str(tmp_path / "pgproxy.yaml")])
    assert result.exit_code == 1
    assert "admin.metrics_token_env: environment variable PGPROXY_TEST_METRICS_TOKEN_UNSET is not set" in result.output
