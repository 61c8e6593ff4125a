"""The admin web UI end to end in headless Chromium (Playwright driving Debian's /usr/bin/chromium).

One real proxy for the module: TLS listeners, the shipped default policy, SQLite approvals, a signed
audit log and the admin listener over TLS. Agents run statements through it with psycopg; approvers
and analysts use the UI in the browser. Screenshots of each page are checked for real content.
"""

from __future__ import annotations

import copy
import re
import secrets
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from harness import ProxyUnderTest

from pgproxy.audit.keys import generate_key
from pgproxy.audit.logformat import iter_records
from pgproxy.config import parse_config
from pgproxy.testing import RunningProxy

CHROMIUM = Path("/usr/bin/chromium")
DEFAULT_POLICY = Path(__file__).parents[2] / "pgproxy" / "policy" / "default_policy.yaml"

if not CHROMIUM.exists():
    pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)", allow_module_level=True)

from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright  # noqa: E402


@dataclass
class Admin:
    proxy: ProxyUnderTest
    base: str  # https://127.0.0.1:<admin port>
    log_dir: Path
    shots: Path

    def agent_conn(self, subject: str) -> psycopg.Connection[Any]:
        token = self.proxy.token(sub=subject, roles=("agent_writer",), groups=("agents",))
        conn = psycopg.connect(**self.proxy.conninfo(user="agent_writer", token=token))  # type: ignore[arg-type]
        conn.autocommit = True
        return conn

    def person(self, subject: str, groups: list[str]) -> str:
        return self.proxy.token(sub=subject, groups=groups)


@pytest.fixture(scope="module")
def admin(proxy: ProxyUnderTest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Admin]:
    tmp = tmp_path_factory.mktemp("admin-ui")
    key = tmp / "audit.key"
    generate_key(key)
    data = copy.deepcopy(proxy.config_data)
    tls = {"cert_file": str(proxy.tls.cert_file), "key_file": str(proxy.tls.key_file)}
    data["audit"] = {"dir": str(tmp / "log"), "signing_key_file": str(key), "fsync": "always", "max_result_rows": 3}
    data["policy"] = {"file": str(DEFAULT_POLICY)}
    data["approvals"] = {"store": "sqlite", "path": str(tmp / "approvals.sqlite")}
    data["admin"] = {"host": "127.0.0.1", "port": 0, "tls": tls, "analyst_groups": ["auditors", "dba"]}
    running = RunningProxy(parse_config(data, Path.cwd())).start()
    assert running.server is not None and running.server.admin is not None
    under = ProxyUnderTest(running, proxy.audit, proxy.keys, proxy.tls, proxy.database, data)
    try:
        yield Admin(under, f"https://127.0.0.1:{running.server.admin.port}", tmp / "log",
                    tmp_path_factory.mktemp("screenshots"))
    finally:
        running.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM))
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 800})
    ctx.set_default_timeout(15_000)
    try:
        yield ctx
    finally:
        ctx.close()


def login(page: Page, admin: Admin, token: str) -> None:
    page.goto(admin.base + "/ui/")
    expect(page).to_have_url(re.compile(r"/ui/login$"))
    page.fill("#token", token)
    page.click("#login-form button[type=submit]")


def screenshot(page: Page, admin: Admin, name: str) -> None:
    """A full-page PNG that is a real rendering: sane dimensions, many distinct byte values, not tiny."""
    path = admin.shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width == 1280 and height >= 400, (width, height)
    idat, pos = b"", 8
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        if kind == b"IDAT":
            idat += png[pos + 8:pos + 8 + length]
        pos += 12 + length
    pixels = zlib.decompress(idat)
    assert len(set(pixels)) > 64, f"{name}: the screenshot is (nearly) a single colour"
    assert len(png) > 15_000, f"{name}: the screenshot is suspiciously small ({len(png)} bytes)"


def approval_id(exc: BaseException) -> str:
    match = re.search(r"apr_[0-9a-f]{16}", str(exc))
    assert match, str(exc)
    return match.group(0)


