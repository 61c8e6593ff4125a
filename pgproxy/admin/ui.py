"""The admin web UI under ``/ui/`` on the admin listener: approval queue, audit sessions, session replay.

Server-rendered (jinja2, autoescape on), no JavaScript. People log in through their OpenID provider
(``admin.oidc``: authorization code + PKCE, pgproxy/admin/oidc_login.py) or, where ``admin.token_login``
allows it, with a pasted JWT verified by the same TokenVerifier as the API; the browser then holds only
an opaque session id in an HttpOnly, SameSite=Strict cookie (Secure when the listener has TLS). The
token is re-verified on every request, so an expired or no longer trusted token ends the UI session.
Every POST form carries the session's CSRF token (403 without it). Approvers (members of the policy's
approver groups) decide through the same ApproverService and store rules as the API; analysts
(``admin.analyst_groups``) may view.
See docs/admin-ui.md.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web
from cachetools import FIFOCache

from pgproxy.admin.audit_view import AuditLogView
from pgproxy.admin.oidc_login import PENDING_SECONDS, OidcLogin, OidcLoginError
from pgproxy.audit.timeline import format_when
from pgproxy.config import ProxyConfig
from pgproxy.identity import Identity, TokenError
from pgproxy.policy.approval_service import ApproverService, approver_view, can_view
from pgproxy.policy.approvals import (
    ApprovalConflict,
    ApprovalError,
    ApprovalForbidden,
    ApprovalNotFound,
    ApprovalStoreUnavailable,
)

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SESSION_COOKIE = "pgproxy_ui"
LOGIN_COOKIE = "pgproxy_ui_login"  # double-submit CSRF token of the login form (no session yet)
OIDC_STATE_COOKIE = "pgproxy_ui_oidc"  # the state of the OIDC login this browser started
MAX_SESSIONS = 1000
MAX_SESSION_SECONDS = 12 * 3600.0
MAX_REASON_CHARS = 2000
MAX_TOKEN_CHARS = 16 * 1024
HISTORY_LIMIT = 100
SEARCH_LIMIT = 200  # records per search page
SEARCH_FIELDS = ("subject", "agent", "tool_call", "table", "class", "decision", "kind", "session", "since", "until",
                 "text")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class PageError(Exception):
    """Answered as an HTML error page with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------------------------------
# Sessions and roles (pure logic)


@dataclass
class UiSession:
    sid: str
    token: str
    identity: Identity
    csrf: str
    expires_at: float
    flash: str | None = None
    oidc: bool = False  # token is an ID token from the admin.oidc login (re-verified against that provider)


SESSION_KEY = web.RequestKey("ui_session", UiSession)


@dataclass
class UiSessions:
    """Logged-in browser sessions held server side; the oldest are dropped past ``limit``."""

    limit: int = MAX_SESSIONS
    _by_id: FIFOCache[str, UiSession] = field(init=False)

    def __post_init__(self) -> None:
        self._by_id = FIFOCache(maxsize=self.limit)

    def create(self, token: str, identity: Identity, now: float, *, oidc: bool = False) -> UiSession:
        session = UiSession(secrets.token_urlsafe(32), token, identity, secrets.token_urlsafe(32),
                            min(identity.expires_at, now + MAX_SESSION_SECONDS), oidc=oidc)
        self._by_id[session.sid] = session
        return session

    def get(self, sid: str | None, now: float) -> UiSession | None:
        session = self._by_id.get(sid or "")
        if session is not None and session.expires_at <= now:
            self.drop(session.sid)
            return None
        return session

    def drop(self, sid: str) -> None:
        self._by_id.pop(sid, None)


@dataclass(frozen=True)
class Roles:
    """Who may use the UI: approvers decide (the store checks each request's groups), analysts view."""

    approver_groups: frozenset[str]
    analyst_groups: frozenset[str]

    def is_approver(self, identity: Identity) -> bool:
        return not self.approver_groups.isdisjoint(identity.groups)

    def is_analyst(self, identity: Identity) -> bool:
        return not self.analyst_groups.isdisjoint(identity.groups)

    def may_log_in(self, identity: Identity) -> bool:
        return self.is_approver(identity) or self.is_analyst(identity)


