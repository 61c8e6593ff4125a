"""An LLM agent's SQL tool end to end: the real MCP PostgreSQL server, driven by the MCP client SDK over stdio,
connects to the real proxy over TLS with a JWT in its connection URL.

Checks what the agent sees (tools, table schemas, rows, the proxy's refusals, masked values) and what the proxy
records (sessions with the agent's identity, the exact SQL the MCP server sent, policy and approval events).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TextIO

import psycopg
import pytest
from harness import ProxyUnderTest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import MCPError
from mcp.types import CallToolResult, TextContent, TextResourceContents

from pgproxy.policy.approvals import ApprovalRequest, ApprovalStore

pytestmark = pytest.mark.usefixtures("mcp_tables")

POLICY = """
rules:
  - name: agents-no-salaries
    match: {groups: [agents], tables: ["*.mcp_salaries"]}
    action: deny
    message: agents may not read salaries
  - name: payouts-need-approval
    match: {tables: ["*.mcp_payouts"]}
    action: approve
    approvers: [dba]
    timeout: 60
    in_transaction: hold
default: allow
"""

MASKING_RULES = """
tables:
  public.mcp_customers:
    exempt: {groups: [dba]}
    columns:
      email: {mask: email}
      ssn: {mask: partial, keep_last: 4}
      full_name: {mask: keyed_hash}
      salary: {mask: numeric, mode: bucket, step: 10000}
"""
MASKING_KEY_ENV = "PGPROXY_TEST_MCP_MASKING_KEY"

# Raw values that must never reach a masked agent: unusual strings, so a leak cannot pass unnoticed.
CUSTOMERS = [
    (1, "Alice Canary", "alice.canary7731@example.com", "123-45-6789", 91000),
    (2, "Bob Canary", "bob.canary8842@example.org", "987-65-4321", 57000),
]


@pytest.fixture(scope="module")
def mcp_tables(proxy: ProxyUnderTest) -> None:
    """``public.mcp_customers`` (masked in the masking test), ``mcp_salaries`` (denied), ``mcp_payouts`` (approval)."""
    with psycopg.connect(proxy.database.dsn(), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS mcp_customers, mcp_salaries, mcp_payouts")
        conn.execute("CREATE TABLE mcp_customers (id int PRIMARY KEY, full_name text NOT NULL, email text NOT NULL,"
                     " ssn text NOT NULL, salary int NOT NULL)")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO mcp_customers VALUES (%s, %s, %s, %s, %s)", CUSTOMERS)
        conn.execute("CREATE TABLE mcp_salaries (customer_id int, amount int)")
        conn.execute("INSERT INTO mcp_salaries VALUES (1, 91000)")
        conn.execute("CREATE TABLE mcp_payouts (id int, amount int)")
        conn.execute("INSERT INTO mcp_payouts VALUES (1, 250), (2, 975)")
        conn.execute("GRANT SELECT ON mcp_customers, mcp_salaries, mcp_payouts TO agent_reader")


def agent_url(p: ProxyUnderTest, token: str) -> str:
    """What an operator puts in the MCP server's configuration: the proxy's TLS listener, the JWT as password."""
    at_proxy = dataclasses.replace(p.database, host="127.0.0.1", port=p.port)
    return at_proxy.dsn(user="agent_reader", password=token,
                        params={"sslmode": "verify-full", "sslrootcert": str(p.tls.ca_file),
                                "application_name": "mcp-server-postgres"})


@pytest.fixture
def errlog(tmp_path: Path) -> Iterator[TextIO]:
    """The MCP server's stderr (a real file: the SDK hands it to the subprocess)."""
    with open(tmp_path / "mcp-server.stderr", "w+") as f:
        yield f


@pytest.fixture
def connect_agent(mcp_server: Path, errlog: TextIO) -> Callable[[str], Any]:
    """``async with connect_agent(url) as session``: an initialized MCP client session with a fresh server."""

    @asynccontextmanager
    async def connect(url: str) -> AsyncIterator[ClientSession]:
        params = StdioServerParameters(command="node", args=[str(mcp_server), url])
        async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            yield session

    return connect


