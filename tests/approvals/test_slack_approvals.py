"""Approve / Deny from Slack, through the real proxy, against a local fake of Slack's API (tests/slackfake.py).

An agent's destructive statement needs two DBA approvals (quorum 2). The request is posted to the
fake Slack with buttons; presses come back signed to the admin listener, are mapped to identities
and held to the store's rules; the message is updated with each decision.
"""

from __future__ import annotations

import asyncio
import copy
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml
from approval_helpers import base_config_data, make_request, mint
from click.testing import CliRunner
from harness import ProxyUnderTest
from slackfake import FakeSlack, Message

from pgproxy.audit.sink import MemoryAuditSink
from pgproxy.cli import main
from pgproxy.config import ConfigError, load_config, parse_config
from pgproxy.identity import DevKeys
from pgproxy.policy.approval_factory import build_approval_store
from pgproxy.testing import RunningProxy

DEFAULT_POLICY = Path(__file__).parents[2] / "pgproxy" / "policy" / "default_policy.yaml"
TOKEN_ENV = "PGPROXY_TEST_SLACK_BOT_TOKEN"
SECRET_ENV = "PGPROXY_TEST_SLACK_SIGNING_SECRET"
AGENT = "agent-slack"
APPROVERS = [  # Slack user id -> the identity that decides
    {"slack_user": "U0ALICE", "subject": "alice", "groups": ["dba"]},
    {"slack_user": "U0DAVE", "subject": "dave", "groups": ["dba", "oncall"]},
    {"slack_user": "U0CAROL", "subject": "carol", "groups": ["developers"]},
    {"slack_user": "U0AGENT", "subject": AGENT, "groups": ["dba"]},  # the requester's own account
]


@dataclass
class SlackSetup:
    proxy: ProxyUnderTest
    slack: FakeSlack
    url: str  # the admin listener's /slack/interactions

    def refused_delete(self) -> tuple[str, str]:
        """(table, approval id) of an unfiltered DELETE the agent ran and was refused."""
        table = "slack_" + secrets.token_hex(4)
        with self.agent() as conn:
            conn.execute(f"CREATE TABLE {table} AS SELECT generate_series(1, 3) AS id")
            with pytest.raises(psycopg.Error) as refused:
                conn.execute(f"DELETE FROM {table}")
        assert refused.value.sqlstate == "PXA01"
        match = re.search(r"apr_[0-9a-f]{16}", str(refused.value))
        assert match
        return table, match.group(0)

    def agent(self) -> psycopg.Connection[Any]:
        token = self.proxy.token(sub=AGENT, roles=("agent_writer",), groups=("agents",))
        conn = psycopg.connect(**self.proxy.conninfo(user="agent_writer", token=token))  # type: ignore[arg-type]
        conn.autocommit = True
        return conn

    def status(self, approval_id: str) -> str:
        store = self.proxy.running.server.approval_store  # type: ignore[union-attr]
        request = self.proxy.running.call(store.get(approval_id))
        assert request is not None
        return str(request.status)


@pytest.fixture(scope="module")
def setup(proxy: ProxyUnderTest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlackSetup]:
    tmp = tmp_path_factory.mktemp("slack")
    slack = FakeSlack(users={a["slack_user"] for a in APPROVERS} | {"U0STRANGER"}).start()
    os.environ[TOKEN_ENV], os.environ[SECRET_ENV] = slack.token, slack.signing_secret
    policy = yaml.safe_load(DEFAULT_POLICY.read_text())
    policy["rules"][1]["approvals"] = 2  # dba-approves-destructive: a quorum of two
    (tmp / "policy.yaml").write_text(yaml.safe_dump(policy))
    data = copy.deepcopy(proxy.config_data)
    data["policy"] = {"file": str(tmp / "policy.yaml")}
    data["approvals"] = {"store": "sqlite", "path": str(tmp / "approvals.sqlite"), "slack": {
        "channel": "C0APPROVALS", "bot_token_env": TOKEN_ENV, "signing_secret_env": SECRET_ENV,
        "api_url": slack.api_url, "approvers": APPROVERS}}
    data["admin"] = {"host": "127.0.0.1", "port": 0, "ui": False}
    audit = MemoryAuditSink()
    running = RunningProxy(parse_config(data, Path.cwd()), audit=audit).start()
    assert running.server is not None and running.server.admin is not None
    try:
        yield SlackSetup(ProxyUnderTest(running, audit, proxy.keys, proxy.tls, proxy.database, data), slack,
                         f"http://127.0.0.1:{running.server.admin.port}/slack/interactions")
    finally:
        running.stop()
        slack.stop()
        os.environ.pop(TOKEN_ENV, None)
        os.environ.pop(SECRET_ENV, None)