def wait_for_session_end(log_dir: Path, subject: str) -> str:
    """The proxy session id of ``subject``'s session, once its session_end is in the log."""
    deadline = time.monotonic() + 15
    while True:
        events = [rec["event"] for _, rec in iter_records(log_dir)]
        sid = next((e["session"] for e in events if e.get("event") == "session_start"
                    and e["identity"]["subject"] == subject), None)
        if sid and any(e.get("event") == "session_end" and e.get("session") == sid for e in events):
            return sid
        assert time.monotonic() < deadline, f"no session_end of {subject} in the log"
        time.sleep(0.05)


def test_approve_in_ui_then_replay_the_verified_session(admin: Admin, context: BrowserContext) -> None:
    subject = "agent-ui-" + secrets.token_hex(3)
    table = "ui_orders_" + secrets.token_hex(3)
    page = context.new_page()
    with admin.agent_conn(subject) as conn:
        conn.execute(f"CREATE TABLE {table} (id int, note text)")
        conn.execute(f"INSERT INTO {table} SELECT g, 'note <b>' || g FROM generate_series(1, 4) g")
        assert len(conn.execute(f"SELECT id, note FROM {table} ORDER BY id").fetchall()) == 4
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        with pytest.raises(psycopg.Error) as refused:
            conn.execute(f"DELETE FROM {table}")
        assert refused.value.sqlstate == "PXA01"
        apr = approval_id(refused.value)

        login(page, admin, admin.person("dba-alice", ["dba"]))
        expect(page).to_have_url(re.compile(r"/ui/approvals$"))
        expect(page.locator("#whoami")).to_have_text("dba-alice")
        card = page.locator(f"#approval-{apr}")
        expect(card.locator("pre.sql")).to_have_text(f"DELETE FROM {table}")
        expect(card.locator(".requester")).to_contain_text(subject)
        expect(card.locator(".rule")).to_contain_text("dba-approves-destructive")
        expect(card).to_contain_text("old, expires")
        screenshot(page, admin, "approvals")
        cookie = next(c for c in context.cookies() if c["name"] == "pgproxy_ui")
        assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"

        card.locator("input[name=reason]").fill("stale test rows <ok>")
        card.locator("button.approve").click()
        expect(page.locator("#flash")).to_have_text(f"approved {apr}: the request is now approved")
        expect(page.locator(f"#history-{apr}")).to_contain_text("approved by dba-alice: stale test rows <ok>")

        assert conn.execute(f"DELETE FROM {table}").rowcount == 4  # the identical statement now runs, once
    session = wait_for_session_end(admin.log_dir, subject)
    page.reload()
    expect(page.locator(f"#history-{apr} .badge")).to_have_text("used")

    page.click("#nav-sessions")
    row = page.locator(f"tr.session-row[data-session='{session}']")
    expect(row.locator(".subject")).to_have_text(subject)
    expect(row.locator(".statements")).to_have_text("6")
    expect(row.locator(".errors")).to_have_text("2")  # 1/0 and the refused DELETE
    expect(page.locator("#log-status")).to_contain_text("Signed log verifies")
    screenshot(page, admin, "sessions")

    row.locator("a").click()
    expect(page).to_have_url(re.compile(f"/ui/sessions/{session}$"))
    expect(page.locator("#session-status")).to_have_text("verified")
    statuses = page.locator("li.event .record-status").all_inner_texts()
    assert statuses and set(statuses) == {"verified"}
    statements = page.locator("li.event.statement pre.sql").all_inner_texts()
    assert statements == [f"CREATE TABLE {table} (id int, note text)",
                          f"INSERT INTO {table} SELECT g, 'note <b>' || g FROM generate_series(1, 4) g",
                          f"SELECT id, note FROM {table} ORDER BY id", "SELECT 1/0",
                          f"DELETE FROM {table}", f"DELETE FROM {table}"]
    select = page.locator("li.event.statement").nth(2)
    expect(select.locator("table.rows td")).to_have_text(["1", "note <b>1", "2", "note <b>2", "3", "note <b>3"])
    expect(select).to_contain_text("first 3 rows shown")
    expect(page.locator("li.event.statement").nth(3).locator(".error")).to_contain_text("ERROR 22012")
    expect(page.locator("li.event.policy_approval").last).to_contain_text(
        "approved by dba-alice")
    expect(page.locator("li.event.policy_approval").last).to_contain_text("stale test rows <ok>")
    assert page.locator("b").count() == 0  # escaped, never markup
    kinds = page.locator("li.event").evaluate_all("els => els.map(e => e.dataset.kind)")
    assert kinds[0] == "session_start" and kinds[-1] == "session_end" and "policy_decision" in kinds
    screenshot(page, admin, "session")


