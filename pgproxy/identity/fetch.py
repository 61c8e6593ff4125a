"""Blocking HTTPS downloads of small JSON documents an identity provider publishes (JWKS, discovery).

Redirects are followed only to https URLs, loopback URLs bypass any configured HTTP proxy, and the
body is capped at ``MAX_DOCUMENT_BYTES``. Callers run :func:`fetch_url` in a worker thread.
"""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from pgproxy.config import is_loopback_host

MAX_DOCUMENT_BYTES = 1024 * 1024


class _NoDowngradeRedirect(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to https URLs."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> urllib.request.Request | None:
        if not newurl.startswith("https://"):
            raise urllib.error.HTTPError(newurl, code, "refusing non-https redirect", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def is_loopback_url(url: str) -> bool:
    return is_loopback_host(urllib.parse.urlsplit(url).hostname or "")


def fetch_url(url: str, timeout: float) -> bytes:
    """The body of a 200 answer to GET ``url``; OSError on any failure or a body over the size cap."""
    handlers: list[urllib.request.BaseHandler] = [_NoDowngradeRedirect()]
    if is_loopback_url(url):
        handlers.append(urllib.request.ProxyHandler({}))
    opener = urllib.request.build_opener(*handlers)
    request = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "pgproxy"})
    with opener.open(request, timeout=timeout) as response:
        status = getattr(response, "status", 200)
        if status != 200:
            raise OSError(f"HTTP status {status}")
        body: bytes = response.read(MAX_DOCUMENT_BYTES + 1)
    if len(body) > MAX_DOCUMENT_BYTES:
        raise OSError("document too large")
    return body
