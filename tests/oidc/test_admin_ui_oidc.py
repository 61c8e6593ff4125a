"""Admin UI login through the real OpenID provider (authorization code + PKCE) in headless Chromium.

The proxy trusts the provider for both doors: people's ID tokens on the wire (``identity.discovery``)
and the UI's own OIDC client (``admin.oidc``). A person runs a destructive statement through the proxy
with their ID token, may not approve it themselves, and a second approver from the provider does.
"""

from __future__ import annotations

import copy
import os
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from harness import ProxyUnderTest
from oidcprovider import (
    ADMIN_CLIENT,
    ADMIN_SECRET,
    CLI_CLIENT,
    PASSWORDS,
    SHORT_ADMIN_CLIENT,
    OpenIDProvider,
    device_flow_tokens,
)

from pgproxy.audit.sink import MemoryAuditSink
from pgproxy.config import ConfigError, parse_config
from pgproxy.testing import RunningProxy

CHROMIUM = Path("/usr/bin/chromium")
DEFAULT_POLICY = Path(__file__).parents[2] / "pgproxy" / "policy" / "default_policy.yaml"
SECRET_ENV = "PGPROXY_TEST_OIDC_ADMIN_SECRET"

if not CHROMIUM.exists():
    pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)", allow_module_level=True)

from playwright.sync_api import Browser, BrowserContext, Page, Request, expect  # noqa: E402


@dataclass
class OidcAdmin:
    proxy: ProxyUnderTest
    op: OpenIDProvider
    base: str  # http://127.0.0.1:<admin port> (loopback: the admin listener may be plaintext)
    shots: Path

    def person_conn(self, user: str) -> psycopg.Connection[Any]:
        """``user`` at psql: their ID token from the provider is the password."""
        token = device_flow_tokens(self.op, CLI_CLIENT, user)["id_token"]
        conn = psycopg.connect(**self.proxy.conninfo(user="agent_writer", token=token))  # type: ignore[arg-type]
        conn.autocommit = True
        return conn


@contextmanager
def running_admin(proxy: ProxyUnderTest, op: OpenIDProvider, tmp_path_factory: pytest.TempPathFactory,
                  client_id: str = ADMIN_CLIENT) -> Iterator[OidcAdmin]:
    tmp = tmp_path_factory.mktemp("admin-oidc")
    os.environ[SECRET_ENV] = ADMIN_SECRET
    data = copy.deepcopy(proxy.config_data)
    data["identity"] = {"issuer": op.issuer, "audience": CLI_CLIENT, "algorithms": ["RS256"], "discovery": True}
    data["policy"] = {"file": str(DEFAULT_POLICY)}
    data["approvals"] = {"store": "sqlite", "path": str(tmp / "approvals.sqlite")}
    data["admin"] = {"host": "127.0.0.1", "port": 0, "analyst_groups": ["auditors", "dba"],
                     "oidc": {"issuer": op.issuer, "client_id": client_id,
                              "client_secret_env": SECRET_ENV, "scopes": ["openid", "email", "groups"]}}
    audit = MemoryAuditSink()
    running = RunningProxy(parse_config(data, Path.cwd()), audit=audit).start()
    assert running.server is not None and running.server.admin is not None
    under = ProxyUnderTest(running, audit, proxy.keys, proxy.tls, proxy.database, data)
    try:
        yield OidcAdmin(under, op, f"http://127.0.0.1:{running.server.admin.port}",
                        tmp_path_factory.mktemp("screenshots"))
    finally:
        running.stop()
        os.environ.pop(SECRET_ENV, None)


@pytest.fixture(scope="module")
def oidc_admin(proxy: ProxyUnderTest, openid_provider: OpenIDProvider,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcAdmin]:
    with running_admin(proxy, openid_provider, tmp_path_factory) as admin:
        yield admin


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    ctx.set_default_timeout(15_000)
    try:
        yield ctx
    finally:
        ctx.close()


def sign_in(page: Page, admin: OidcAdmin, user: str, password: str | None = None) -> list[str]:
    """Log in to the UI through the provider's sign-in page; the authorization requests the browser sent."""
    sent: list[str] = []

    def record(request: Request) -> None:
        if request.url.startswith(admin.op.issuer + "/auth?"):
            sent.append(request.url)

    page.on("request", record)
    page.goto(admin.base + "/ui/")
    expect(page).to_have_url(re.compile(r"/ui/login$"))
    page.click("#oidc-login")
    expect(page).to_have_url(re.compile(r"/interaction/"))
    page.fill("#login", user)
    page.fill("#password", password or PASSWORDS[user])
    page.click("#login-form button[type=submit]")
    page.wait_for_load_state()
    page.remove_listener("request", record)
    return sent