def test_bad_and_unprivileged_tokens_are_refused(admin: Admin, context: BrowserContext) -> None:
    page = context.new_page()
    login(page, admin, "not.a.jwt")
    expect(page.locator("#login-error")).to_contain_text("invalid token")
    login(page, admin, admin.person("dba-bob", ["dba"]).replace(".", ".x", 1))
    expect(page.locator("#login-error")).to_contain_text("invalid token")
    login(page, admin, admin.proxy.token(sub="agent-x", groups=["agents"]))
    expect(page.locator("#login-error")).to_contain_text("neither an approver nor an analyst")
    screenshot(page, admin, "login-refused")
    assert not [c for c in context.cookies() if c["name"] == "pgproxy_ui"]
    response = page.goto(admin.base + "/ui/sessions")
    assert response is not None and response.status == 200
    expect(page).to_have_url(re.compile(r"/ui/login$"))
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert response.headers["cache-control"] == "no-store"
    missing = page.goto(admin.base + "/ui/no-such-page")
    assert missing is not None and missing.status == 404


def test_post_without_csrf_token_is_refused(admin: Admin, context: BrowserContext) -> None:
    table = "ui_csrf_" + secrets.token_hex(3)
    with admin.agent_conn("agent-csrf") as conn:
        conn.execute(f"CREATE TABLE {table} (id int)")
        with pytest.raises(psycopg.Error) as refused:
            conn.execute(f"DROP TABLE {table}")
    apr = approval_id(refused.value)
    page = context.new_page()
    login(page, admin, admin.person("dba-carol", ["dba"]))
    card = page.locator(f"#approval-{apr}")
    card.locator("input[name=csrf]").evaluate("e => e.remove()")
    with page.expect_response(re.compile(f"/ui/approvals/{apr}/decide$")) as answer:
        card.locator("button.approve").click()
    assert answer.value.status == 403
    expect(page.locator("#error-message")).to_contain_text("CSRF")
    response = page.request.post(f"{admin.base}/ui/approvals/{apr}/decide",
                                 form={"action": "approve", "csrf": "forged"}, max_redirects=0)
    assert response.status == 403
    page.goto(admin.base + "/ui/approvals")
    expect(page.locator(f"#approval-{apr}")).to_have_attribute("data-status", "pending")


def test_analyst_views_but_cannot_approve(admin: Admin, context: BrowserContext) -> None:
    table = "ui_analyst_" + secrets.token_hex(3)
    with admin.agent_conn("agent-analysed") as conn:
        conn.execute(f"CREATE TABLE {table} (id int)")
        with pytest.raises(psycopg.Error) as refused:
            conn.execute(f"TRUNCATE {table}")
    apr = approval_id(refused.value)
    page = context.new_page()
    login(page, admin, admin.person("auditor-dave", ["auditors"]))
    card = page.locator(f"#approval-{apr}")
    expect(card.locator("pre.sql")).to_have_text(f"TRUNCATE {table}")
    expect(card.locator(".read-only")).to_be_visible()
    assert card.locator("form.decide").count() == 0
    expect(page.locator(".who")).to_contain_text("analyst")
    csrf = page.locator("header form input[name=csrf]").get_attribute("value")
    response = page.request.post(f"{admin.base}/ui/approvals/{apr}/decide",
                                 form={"action": "approve", "csrf": csrf or "", "reason": "looks fine"},
                                 max_redirects=0)
    assert response.status == 403 and "approver group" in response.text()
    page.goto(admin.base + "/ui/sessions")
    expect(page.locator("#sessions")).to_be_visible()
    page.goto(admin.base + "/ui/approvals")
    expect(card).to_have_attribute("data-status", "pending")


