"""A real OpenID provider for the tests: tests/oidc/provider.mjs (the npm ``oidc-provider`` package) in Node.js.

What for: people's login (admin UI code + PKCE, ``pgproxy login`` device flow, wire tokens from issuer
discovery) is tested against a certified provider, not a mock. ``start_provider`` runs it on a free
loopback port with the clients and users below; ``complete_device_login`` plays the person who opens
the verification URL, confirms the code and signs in (plain HTTP forms, no browser needed).

Must never: skip for a reason other than Node.js/npm being absent.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest

HERE = Path(__file__).parent / "oidc"
PROVIDER_JS = HERE / "provider.mjs"
INSTALLED = HERE / "node_modules" / "oidc-provider" / "package.json"

ADMIN_CLIENT = "pgproxy-admin"
ADMIN_SECRET = "admin-client-secret-" + "x" * 24
SHORT_ADMIN_CLIENT = "pgproxy-admin-short"  # the UI's client with 3 s ID tokens (same secret)
CLI_CLIENT = "pgproxy-cli"
SHORT_CLI_CLIENT = "pgproxy-cli-short"  # ID tokens live 3 s: every use needs a refresh
EXPIRING_CLI_CLIENT = "pgproxy-cli-expiring"  # ID tokens 3 s, refresh tokens 4 s: the login runs out
SECRET_CLI_CLIENT = "pgproxy-cli-with-secret"  # an installed app with a (non-confidential) secret, as Google's
SECRET_CLI_SECRET = "installed-app-secret-" + "y" * 24
PASSWORDS = {"alice": "alice-password", "bob": "bob-password", "carol": "carol-password", "dave": "dave-password"}
USERS: dict[str, dict[str, Any]] = {
    # alice approves (the default policy's approver group is dba) and may log in to the database
    "alice": {"groups": ["dba", "staff"], "db_role": ["agent_writer", "agent_reader"]},
    "dave": {"groups": ["dba"], "db_role": ["agent_reader"]},  # a second approver
    "bob": {"groups": ["auditors"], "db_role": ["agent_reader"]},  # an analyst: views, never decides
    "carol": {"groups": ["developers"], "db_role": ["agent_reader"]},  # outside every approver group
}
CLI_GRANTS = ["urn:ietf:params:oauth:grant-type:device_code", "refresh_token", "authorization_code"]


def _clients() -> list[dict[str, Any]]:
    # application_type native: loopback redirect URIs match on any port (RFC 8252), and the proxy's
    # admin listener and `pgproxy login --browser` listen on OS-chosen ports.
    cli = {"token_endpoint_auth_method": "none", "grant_types": CLI_GRANTS, "response_types": ["code"],
           "application_type": "native", "redirect_uris": ["http://127.0.0.1/callback"]}
    admin = {"client_secret": ADMIN_SECRET, "application_type": "native",
             "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"],
             "redirect_uris": ["http://127.0.0.1/ui/oidc/callback"],
             "post_logout_redirect_uris": ["http://127.0.0.1/ui/login"]}
    return [
        {"client_id": ADMIN_CLIENT, **admin},
        {"client_id": SHORT_ADMIN_CLIENT, **admin, "id_token_ttl": 3},
        {"client_id": CLI_CLIENT, **cli},
        {"client_id": SHORT_CLI_CLIENT, **cli, "id_token_ttl": 3},
        {"client_id": EXPIRING_CLI_CLIENT, **cli, "id_token_ttl": 3, "refresh_token_ttl": 4},
        {"client_id": SECRET_CLI_CLIENT, **cli, "token_endpoint_auth_method": "client_secret_post",
         "client_secret": SECRET_CLI_SECRET},
    ]


@dataclass
class OpenIDProvider:
    issuer: str
    port: int
    process: subprocess.Popen[str]

    def complete_device_login(self, verification_uri_complete: str, user: str, password: str | None = None) -> str:
        """Confirm the user code and sign in as ``user``; the text of the provider's last page."""
        with httpx.Client(follow_redirects=True, timeout=10, trust_env=False) as http:
            page = http.get(verification_uri_complete)
            for _ in range(6):  # the provider's pages: auto-submitted code form, confirmation, sign-in
                page.raise_for_status()
                form = _form(page.text)
                if form is None:
                    return page.text
                if "password" in form.fields:
                    form.fields.update(login=user, password=password or PASSWORDS[user])
                page = http.post(urljoin(str(page.url), form.action), data=form.fields)
            raise AssertionError(f"the device login did not finish:\n{page.text[:2000]}")


@dataclass
class _Form:
    action: str
    fields: dict[str, str]


def _form(html: str) -> _Form | None:
    """The action and input values of the first form in ``html`` (None: no form)."""

    class Parser(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.inside = False
            self.found: _Form | None = None

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            a = {k: v or "" for k, v in attrs}
            if tag == "form" and self.found is None:
                self.inside = True
                self.found = _Form(a.get("action", ""), {})
            elif tag == "input" and self.inside and self.found is not None and a.get("name"):
                self.found.fields[a["name"]] = a.get("value", "")

        def handle_endtag(self, tag: str) -> None:
            if tag == "form":
                self.inside = False

    parser = Parser()
    parser.feed(html)
    return parser.found


def _install() -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js and npm are needed to run the OpenID provider (apt-get install nodejs npm)")
    if not INSTALLED.exists():
        done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=HERE, capture_output=True, text=True,
                              timeout=300, check=False)
        assert done.returncode == 0, f"npm ci in {HERE} failed:\n{done.stdout}\n{done.stderr}"


@contextmanager
def start_provider(tmp: Path) -> Iterator[OpenIDProvider]:
    """The provider running on a free loopback port until the block ends."""
    _install()
    spec = tmp / "oidc-provider.json"
    users = {name: {**user, "password": PASSWORDS[name]} for name, user in USERS.items()}
    spec.write_text(json.dumps({"clients": _clients(), "users": users}))
    process = subprocess.Popen(["node", str(PROVIDER_JS), str(spec)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line, "the OpenID provider exited before printing its port"
        started = json.loads(line)
        yield OpenIDProvider(started["issuer"], started["port"], process)
    finally:
        process.terminate()
        process.wait(10)


def device_flow_tokens(op: OpenIDProvider, client_id: str, user: str,
                       scope: str = "openid offline_access groups pgproxy") -> dict[str, Any]:
    """The token response of a device authorization grant that ``user`` approves (no pgproxy code involved)."""
    with httpx.Client(timeout=10, trust_env=False) as http:
        started = http.post(f"{op.issuer}/device/auth", data={"client_id": client_id, "scope": scope}).json()
        op.complete_device_login(started["verification_uri_complete"], user)
        answer = http.post(f"{op.issuer}/token", data={
            "grant_type": "urn:ietf:params:oauth:grant-type:device_code", "device_code": started["device_code"],
            "client_id": client_id})
        assert answer.status_code == 200, answer.text
        tokens: dict[str, Any] = answer.json()
        return tokens