def roles_from_config(config: ProxyConfig) -> Roles:
    """Approver groups are those the policy's approve rules name; analysts default to the same groups."""
    approvers: set[str] = set()
    if config.policy is not None:
        from pgproxy.policy.rules import load_policy

        for rule in load_policy(config.policy.file).rules:
            if rule.approval is not None:
                approvers.update(rule.approval.approvers)
    analysts = config.admin.analyst_groups if config.admin is not None else None
    return Roles(frozenset(approvers), frozenset(approvers if analysts is None else analysts))


def check_csrf(session: UiSession, form: Mapping[str, Any]) -> None:
    if not hmac.compare_digest(str(form.get("csrf", "")), session.csrf):
        raise PageError(403, "missing or wrong CSRF token: reload the page and try again")


def age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


# --------------------------------------------------------------------------------------------------
# The aiohttp sub-application


class AdminUI:
    """Mounted on the admin app by ``install``; shares the API's ApproverService."""

    def __init__(self, config: ProxyConfig) -> None:
        assert config.admin is not None
        self.secure_cookies = config.admin.tls is not None
        self.roles = roles_from_config(config)
        audit = config.audit
        self.audit = (AuditLogView(audit.dir, ((audit.signing_key_file,) if audit.signing_key_file else ())
                                   + audit.trusted_keys)
                      if audit.dir is not None else None)
        self.jsonl_path = audit.jsonl_path
        self.store = (audit.store_dsn(), audit.store_schema) if audit.store_dsn_env is not None else None
        self.sessions = UiSessions()
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)
        self.env.filters["utc"] = format_when
        self.env.filters["age"] = age
        self._service: ApproverService | None = None
        self.oidc = OidcLogin(config.admin.oidc) if config.admin.oidc is not None else None
        self.token_login = config.admin.token_login

    def install(self, app: web.Application, service: ApproverService) -> None:
        self._service = service
        pages: list[tuple[str, str, Handler]] = [
            ("GET", "/", self._home), ("GET", "/ui", self._home), ("GET", "/ui/", self._home),
            ("GET", "/ui/login", self._login_form), ("POST", "/ui/login", self._login),
            ("POST", "/ui/logout", self._logout),
            ("GET", "/ui/oidc/start", self._oidc_start), ("GET", "/ui/oidc/callback", self._oidc_callback),
            ("GET", "/ui/approvals", self._approvals), ("POST", "/ui/approvals/{id}/decide", self._decide),
            ("GET", "/ui/sessions", self._session_list), ("GET", "/ui/sessions/{session}", self._session_page),
            ("GET", "/ui/search", self._search),
        ]
        for method, path, handler in pages:
            app.router.add_route(method, path, self._guarded(handler))
        app.router.add_static("/ui/static/", HERE / "static")

    @property
    def service(self) -> ApproverService:
        assert self._service is not None, "not installed"
        return self._service

    # ------------------------------------------------------------------------------------------
    # Plumbing

    def _guarded(self, handler: Handler) -> Handler:
        """HTML error pages instead of the API's JSON errors, and the security headers on every page."""
        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                response = await handler(request)
            except PageError as exc:
                response = self._error_page(request, exc.status, exc.message)
            except ApprovalNotFound as exc:
                response = self._error_page(request, 404, str(exc))
            except ApprovalForbidden as exc:
                response = self._error_page(request, 403, str(exc))
            except (ApprovalConflict, ApprovalError) as exc:
                response = self._error_page(request, 409, str(exc))
            except ApprovalStoreUnavailable:
                response = self._error_page(request, 503, "the approval store is unavailable")
            except web.HTTPException as exc:
                response = self._error_page(request, exc.status, exc.reason)
            response.headers.update(SECURITY_HEADERS)
            return response
        return guarded

    def _render(self, name: str, http_status: int = 200, **context: Any) -> web.Response:
        text = self.env.get_template(name).render(**context)
        return web.Response(text=text, status=http_status, content_type="text/html", charset="utf-8")

    def _error_page(self, request: web.Request, status: int, message: str) -> web.Response:
        session = request.get(SESSION_KEY)
        return self._render("error.html", status, status=status, message=message, **self._chrome(session))

    def _chrome(self, session: UiSession | None) -> dict[str, Any]:
        """What the page frame needs: who is logged in, their CSRF token, roles, a one-shot flash."""
        flash = None
        if session is not None:
            flash, session.flash = session.flash, None
        identity = session.identity if session else None
        return {"me": identity, "csrf": session.csrf if session else "", "flash": flash,
                "is_approver": bool(identity and self.roles.is_approver(identity))}

    def _cookie(self, response: web.StreamResponse, name: str, value: str, max_age: int | None) -> None:
        response.set_cookie(name, value, path="/ui/", httponly=True, secure=self.secure_cookies,
                            samesite="Strict", max_age=max_age)

    @staticmethod
    def _redirect(location: str) -> web.Response:
        return web.Response(status=303, headers={"Location": location})

    async def _session_or_none(self, request: web.Request) -> UiSession | None:
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE), time.time())
        if session is None:
            return None
        try:  # keys rotate and tokens expire: the token must still verify
            if session.oidc and self.oidc is not None:
                await self.oidc.verifier.verify(session.token)
            else:
                await self.service.authenticate(session.token)
        except TokenError:
            self.sessions.drop(session.sid)
            return None
        request[SESSION_KEY] = session
        return session

    async def _required(self, request: web.Request) -> UiSession | web.Response:
        session = await self._session_or_none(request)
        return session if session is not None else self._redirect("/ui/login")

    async def _form(self, request: web.Request, session: UiSession) -> Mapping[str, Any]:
        form = await request.post()
        check_csrf(session, form)
        return form

    def _no_signed_log(self) -> str:
        if self.jsonl_path is not None:
            return (f"the signed audit log is not configured (audit.jsonl_path {self.jsonl_path} has no integrity "
                    "protection): set audit.dir to browse and verify sessions here")
        return "the signed audit log is not configured (audit.dir)"

    # ------------------------------------------------------------------------------------------
    # Pages

    async def _home(self, request: web.Request) -> web.Response:
        session = await self._session_or_none(request)
        return self._redirect("/ui/approvals" if session else "/ui/login")

    async def _login_form(self, request: web.Request) -> web.Response:
        return self._login_page(request, 200, None)

    def _login_page(self, request: web.Request, status: int, error: str | None) -> web.Response:
        nonce = secrets.token_urlsafe(32)
        response = self._render("login.html", status, error=error, login_csrf=nonce, oidc=self.oidc is not None,
                                token_login=self.token_login, **self._chrome(None))
        self._cookie(response, LOGIN_COOKIE, nonce, 600)
        return response

    async def _login(self, request: web.Request) -> web.Response:
        form = await request.post()
        expected = request.cookies.get(LOGIN_COOKIE, "")
        if not expected or not hmac.compare_digest(str(form.get("csrf", "")), expected):
            raise PageError(403, "missing or wrong CSRF token: reload the login page and try again")
        if not self.token_login:
            raise PageError(403, "logging in with a pasted token is off (admin.token_login): log in with your "
                                 "identity provider")
        token = str(form.get("token", "")).strip()
        if not token or len(token) > MAX_TOKEN_CHARS:
            return self._login_page(request, 400, "paste a JWT")
        try:
            identity = await self.service.authenticate(token)
        except TokenError as exc:
            return self._login_page(request, 401, f"invalid token: {exc.reason}")
        refused = self._refuse_login(request, identity)
        if refused is not None:
            return refused
        session = self.sessions.create(token, identity, time.time())
        response = self._redirect("/ui/approvals")
        self._cookie(response, SESSION_COOKIE, session.sid, None)
        response.del_cookie(LOGIN_COOKIE, path="/ui/")
        return response

    def _refuse_login(self, request: web.Request, identity: Identity) -> web.Response | None:
        if self.roles.may_log_in(identity):
            return None
        return self._login_page(request, 403, f"{identity.subject} is neither an approver nor an analyst "
                                              "(no approver or analyst group in the token)")

    async def _oidc_start(self, request: web.Request) -> web.Response:
        if self.oidc is None:
            raise PageError(404, "no identity provider is configured (admin.oidc)")
        try:
            url, state = await self.oidc.start(self._oidc_url(request, "/ui/oidc/callback"))
        except OidcLoginError as exc:
            return self._login_page(request, 503, str(exc))
        response = self._redirect(url)
        # Lax, not Strict: the browser must send it back on the provider's redirect to the callback.
        response.set_cookie(OIDC_STATE_COOKIE, state, path="/ui/", httponly=True, secure=self.secure_cookies,
                            samesite="Lax", max_age=int(PENDING_SECONDS))
        return response

    def _oidc_url(self, request: web.Request, path: str) -> str:
        """``path`` on this UI as the provider knows it: admin.oidc.redirect_uri's origin, else the request's."""
        assert self.oidc is not None
        configured = self.oidc.config.redirect_uri
        if configured is not None:  # ends with /ui/oidc/callback (checked by the config)
            return configured.removesuffix("/ui/oidc/callback") + path
        return str(request.url.with_path(path).with_query(None))

    async def _oidc_callback(self, request: web.Request) -> web.Response:
        if self.oidc is None:
            raise PageError(404, "no identity provider is configured (admin.oidc)")
        query = request.query
        if "error" in query:
            return self._login_page(request, 401, f"the identity provider refused the login: "
                                                  f"{query.get('error', '')[:200]}")
        try:
            identity, id_token = await self.oidc.finish(query.get("state", ""),
                                                        request.cookies.get(OIDC_STATE_COOKIE, ""),
                                                        query.get("code", ""))
        except OidcLoginError as exc:
            return self._login_page(request, 401, str(exc))
        refused = self._refuse_login(request, identity)
        if refused is not None:
            return refused
        session = self.sessions.create(id_token, identity, time.time(), oidc=True)
        # A page, not a redirect: the Strict session cookie is sent only on a navigation this site starts.
        response = self._render("redirect.html", heading="Signed in", next="/ui/approvals",
                                link="Continue to the approvals", **self._chrome(None))
        self._cookie(response, SESSION_COOKIE, session.sid, None)
        response.del_cookie(OIDC_STATE_COOKIE, path="/ui/")
        return response

    async def _logout(self, request: web.Request) -> web.Response:
        session = await self._required(request)
        if not isinstance(session, UiSession):
            return session
        await self._form(request, session)
        self.sessions.drop(session.sid)
        after = None
        if session.oidc and self.oidc is not None:
            try:
                after = await self.oidc.logout_url(session.token, self._oidc_url(request, "/ui/login"))
            except OidcLoginError:
                after = None  # the provider is unreachable: the pgproxy session is ended all the same
        if after is not None:
            # A page, not a redirect: the CSP's form-action 'self' blocks a form's redirect to the provider.
            response = self._render("redirect.html", heading="Logged out", next=after,
                                    link="Log out at the identity provider too", **self._chrome(None))
        else:
            response = self._redirect("/ui/login")
        response.del_cookie(SESSION_COOKIE, path="/ui/")
        return response

    async def _approvals(self, request: web.Request) -> web.Response:
        session = await self._required(request)
        if not isinstance(session, UiSession):
            return session
        me = session.identity
        analyst = self.roles.is_analyst(me)
        store = self.service.store
        pending = [approver_view(r, me) for r in await store.list("pending", 1000) if analyst or can_view(me, r)]
        history = [approver_view(r, me) for r in await store.list(None, HISTORY_LIMIT * 2)
                   if r.status != "pending" and (analyst or can_view(me, r))][:HISTORY_LIMIT]
        return self._render("approvals.html", pending=pending, history=history, now=time.time(),
                            **self._chrome(session))

    async def _decide(self, request: web.Request) -> web.Response:
        session = await self._required(request)
        if not isinstance(session, UiSession):
            return session
        form = await self._form(request, session)
        action = form.get("action")
        if action not in ("approve", "deny"):
            raise PageError(400, "action must be approve or deny")
        reason = str(form.get("reason", "")).strip()
        if len(reason) > MAX_REASON_CHARS:
            raise PageError(400, f"the reason is longer than {MAX_REASON_CHARS} characters")
        approval_id = request.match_info["id"]
        result = await self.service.decide(session.identity, approval_id, action == "approve", reason or None)
        verb = "approved" if action == "approve" else "denied"
        session.flash = f"{verb} {approval_id}: the request is now {result.status}"
        return self._redirect("/ui/approvals")

    async def _session_list(self, request: web.Request) -> web.Response:
        session = await self._required(request)
        if not isinstance(session, UiSession):
            return session
        self._analysts_only(session)
        if self.audit is None:
            return self._render("sessions.html", sessions=[], log=None, unavailable=self._no_signed_log(),
                                **self._chrome(session))
        log_status = await asyncio.to_thread(self.audit.log_status)
        sessions = await asyncio.to_thread(self.audit.sessions)
        return self._render("sessions.html", sessions=sessions, log=log_status, unavailable=None,
                            **self._chrome(session))

    def _analysts_only(self, session: UiSession) -> None:
        if not self.roles.is_analyst(session.identity):
            raise PageError(403, "viewing sessions needs an analyst group (admin.analyst_groups)")

    async def _session_page(self, request: web.Request) -> web.StreamResponse:
        session = await self._required(request)
        if not isinstance(session, UiSession):
            return session
        self._analysts_only(session)
        sid = request.match_info["session"]
        if self.audit is None:
            raise PageError(404, self._no_signed_log())
        view = await asyncio.to_thread(self.audit.session, sid)
        if view is None:
            raise PageError(404, f"no records of session {sid} in the audit log")
        start = view.records[0].event.get("ts")
        return self._render("session.html", view=view, start=start if isinstance(start, (int, float)) else None,
                            **self._chrome(session))

    async def _search(self, request: web.Request) -> web.Response:
        """The central store's records matching the form's filters (docs/audit.md#central-store)."""
        from pgproxy.audit.store import Hit, SearchFilters, parse_time, search

        session = await self._required(request)
        if not isinstance(session, UiSession):
            return session
        self._analysts_only(session)
        form = {k: v.strip() for k, v in request.query.items() if k in SEARCH_FIELDS and v.strip()}
        if self.store is None:
            return self._render("search.html", form=form, hits=None, searched=False, **self._chrome(session),
                                unavailable="the central audit store is not configured (audit.store_dsn_env)")
        hits: list[Hit] | None = None
        if form:
            try:
                filters = SearchFilters(
                    subject=form.get("subject"), agent_id=form.get("agent"), tool_call_id=form.get("tool_call"),
                    table=form.get("table"), statement_class=form.get("class"), decision=form.get("decision"),
                    kind=form.get("kind"), session=form.get("session"), text=form.get("text"),
                    since=parse_time(form["since"]) if "since" in form else None,
                    until=parse_time(form["until"]) if "until" in form else None, limit=SEARCH_LIMIT)
            except ValueError as exc:
                raise PageError(400, f"since/until: {exc}") from None
            try:
                hits = await asyncio.to_thread(search, self.store[0], self.store[1], filters)
            except Exception as exc:  # psycopg: the store is down
                log.warning("audit store search failed: %s", exc)
                raise PageError(503, "the central audit store is unavailable") from None
        return self._render("search.html", form=form, hits=hits, searched=bool(form), unavailable=None,
                            limit=SEARCH_LIMIT, **self._chrome(session))