async def query(session: ClientSession, sql: str) -> list[dict[str, Any]]:
    """Run the ``query`` tool and decode its JSON rows."""
    return tool_rows(await session.call_tool("query", {"sql": sql}))


def tool_rows(result: CallToolResult) -> list[dict[str, Any]]:
    """The rows in a ``query`` tool result (one text block of JSON)."""
    assert not result.is_error, result
    [block] = result.content
    assert isinstance(block, TextContent), block
    rows: list[dict[str, Any]] = json.loads(block.text)
    return rows


async def refused(session: ClientSession, sql: str) -> str:
    """Run the ``query`` tool expecting a failure; returns the error text the agent sees."""
    with pytest.raises(MCPError) as caught:
        await session.call_tool("query", {"sql": sql})
    return caught.value.message


def with_policy(tmp_path: Path) -> Callable[[dict[str, Any]], None]:
    (tmp_path / "policy.yaml").write_text(POLICY)

    def mutate(data: dict[str, Any]) -> None:
        data["policy"] = {"file": str(tmp_path / "policy.yaml")}
        data["approvals"] = {"store": "sqlite", "path": str(tmp_path / "approvals.sqlite3")}

    return mutate


async def pending_request(p: ProxyUnderTest, sql: str, seen: set[str]) -> ApprovalRequest:
    """The new pending approval request for ``sql`` (one not in ``seen``), once the held session created it."""
    store = approval_store(p)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pending = await asyncio.to_thread(p.running.call, store.list("pending"))
        fresh = [r for r in pending if r.sql == sql and r.id not in seen]
        if fresh:
            return fresh[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no pending approval request for {sql!r}")


async def decide(p: ProxyUnderTest, approval_id: str, approve: bool, reason: str | None = None) -> None:
    """What a DBA does with `pgproxy approvals approve|deny`, on the proxy's own store."""
    store = approval_store(p)
    await asyncio.to_thread(p.running.call, store.decide(approval_id, "dba-alice", ["dba"], approve, reason))


def approval_store(p: ProxyUnderTest) -> ApprovalStore:
    assert p.running.server is not None and p.running.server.approval_store is not None
    return p.running.server.approval_store


async def test_agent_discovers_schema_and_queries_with_audit(
        make_proxy: Callable[..., ProxyUnderTest], connect_agent: Callable[[str], Any], tmp_path: Path) -> None:
    p = make_proxy(with_policy(tmp_path))
    token = p.token(sub="mcp-agent", groups=["agents"], agent_id="support-bot", tool_call_id="call-17")
    sql = "SELECT id, email FROM mcp_customers ORDER BY id"
    async with connect_agent(agent_url(p, token)) as session:
        tools = await session.list_tools()
        assert [t.name for t in tools.tools] == ["query"]

        resources = await session.list_resources()
        by_name = {r.name: str(r.uri) for r in resources.resources}
        uri = by_name['"mcp_customers" database schema']
        assert uri.endswith("/mcp_customers/schema")
        assert token not in json.dumps([str(r.uri) for r in resources.resources])  # the URL's password is stripped
        schema = await session.read_resource(uri)
        [contents] = schema.contents
        assert isinstance(contents, TextResourceContents), contents
        columns = json.loads(contents.text)
        assert {c["column_name"]: c["data_type"] for c in columns} == {
            "id": "integer", "full_name": "text", "email": "text", "ssn": "text", "salary": "integer"}

        assert await query(session, sql) == [{"id": c[0], "email": c[2]} for c in CUSTOMERS]
        who = await query(session, "SELECT current_user AS role, current_setting('transaction_read_only') AS ro")
        assert who == [{"role": "agent_reader", "ro": "on"}]

    starts = [e for e in p.events("session_start") if e["identity"]["subject"] == "mcp-agent"]
    assert starts, p.events()
    for start in starts:
        assert start["tls"] is True
        assert start["upstream_role"] == "agent_reader"
        assert start["application_name"] == "mcp-server-postgres"
        assert start["identity"]["agent_id"] == "support-bot"
        assert start["identity"]["tool_call_id"] == "call-17"
    sessions = {e["session"] for e in starts}
    statements = [e for e in p.events("statement") if e["session"] in sessions]
    sent = [e["sql"] for e in statements]
    assert sql in sent
    assert "BEGIN TRANSACTION READ ONLY" in sent and "ROLLBACK" in sent  # the MCP server's own wrapping
    assert any("information_schema.columns" in s for s in sent)  # the schema lookup behind read_resource
    run = next(e for e in statements if e["sql"] == sql)
    assert run["rows"] == len(CUSTOMERS)
    assert run["tags"] == [f"SELECT {len(CUSTOMERS)}"]
    assert "error" not in run
    assert not any(token in json.dumps(e) for e in p.events())  # the JWT is never written to the audit log


async def test_policy_refusal_reaches_the_agent_and_the_session_goes_on(
        make_proxy: Callable[..., ProxyUnderTest], connect_agent: Callable[[str], Any], tmp_path: Path) -> None:
    p = make_proxy(with_policy(tmp_path))
    sql = "SELECT amount FROM mcp_salaries"
    async with connect_agent(agent_url(p, p.token(sub="mcp-agent", groups=["agents"]))) as session:
        message = await refused(session, sql)
        assert message == "pgproxy policy agents-no-salaries: agents may not read salaries"
        assert await query(session, "SELECT count(*)::int AS n FROM mcp_customers") == [{"n": len(CUSTOMERS)}]

    decisions = [e for e in p.events("policy_decision") if e["sql"] == sql]
    assert [(d["decision"], d["rule"]) for d in decisions] == [("deny", "agents-no-salaries")]
    refusal = [e for e in p.events("statement") if e["sql"] == sql]
    assert len(refusal) == 1 and refusal[0]["refused"] is True
    assert refusal[0]["error"]["sqlstate"] == "42501"

    # The rule is for agents: a caller outside the group reads the table through the same tool.
    async with connect_agent(agent_url(p, p.token(sub="analyst", groups=["finance"]))) as session:
        assert await query(session, sql) == [{"amount": 91000}]


async def test_held_statement_runs_after_approval_and_fails_after_denial(
        make_proxy: Callable[..., ProxyUnderTest], connect_agent: Callable[[str], Any], tmp_path: Path) -> None:
    p = make_proxy(with_policy(tmp_path))
    sql = "SELECT id, amount FROM mcp_payouts ORDER BY id"
    seen: set[str] = set()
    async with connect_agent(agent_url(p, p.token(sub="mcp-agent", groups=["agents"]))) as session:
        # The MCP server runs every query inside BEGIN READ ONLY: with `in_transaction: hold` the session waits.
        call = asyncio.create_task(session.call_tool("query", {"sql": sql}))
        first = await pending_request(p, sql, seen)
        seen.add(first.id)
        assert first.requester["subject"] == "mcp-agent"
        assert not call.done()
        await decide(p, first.id, approve=True)
        assert tool_rows(await call) == [{"id": 1, "amount": 250}, {"id": 2, "amount": 975}]

        # The approval was used once: the same query needs a new one, and a denial reaches the agent.
        call = asyncio.create_task(refused(session, sql))
        second = await pending_request(p, sql, seen)
        await decide(p, second.id, approve=False, reason="not during the audit")
        assert await call == f"approval {second.id} denied by dba-alice: not during the audit"

    outcomes = [(e["approval_id"], e["outcome"]) for e in p.events("policy_approval")]
    assert outcomes == [(first.id, "waiting"), (first.id, "used"), (second.id, "waiting"), (second.id, "denied")]


async def test_masked_columns_reach_the_agent_masked(
        make_proxy: Callable[..., ProxyUnderTest], connect_agent: Callable[[str], Any], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    rules = tmp_path / "masking_rules"
    rules.mkdir()
    (rules / "customers.yaml").write_text(MASKING_RULES)
    monkeypatch.setenv(MASKING_KEY_ENV, os.urandom(32).hex())

    def mutate(data: dict[str, Any]) -> None:
        data["masking"] = {"rules_dir": str(rules), "key_env": MASKING_KEY_ENV}

    p = make_proxy(mutate)
    outputs: list[str] = []
    async with connect_agent(agent_url(p, p.token(sub="mcp-agent", groups=["agents"]))) as session:
        rows = await query(session, "SELECT * FROM mcp_customers ORDER BY id")
        outputs.append(json.dumps(rows))
        assert [r["id"] for r in rows] == [c[0] for c in CUSTOMERS]
        assert [r["email"] for r in rows] == ["****@example.com", "****@example.org"]
        assert [r["ssn"] for r in rows] == ["*******6789", "*******4321"]
        names = [r["full_name"] for r in rows]
        assert all(len(n) == 16 and set(n) <= set("0123456789abcdef") for n in names) and names[0] != names[1]
        assert [r["salary"] for r in rows] == [90000, 50000]
        again = await query(session, "SELECT full_name FROM mcp_customers WHERE id = 1")
        assert again == [{"full_name": names[0]}]  # a stable pseudonym, so the agent can still join and group

        # The server only ever sees masked values: filters, aggregates and casts cannot recover raw ones.
        raw_email = CUSTOMERS[0][2]
        for sql in (f"SELECT id FROM mcp_customers WHERE email = '{raw_email}'",
                    "SELECT id FROM mcp_customers WHERE ssn LIKE '123%'",
                    "SELECT string_agg(email || ssn || full_name, ',') AS s FROM mcp_customers",
                    "SELECT row_to_json(c)::text AS j FROM mcp_customers c",
                    "SELECT max(salary) AS m FROM mcp_customers WHERE salary BETWEEN 90001 AND 91000"):
            outputs.append(json.dumps(await query(session, sql)))
        assert outputs[1] == "[]" and outputs[2] == "[]"

        # What the proxy cannot see through is refused, and the agent is told why.
        message = await refused(session, "SELECT query_to_xml('SELECT email FROM mcp_customers', true, false, '')")
        assert message.startswith("pgproxy masking:")
        outputs.append(message)

    leaked = [value for c in CUSTOMERS for value in (c[1], c[2], c[3], str(c[4])) if any(value in o for o in outputs)]
    assert leaked == [], outputs

    # An exempt identity reads the raw values through the same tool.
    async with connect_agent(agent_url(p, p.token(sub="dba-bob", groups=["dba"]))) as session:
        rows = await query(session, "SELECT email, ssn FROM mcp_customers ORDER BY id")
        assert rows == [{"email": c[2], "ssn": c[3]} for c in CUSTOMERS]


async def test_approval_in_the_servers_transaction_reaches_the_agent_at_once(
        make_proxy: Callable[..., ProxyUnderTest], connect_agent: Callable[[str], Any], tmp_path: Path) -> None:
    """The default for refuse-mode rules: no silent hold inside the MCP server's transaction. The agent
    gets the approval id and what to do at once, and its retry runs once the request is approved."""
    (tmp_path / "policy.yaml").write_text(POLICY.replace("    in_transaction: hold\n", ""))

    def mutate(data: dict[str, Any]) -> None:
        data["policy"] = {"file": str(tmp_path / "policy.yaml")}
        data["approvals"] = {"store": "sqlite", "path": str(tmp_path / "approvals.sqlite3")}

    p = make_proxy(mutate)
    sql = "SELECT id, amount FROM mcp_payouts ORDER BY id"
    async with connect_agent(agent_url(p, p.token(sub="mcp-agent", groups=["agents"]))) as session:
        message = await asyncio.wait_for(refused(session, sql), 10)
        request = await pending_request(p, sql, set())
        assert message.startswith(f"approval {request.id} required (rule payouts-need-approval)")
        assert f"`pgproxy approvals approve {request.id}`" in message and "run it again" in message
        await decide(p, request.id, approve=True)
        assert await query(session, sql) == [{"id": 1, "amount": 250}, {"id": 2, "amount": 975}]