def test_jsonl_audit_says_the_signed_log_is_not_configured(admin: Admin, context: BrowserContext,
                                                          tmp_path: Path) -> None:
    data = copy.deepcopy(admin.proxy.config_data)
    data["audit"] = {"jsonl_path": str(tmp_path / "audit.jsonl")}
    data["admin"] = {"host": "127.0.0.1", "port": 0}
    with RunningProxy(parse_config(data, Path.cwd())) as running:
        assert running.server is not None and running.server.admin is not None
        base = f"http://127.0.0.1:{running.server.admin.port}"
        page = context.new_page()
        page.goto(base + "/ui/login")
        page.fill("#token", admin.person("dba-erin", ["dba"]))
        page.click("#login-form button[type=submit]")
        expect(page.locator("#whoami")).to_have_text("dba-erin")
        page.click("#nav-sessions")
        expect(page.locator("#no-signed-log")).to_contain_text("signed audit log is not configured")
        expect(page.locator("#no-signed-log")).to_contain_text("audit.jsonl")


def test_search_the_central_store_with_filters(admin: Admin, context: BrowserContext, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    schema = "ui_store_" + secrets.token_hex(3)
    monkeypatch.setenv("PGPROXY_TEST_UI_STORE_DSN", admin.proxy.database.dsn())
    generate_key(tmp_path / "audit.key")
    data = copy.deepcopy(admin.proxy.config_data)
    data["audit"] = {"dir": str(tmp_path / "log"), "signing_key_file": str(tmp_path / "audit.key"),
                     "fsync": "always", "store_dsn_env": "PGPROXY_TEST_UI_STORE_DSN", "store_schema": schema}
    data["admin"] = {"host": "127.0.0.1", "port": 0, "analyst_groups": ["auditors"]}
    with RunningProxy(parse_config(data, Path.cwd())) as running:
        assert running.server is not None and running.server.admin is not None
        under = ProxyUnderTest(running, admin.proxy.audit, admin.proxy.keys, admin.proxy.tls, admin.proxy.database,
                               data)
        for subject, sql in (("agent-searched", "select 'needle'"), ("agent-other", "select 'haystack'")):
            with psycopg.connect(**under.conninfo(token=under.token(sub=subject)), autocommit=True) as conn:
                conn.execute(sql.encode())  # type: ignore[call-overload]
        deadline = time.monotonic() + 15  # shipped in the background, about once a second
        with psycopg.connect(admin.proxy.database.dsn(), autocommit=True) as store:
            def shipped() -> int:  # the shipper creates the table on its first pass, which may not have run yet
                if store.execute(f"SELECT to_regclass('{schema}.records')").fetchone() == (None,):
                    return 0
                row = store.execute(f"SELECT count(*) FROM {schema}.records WHERE kind = 'session_end'").fetchone()
                return int(row[0]) if row else 0

            while shipped() != 2:
                assert time.monotonic() < deadline, "records were not shipped"
                time.sleep(0.2)
        base = f"http://127.0.0.1:{running.server.admin.port}"
        page = context.new_page()
        page.goto(base + "/ui/login")
        page.fill("#token", admin.person("auditor-sam", ["auditors"]))
        page.click("#login-form button[type=submit]")
        page.click("#nav-search")
        page.fill("#search-subject", "agent-searched")
        page.fill("#search-kind", "statement")
        page.click("#search-form button[type=submit]")
        expect(page.locator("#hits .hit")).to_have_count(1)
        expect(page.locator("#hits .sql")).to_have_text("select 'needle'")
        page.goto(base + "/ui/search?text=haystack&kind=statement")
        expect(page.locator("#hits .sql")).to_have_text("select 'haystack'")
        page.goto(base + "/ui/search?subject=nobody")
        expect(page.locator("#no-hits")).to_be_visible()