def context_text(message: Message) -> str:
    return " ".join(e["text"] for b in message.blocks if b["type"] == "context" for e in b["elements"])


def has_buttons(message: Message) -> bool:
    return any(b["type"] == "actions" for b in message.blocks)


def ephemeral_for(slack: FakeSlack, user: str) -> str:
    deadline = time.monotonic() + 5
    while not (said := [e["text"] for e in slack.ephemerals if e["user"] == user]):
        assert time.monotonic() < deadline, f"{user} was told nothing"
        time.sleep(0.05)
    return said[-1]


def test_two_approvers_approve_from_slack_and_the_message_follows(setup: SlackSetup) -> None:
    table, apr = setup.refused_delete()
    message = setup.slack.wait_for_message(apr)
    assert f"DELETE FROM {table}" in message.text and AGENT in message.text
    buttons = [e for b in message.blocks if b["type"] == "actions" for e in b["elements"]]
    assert [(e["text"]["text"], e["value"]) for e in buttons] == [("Approve", apr), ("Deny", apr)]

    assert setup.slack.send(setup.url, setup.slack.press(message, "pgproxy_approve", "U0ALICE")).status_code == 200
    assert message.updates == 1
    assert "approved by alice — the request is pending (1 of 2 approvals)" in context_text(message)
    assert has_buttons(message)  # one more approval needed
    assert setup.status(apr) == "pending"

    assert setup.slack.send(setup.url, setup.slack.press(message, "pgproxy_approve", "U0DAVE")).status_code == 200
    assert message.updates == 2
    assert "approved by alice; approved by dave — the request is approved" in context_text(message)
    assert not has_buttons(message)
    with setup.agent() as conn:
        assert conn.execute(f"DELETE FROM {table}").rowcount == 3
    decided = [e for e in setup.proxy.audit.events if e.get("event") == "approval_decided"
               and e["approval_id"] == apr]
    assert [(e["approver"], e["approver_groups"]) for e in decided] == [("alice", ["dba"]),
                                                                        ("dave", ["dba", "oncall"])]
    assert setup.slack.refused == []  # every call pgproxy made was one Slack accepts


def test_the_same_rules_hold_for_slack_approvers(setup: SlackSetup) -> None:
    _, apr = setup.refused_delete()
    message = setup.slack.wait_for_message(apr)
    slack, url = setup.slack, setup.url

    assert slack.send(url, slack.press(message, "pgproxy_approve", "U0CAROL")).status_code == 200
    assert "not in an approver group" in ephemeral_for(slack, "U0CAROL")
    assert slack.send(url, slack.press(message, "pgproxy_approve", "U0AGENT")).status_code == 200
    assert "own request" in ephemeral_for(slack, "U0AGENT")
    assert slack.send(url, slack.press(message, "pgproxy_approve", "U0STRANGER")).status_code == 200
    assert "not a pgproxy approver" in ephemeral_for(slack, "U0STRANGER")
    assert message.updates == 0 and setup.status(apr) == "pending"

    assert slack.send(url, slack.press(message, "pgproxy_approve", "U0ALICE")).status_code == 200
    assert slack.send(url, slack.press(message, "pgproxy_approve", "U0ALICE")).status_code == 200
    assert "already decided" in ephemeral_for(slack, "U0ALICE")
    assert slack.send(url, slack.press(message, "pgproxy_deny", "U0DAVE")).status_code == 200
    assert "approved by alice; denied by dave — the request is denied" in context_text(message)
    assert not has_buttons(message) and setup.status(apr) == "denied"