def approval_id(exc: BaseException) -> str:
    match = re.search(r"apr_[0-9a-f]{16}", str(exc))
    assert match, str(exc)
    return match.group(0)


def test_code_flow_with_pkce_logs_in_and_the_same_approver_rules_hold(oidc_admin: OidcAdmin,
                                                                      browser: Browser) -> None:
    table = "oidc_orders_" + secrets.token_hex(3)
    with oidc_admin.person_conn("alice") as conn:
        conn.execute(f"CREATE TABLE {table} (id int)")
        conn.execute(f"INSERT INTO {table} SELECT generate_series(1, 3)")
        with pytest.raises(psycopg.Error) as refused:
            conn.execute(f"DELETE FROM {table}")
        assert refused.value.sqlstate == "PXA01"
        apr = approval_id(refused.value)

        alice = browser.new_context(viewport={"width": 1280, "height": 800})
        page = alice.new_page()
        sent = sign_in(page, oidc_admin, "alice")
        assert len(sent) == 1
        assert "code_challenge_method=S256" in sent[0] and "code_challenge=" in sent[0]
        assert "response_type=code" in sent[0] and "nonce=" in sent[0]
        expect(page).to_have_url(re.compile(r"/ui/approvals$"))
        expect(page.locator("#whoami")).to_have_text("alice")
        expect(page.locator(".who")).to_contain_text("dba")
        cookie = next(c for c in alice.cookies() if c["name"] == "pgproxy_ui")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        page.screenshot(path=str(oidc_admin.shots / "oidc-approvals.png"), full_page=True)
        card = page.locator(f"#approval-{apr}")
        expect(card.locator("pre.sql")).to_have_text(f"DELETE FROM {table}")
        # no self-approval: alice asked, alice may not decide
        assert card.locator("button.approve").count() == 0 or not card.locator("button.approve").is_enabled()
        csrf = page.locator("header form input[name=csrf]").get_attribute("value") or ""
        own = page.request.post(f"{oidc_admin.base}/ui/approvals/{apr}/decide",
                                form={"action": "approve", "csrf": csrf}, max_redirects=0)
        assert own.status == 403 and "own request" in own.text()
        alice.close()

        dave = browser.new_context(viewport={"width": 1280, "height": 800})
        page = dave.new_page()
        sign_in(page, oidc_admin, "dave")
        expect(page.locator("#whoami")).to_have_text("dave")
        page.locator(f"#approval-{apr} button.approve").click()
        expect(page.locator("#flash")).to_have_text(f"approved {apr}: the request is now approved")
        assert conn.execute(f"DELETE FROM {table}").rowcount == 3
        dave.close()
    decided = [e for e in oidc_admin.proxy.audit.events
               if e.get("event") == "approval_decided" and e["approval_id"] == apr]
    assert [e["approver"] for e in decided] == ["dave"]


def test_user_outside_the_approver_groups_is_refused(oidc_admin: OidcAdmin, context: BrowserContext) -> None:
    page = context.new_page()
    sign_in(page, oidc_admin, "carol")
    expect(page.locator("#login-error")).to_contain_text("carol is neither an approver nor an analyst")
    assert not [c for c in context.cookies() if c["name"] == "pgproxy_ui"]
    page.goto(oidc_admin.base + "/ui/approvals")
    expect(page).to_have_url(re.compile(r"/ui/login$"))


def test_analyst_views_but_cannot_decide(oidc_admin: OidcAdmin, context: BrowserContext) -> None:
    page = context.new_page()
    sign_in(page, oidc_admin, "bob")
    expect(page).to_have_url(re.compile(r"/ui/approvals$"))
    expect(page.locator(".who")).to_contain_text("analyst")
    assert page.locator("button.approve").count() == 0


def test_wrong_password_stays_at_the_provider(oidc_admin: OidcAdmin, context: BrowserContext) -> None:
    page = context.new_page()
    sign_in(page, oidc_admin, "alice", "not-her-password")
    expect(page.locator("#error")).to_have_text("wrong user or password")
    assert not [c for c in context.cookies() if c["name"] == "pgproxy_ui"]


def test_pasted_tokens_are_off_when_oidc_is_configured(oidc_admin: OidcAdmin, context: BrowserContext) -> None:
    page = context.new_page()
    page.goto(oidc_admin.base + "/ui/login")
    expect(page.locator("#oidc-login")).to_be_visible()
    assert page.locator("#token").count() == 0
    page.screenshot(path=str(oidc_admin.shots / "oidc-login.png"), full_page=True)
    csrf = next(c["value"] for c in context.cookies() if c["name"] == "pgproxy_ui_login")
    token = device_flow_tokens(oidc_admin.op, CLI_CLIENT, "alice")["id_token"]
    answer = page.request.post(oidc_admin.base + "/ui/login", form={"csrf": csrf, "token": token},
                               max_redirects=0)
    assert answer.status == 403 and "admin.token_login" in answer.text()