def test_unsigned_stale_and_replayed_requests_are_refused(setup: SlackSetup) -> None:
    _, apr = setup.refused_delete()
    message = setup.slack.wait_for_message(apr)
    slack, url = setup.slack, setup.url

    forged = slack.press(message, "pgproxy_approve", "U0ALICE", secret="not-the-signing-secret")
    answer = slack.send(url, forged)
    assert answer.status_code == 401 and "bad X-Slack-Signature" in answer.text
    stale = slack.press(message, "pgproxy_approve", "U0ALICE", timestamp=int(time.time()) - 301)
    answer = slack.send(url, stale)
    assert answer.status_code == 401 and "stale" in answer.text
    future = slack.press(message, "pgproxy_approve", "U0ALICE", timestamp=int(time.time()) + 301)
    assert slack.send(url, future).status_code == 401
    unsigned = slack.press(message, "pgproxy_approve", "U0ALICE")
    answer = httpx.post(url, content=unsigned.body, headers={"Content-Type": "application/x-www-form-urlencoded"},
                        timeout=10, trust_env=False)
    assert answer.status_code == 401
    tampered = slack.press(message, "pgproxy_approve", "U0ALICE")
    tampered.body = tampered.body.replace(b"U0ALICE", b"U0DAVE")
    assert slack.send(url, tampered).status_code == 401
    assert setup.status(apr) == "pending" and message.updates == 0

    accepted = slack.press(message, "pgproxy_approve", "U0ALICE")
    assert slack.send(url, accepted).status_code == 200
    assert message.updates == 1
    answer = slack.send(url, accepted)  # the very same request again
    assert answer.status_code == 401 and "replayed" in answer.text
    assert message.updates == 1


@pytest.mark.parametrize(("slack", "message"), [
    ({"channel": "C1", "bot_token_env": "T", "signing_secret_env": "S"}, "approvals.slack.approvers: required"),
    ({"channel": "C1", "bot_token_env": "T", "signing_secret_env": "S",
      "approvers": [{"slack_user": "U1", "subject": "a"}]}, "approvals.slack.approvers[0].groups"),
    ({"channel": "C1", "bot_token_env": "T", "signing_secret_env": "S", "api_url": "http://slack.example.com/",
      "approvers": [{"slack_user": "U1", "subject": "a", "groups": ["dba"]}]}, "approvals.slack.api_url"),
    ({"bot_token_env": "T", "signing_secret_env": "S",
      "approvers": [{"slack_user": "U1", "subject": "a", "groups": ["dba"]}]}, "approvals.slack.channel: required"),
])
def test_slack_config_mistakes_are_reported(proxy: ProxyUnderTest, slack: dict[str, Any], message: str) -> None:
    data = copy.deepcopy(proxy.config_data)
    data["approvals"] = {"store": "sqlite", "path": "a.sqlite", "slack": slack}
    data["admin"] = {}
    with pytest.raises(ConfigError) as raised:
        parse_config(data, Path.cwd())
    assert message in str(raised.value)
    del data["admin"]
    data["approvals"]["slack"] = {"channel": "C1", "bot_token_env": "T", "signing_secret_env": "S",
                                  "approvers": [{"slack_user": "U1", "subject": "a", "groups": ["dba"]}]}
    with pytest.raises(ConfigError, match="needs an admin section"):
        parse_config(data, Path.cwd())


def test_the_approvals_cli_works_without_the_slack_token(tmp_path: Path, dev_keys: DevKeys,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """`pgproxy approvals` shares the config but never posts: it must not need the bot token."""
    monkeypatch.delenv("PGPROXY_TEST_SLACK_TOKEN_UNSET", raising=False)
    slack = {"channel": "C1", "bot_token_env": "PGPROXY_TEST_SLACK_TOKEN_UNSET", "signing_secret_env": "S",
             "approvers": [{"slack_user": "U1", "subject": "alice", "groups": ["dba"]}]}
    path = tmp_path / "pgproxy.yaml"
    path.write_text(yaml.safe_dump(base_config_data(dev_keys, approvals={"path": "a.sqlite3", "slack": slack},
                                                    admin={"port": 0})))

    async def create() -> str:
        store = build_approval_store(load_config(path))
        try:
            return (await store.create(make_request())).id
        finally:
            await store.close()
    approval_id = asyncio.run(create())
    assert "environment variable PGPROXY_TEST_SLACK_TOKEN_UNSET is not set" in caplog.text  # logged, not raised
    result = CliRunner().invoke(main, ["approvals", "approve", approval_id, "-c", str(path),
                                       "--token", mint(dev_keys, "alice", ["dba"])], catch_exceptions=False)
    assert result.exit_code == 0 and "request is now approved" in result.output, result.output