def test_callback_needs_the_state_this_browser_started(oidc_admin: OidcAdmin, context: BrowserContext) -> None:
    page = context.new_page()
    answer = page.goto(oidc_admin.base + "/ui/oidc/callback?state=forged&code=stolen")
    assert answer is not None and answer.status == 401
    expect(page.locator("#login-error")).to_contain_text("state mismatch")
    # a state started in another browser is refused in this one
    other = context.browser.new_context() if context.browser else None
    assert other is not None
    started = other.new_page()
    started.goto(oidc_admin.base + "/ui/oidc/start")
    expect(started).to_have_url(re.compile(r"/interaction/"))
    state = next(c["value"] for c in other.cookies() if c["name"] == "pgproxy_ui_oidc")
    other.close()
    answer = page.goto(f"{oidc_admin.base}/ui/oidc/callback?state={state}&code=whatever")
    assert answer is not None and answer.status == 401
    answer = page.goto(oidc_admin.base + "/ui/oidc/callback?error=access_denied&state=x")
    assert answer is not None and answer.status == 401
    expect(page.locator("#login-error")).to_contain_text("access_denied")


def test_logout_ends_the_session_here_and_at_the_provider(oidc_admin: OidcAdmin, context: BrowserContext) -> None:
    page = context.new_page()
    sign_in(page, oidc_admin, "bob")
    expect(page.locator("#whoami")).to_have_text("bob")
    with page.expect_request(re.compile(re.escape(oidc_admin.op.issuer) + r"/session/end\?")) as ended:
        page.click("header form button")
    assert "id_token_hint=" in ended.value.url and "post_logout_redirect_uri=" in ended.value.url
    page.goto(oidc_admin.base + "/ui/approvals")
    expect(page).to_have_url(re.compile(r"/ui/login$"))


def test_the_ui_session_ends_when_the_id_token_expires(proxy: ProxyUnderTest, openid_provider: OpenIDProvider,
                                                       tmp_path_factory: pytest.TempPathFactory,
                                                       context: BrowserContext) -> None:
    with running_admin(proxy, openid_provider, tmp_path_factory, SHORT_ADMIN_CLIENT) as admin:
        page = context.new_page()
        sign_in(page, admin, "bob")  # ID token valid for 3 s
        expect(page.locator("#whoami")).to_have_text("bob")
        time.sleep(3.5)
        page.goto(admin.base + "/ui/approvals")
        expect(page).to_have_url(re.compile(r"/ui/login$"))
        page.click("#oidc-login")  # the provider's session is still open: straight back in, with a new token
        expect(page.locator("#whoami")).to_have_text("bob")


@pytest.mark.parametrize(("oidc", "message"), [
    ({"client_id": "x"}, "admin.oidc.issuer: required"),
    ({"issuer": "http://idp.example.com", "client_id": "x"}, "admin.oidc.issuer: must be an https URL"),
    ({"issuer": "https://idp.test", "client_id": "x", "redirect_uri": "https://a.test/cb"},
     "admin.oidc.redirect_uri: must end with /ui/oidc/callback"),
    ({"issuer": "https://idp.test", "client_id": "x", "scopes": ["email"]}, "admin.oidc.scopes"),
    ({"issuer": "https://idp.test", "client_id": "x", "algorithms": ["HS256"]}, "admin.oidc.algorithms"),
])
def test_oidc_config_mistakes_are_reported(proxy: ProxyUnderTest, oidc: dict[str, Any], message: str) -> None:
    data = copy.deepcopy(proxy.config_data)
    data["approvals"] = {"store": "sqlite", "path": "a.sqlite"}
    data["admin"] = {"oidc": oidc}
    with pytest.raises(ConfigError) as raised:
        parse_config(data, Path.cwd())
    assert message in str(raised.value)


def test_token_login_defaults(proxy: ProxyUnderTest) -> None:
    data = copy.deepcopy(proxy.config_data)
    data["approvals"] = {"store": "sqlite", "path": "a.sqlite"}
    data["admin"] = {}
    admin = parse_config(data, Path.cwd()).admin
    assert admin is not None and admin.token_login and admin.oidc is None
    data["admin"] = {"oidc": {"issuer": "https://idp.test", "client_id": "x"}}
    admin = parse_config(data, Path.cwd()).admin
    assert admin is not None and not admin.token_login
    data["admin"]["token_login"] = True
    admin = parse_config(data, Path.cwd()).admin
    assert admin is not None and admin.token_login
