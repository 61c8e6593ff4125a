"""The HTTP companion proxy: an aiohttp reverse proxy with the same identity, policy, approvals and audit.

``/<target>/<path>`` on the HTTP listener goes to ``<target upstream><path>``. Every request needs
``Authorization: Bearer <JWT>`` (the Postgres side's TokenVerifier and claim mapping); the proxy
replaces it with the target's own credential, which the caller never sees (it is starred out of
response headers and bodies that echo it). Bodies stream in both directions: only the audit excerpt
(``audit_body_bytes``) is kept, digests are computed as the bytes pass; small bodies of known length
go out in one write with their headers. Requests that need an approval are spooled (to disk past
1 MiB) so that their digest is known before anything is sent upstream. What every request of a target
reuses (header sets, mask paths, timeouts, the scrubber's secrets) is prepared once at start.

Errors are JSON ``{"error": ..., "status": ...}``: 401 token, 403 policy or denied approval, 404 unknown
target, 413 request too large, 428 approval required, 502 upstream unreachable or broken, 503 approval
store or audit log unavailable, 504 upstream or approval timed out. One ``http_exchange`` audit record
per request (see docs/http.md); this module never records a token or an unmasked field.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import ssl
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import IO, Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from ..audit.guard import AuditGuard
from ..audit.redact import redact_text
from ..audit.sink import AuditSink
from ..config import ConfigError
from ..identity import Identity, TokenError, TokenVerifier
from ..identity.reuse import VerifiedTokens
from ..policy.approvals import ApprovalStore
from ..policy.rules import Decision
from ..tlsutil import server_context
from .audit import BodyTap, body_record, headers_record
from .config import MIN_SCRUB_CHARS, HttpConfig, TargetConfig
from .gate import HttpApprovals, approval_request
from .jsonmask import JsonPath, mask_json
from .scrub import Scrubber

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
# Responses up to this size (declared, not re-encoded) are read whole and sent in one write with their
# headers: a streamed answer costs three writes (headers, body, held-back scrub tail) per exchange.
SMALL_BODY = 64 * 1024
SPOOL_IN_MEMORY = 1024 * 1024
# Never forwarded in either direction (RFC 9110 hop-by-hop fields, plus what the proxy sets itself).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
                        "upgrade", "proxy-authenticate", "proxy-authorization", "expect"})
_NOT_FORWARDED = HOP_BY_HOP | {"host", "authorization", "content-length", "accept-encoding"}


class _Refused(Exception):
    """The proxy answers the request itself with a JSON error."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


class _TooLarge(Exception):
    pass


def error_response(status: int, message: str, **extra: Any) -> web.Response:
    headers = {"Cache-Control": "no-store"}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="pgproxy", error="invalid_token"'
    body = {"error": message, "status": status, **{k: v for k, v in extra.items() if v is not None}}
    return web.json_response(body, status=status, headers=headers, dumps=lambda v: orjson.dumps(v).decode())


def http_session_id(identity: Identity) -> str:
    """The audit "session" of an HTTP caller: one per token, so an export bundles a token's exchanges."""
    return "http-" + hashlib.sha256(identity.token_id.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class _Upstream:
    """A target with its resolved credential, its connection pool and what every request reuses."""

    config: TargetConfig
    session: aiohttp.ClientSession
    credential: tuple[str, str] | None  # header name, value
    scrub: tuple[str, ...]  # strings the caller and the log must never see
    scrubber: Scrubber  # for scrub; each response gets a fresh() copy
    dropped: frozenset[str]  # request headers (lower case) never forwarded
    secret_headers: tuple[str, ...]  # recorded as [redacted] on top of audit.SECRET_HEADERS
    request_masks: tuple[JsonPath, ...]
    response_masks: tuple[JsonPath, ...]
    caller_masks: tuple[JsonPath, ...]  # also applied to the body the caller receives
    timeout: aiohttp.ClientTimeout


@dataclass
class _Exchange:
    """What one request did, for its audit record."""

    id: str
    started: float
    t0: float
    method: str
    client: str | None
    target: str
    path_qs: str
    identity: Identity | None = None
    decision: dict[str, Any] = field(default_factory=dict)
    url: str | None = None
    request_headers: dict[str, str] = field(default_factory=dict)
    request_body: dict[str, Any] | None = None
    response: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    upstream_ms: float | None = None


class HttpProxy:
    """The HTTP listener; ``app`` can also be served by aiohttp's test utilities."""

    def __init__(self, config: HttpConfig, *, verifier: TokenVerifier, audit: AuditSink,
                 approval_store: ApprovalStore | None = None) -> None:
        self.config = config
        self.audit = audit
        self.approvals = HttpApprovals(approval_store, audit)
        self._upstreams: dict[str, _Upstream] = {}
        self._runner: web.AppRunner | None = None
        self._recorder = AuditGuard(audit, "http exchange")
        self._tokens = VerifiedTokens(verifier)
        self.app = web.Application()
        self.app.router.add_route("*", r"/{target}{tail:(/.*)?}", self._handle)

    def use_verifier(self, verifier: TokenVerifier) -> None:
        """Verify callers' tokens with ``verifier`` from the next request on (a config reload)."""
        self._tokens = VerifiedTokens(verifier)

    # ------------------------------------------------------------------------------------ lifecycle

    def _resolve(self, target: TargetConfig) -> _Upstream:
        credential: tuple[str, str] | None = None
        scrub: tuple[str, ...] = ()
        if target.credential is not None:
            name, value, raw = target.credential.resolve()
            credential = (name, value)
            scrub = tuple(s for s in raw if len(s) >= MIN_SCRUB_CHARS)
        ssl_ctx: ssl.SSLContext | bool = True
        if target.sslrootcert is not None:
            ssl_ctx = ssl.create_default_context(cafile=str(target.sslrootcert))
        # One session serves every caller: it must never keep an upstream's cookies for the next request.
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_ctx, limit=256), trust_env=False,
                                        auto_decompress=True, skip_auto_headers=("User-Agent",),
                                        cookie_jar=aiohttp.DummyCookieJar())
        secret_headers = (credential[0],) if credential is not None else ()
        return _Upstream(
            target, session, credential, scrub, Scrubber(scrub),
            dropped=_NOT_FORWARDED | {h.lower() for h in secret_headers}, secret_headers=secret_headers,
            request_masks=target.mask_paths("request"), response_masks=target.mask_paths("response"),
            caller_masks=target.mask_paths("response", caller=True),
            timeout=aiohttp.ClientTimeout(total=target.total_timeout_seconds, connect=target.connect_timeout_seconds,
                                          sock_read=target.read_timeout_seconds))

    async def start(self) -> None:
        """Read the credentials (ConfigError if one is missing) and listen."""
        listen = self.config.listen
        ssl_context = server_context(listen.tls.cert_file, listen.tls.key_file) if listen.tls else None
        try:
            for target in self.config.targets:
                self._upstreams[target.name] = self._resolve(target)
        except ConfigError:
            await self._close_sessions()
            raise
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, listen.host, listen.port, ssl_context=ssl_context, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            await self._close_sessions()
            raise
        self._runner = runner
        log.info("http proxy listening on %s:%d (%s)", listen.host, self.port, "tls" if ssl_context else "plaintext")

    @property
    def port(self) -> int:
        assert self._runner is not None, "not started"
        return int(self._runner.addresses[0][1])

    async def _close_sessions(self) -> None:
        for upstream in self._upstreams.values():
            await upstream.session.close()
        self._upstreams.clear()

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        await self._close_sessions()

    # ------------------------------------------------------------------------------------- requests

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        tail = request.match_info["tail"] or "/"
        prefix = f"/{request.match_info['target']}"
        raw = request.rel_url.raw_path
        path_qs = (raw[len(prefix):] if raw.startswith(prefix) else tail) or "/"
        if request.rel_url.raw_query_string:
            path_qs += "?" + request.rel_url.raw_query_string
        ex = _Exchange(id=secrets.token_hex(8), started=time.time(), t0=time.monotonic(), method=request.method,
                       client=request.remote, target=request.match_info["target"], path_qs=path_qs)
        try:
            response = await self._serve(request, ex, tail)
        except _Refused as exc:
            ex.error = {"status": exc.status, "message": exc.message}
            response = error_response(exc.status, exc.message, exchange=ex.id, **exc.extra)
        except Exception:  # a bug must not leave the exchange unrecorded or answer in plain text
            log.exception("http exchange %s failed", ex.id)
            ex.error = {"status": 500, "message": "internal proxy error"}
            response = error_response(500, "internal proxy error", exchange=ex.id)
        if ex.identity is not None:
            self._record(ex)
        if not response.prepared:
            response.headers["X-Pgproxy-Exchange"] = ex.id
        return response

    async def _serve(self, request: web.Request, ex: _Exchange, path: str) -> web.StreamResponse:
        ex.identity = await self._authenticate(request, ex)
        if not self._recorder.writable():
            raise _Refused(503, "the audit log is unavailable; requests are refused until it recovers")
        why = ambiguous_path(path, request.rel_url.raw_path)
        if why is not None:
            raise _Refused(400, f"refused path: {why}")
        upstream = self._upstreams.get(ex.target)
        if upstream is None:
            raise _Refused(404, f"unknown target {ex.target!r}")
        target = upstream.config
        ex.request_headers = headers_record(request.headers.items(), upstream.secret_headers)
        decision = self.config.policy.decide(ex.identity, target.name, request.method, path)
        ex.decision = {"action": decision.action, "rule": decision.rule}
        if decision.action == "deny":
            raise _Refused(403, f"pgproxy policy {decision.rule}: {decision.message}")
        declared = request.content_length
        if declared is not None and declared > target.max_request_bytes:
            raise _Refused(413, f"request body of {declared} bytes is over the limit of {target.max_request_bytes}")
        tap = BodyTap(self.config.audit_body_bytes)
        content_type = request.headers.get("Content-Type", "")
        spool: IO[bytes] | None = None
        try:
            if decision.action == "approve":
                spool = await self._spool(request, target, tap)
                await self._approve(ex, decision, tap, content_type, upstream)
            return await self._forward(request, upstream, ex, tap, spool)
        finally:
            ex.request_body = body_record(tap, content_type, upstream.request_masks, upstream.scrub)
            if spool is not None:
                spool.close()

    async def _authenticate(self, request: web.Request, ex: _Exchange) -> Identity:
        try:
            return await self._tokens.bearer(request.headers.get("Authorization"), "Authorization: Bearer <JWT>")
        except TokenError as exc:
            reason = exc.reason
        self._emit({"event": "http_auth_failed", "ts": ex.started, "exchange": ex.id, "client": ex.client,
                    "method": ex.method, "target": ex.target, "path": redact_text(ex.path_qs), "reason": reason})
        raise _Refused(401, reason)

    async def _spool(self, request: web.Request, target: TargetConfig, tap: BodyTap) -> IO[bytes]:
        spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115 (closed by caller)
        try:
            async for chunk in request.content.iter_chunked(CHUNK):
                tap.feed(chunk)
                if tap.size > target.max_request_bytes:
                    raise _Refused(413, f"request body is over the limit of {target.max_request_bytes} bytes")
                spool.write(chunk)
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return spool

    async def _approve(self, ex: _Exchange, decision: Decision, tap: BodyTap, content_type: str,
                       upstream: _Upstream) -> None:
        assert ex.identity is not None and decision.approval is not None
        preview = body_record(tap, content_type, upstream.request_masks)
        pending = approval_request(ex.identity, upstream.config.name, ex.method, ex.path_qs, tap.sha256, decision,
                                   decision.approval.mode, preview)
        verdict = await self.approvals.check(http_session_id(ex.identity), ex.id, pending, decision)
        ex.decision["approval_id"] = verdict.approval_id
        if verdict.status:
            raise _Refused(verdict.status, verdict.message, approval_id=verdict.approval_id, **verdict.extra)

    # -------------------------------------------------------------------------------------- upstream

    async def _forward(self, request: web.Request, upstream: _Upstream, ex: _Exchange, tap: BodyTap,
                       spool: IO[bytes] | None) -> web.StreamResponse:
        target = upstream.config
        url = target.upstream + ex.path_qs
        ex.url = redact_text(url)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in upstream.dropped]
        headers.append(("Accept-Encoding", "identity"))
        if upstream.credential is not None:
            headers.append(upstream.credential)
        data: bytes | AsyncIterator[bytes] | None = None
        overflow: list[bool] = []
        declared = request.content_length
        if spool is not None:
            headers.append(("Content-Length", str(tap.size)))
            data = spool.read() if tap.size <= SMALL_BODY else _read_spool(spool)
        elif declared is not None and declared <= SMALL_BODY and request.content.is_eof():
            # A small body that has fully arrived (reading it cannot wait): sent in one write with the headers.
            data = await request.content.read()
            tap.feed(data)
            if tap.size > target.max_request_bytes:
                raise _Refused(413, f"request body is over the limit of {target.max_request_bytes} bytes")
            headers.append(("Content-Length", str(tap.size)))
        elif request.body_exists:
            if declared is not None:
                headers.append(("Content-Length", str(declared)))
            data = _stream(request, target.max_request_bytes, tap, overflow)
        try:
            async with upstream.session.request(request.method, URL(url, encoded=True), headers=headers, data=data,
                                                allow_redirects=False, timeout=upstream.timeout) as answer:
                ex.upstream_ms = round((time.monotonic() - ex.t0) * 1000, 3)
                return await self._relay(request, answer, upstream, ex)
        except _Refused:
            raise
        except (TimeoutError, aiohttp.ServerTimeoutError):
            if overflow:
                raise _Refused(413, f"request body is over the limit of {target.max_request_bytes} bytes") from None
            raise _Refused(504, f"upstream {target.name} did not answer in time") from None
        except (aiohttp.ClientError, OSError, _TooLarge) as exc:
            if overflow:
                raise _Refused(413, f"request body is over the limit of {target.max_request_bytes} bytes") from None
            log.info("http exchange %s: upstream %s failed: %s", ex.id, target.name, exc)
            raise _Refused(502, f"upstream {target.name} is unreachable or failed: {type(exc).__name__}") from None

    async def _relay(self, request: web.Request, answer: aiohttp.ClientResponse, upstream: _Upstream,
                     ex: _Exchange) -> web.StreamResponse:
        target = upstream.config
        scrubber = upstream.scrubber.fresh()
        limit = target.max_response_bytes
        if answer.content_length is not None and answer.content_length > limit:
            raise _Refused(502, f"upstream response of {answer.content_length} bytes is over the limit of {limit}")
        content_type = answer.headers.get("Content-Type", "")
        recoded = "Content-Encoding" in answer.headers  # decompressed here: length and encoding change
        out_headers = [(k, scrubber.text(v)) for k, v in answer.headers.items()
                       if k.lower() not in HOP_BY_HOP and not (recoded and k.lower() in ("content-length",
                                                                                        "content-encoding"))]
        sent = BodyTap(self.config.audit_body_bytes)
        upstream_sha256 = None  # when the caller gets a masked body: the digest of what the upstream sent
        caller_paths = upstream.caller_masks
        masked_hits: list[str] = []
        bodiless = request.method == "HEAD" or answer.status < 200 or answer.status in (204, 304)
        if caller_paths and "json" in content_type.lower() and not bodiless:
            body = await _read_limited(answer, min(limit, self.config.mask_max_bytes), "can be masked")
            upstream_sha256 = hashlib.sha256(body).hexdigest()
            try:
                document = orjson.loads(body) if body else None
            except orjson.JSONDecodeError:
                raise _Refused(502, "upstream sent invalid JSON where fields must be masked") from None
            if body:
                masked, masked_hits = mask_json(document, caller_paths)
                body = orjson.dumps(masked)
            body = scrubber.whole(body)
            sent.feed(body)
            response: web.StreamResponse = web.Response(status=answer.status, reason=answer.reason, body=body)
            for k, v in out_headers:
                if k.lower() not in ("content-length", "content-type", "content-encoding"):
                    response.headers.add(k, v)
            response.content_type = answer.content_type
            if answer.charset:
                response.charset = answer.charset
        elif not bodiless and not recoded and answer.content_length is not None \
                and answer.content_length <= SMALL_BODY:  # one write, headers and body together
            body = scrubber.whole(await _read_limited(answer, answer.content_length, "its Content-Length declared"))
            sent.feed(body)
            kept = CIMultiDict((k, v) for k, v in out_headers if k.lower() != "content-length")
            response = web.Response(status=answer.status, reason=answer.reason, body=body, headers=kept)
        else:
            response = web.StreamResponse(status=answer.status, reason=answer.reason)
            for k, v in out_headers:
                response.headers.add(k, v)
            response.headers["X-Pgproxy-Exchange"] = ex.id
            await response.prepare(request)
            complete, received = False, 0
            try:
                async for chunk in answer.content.iter_any():  # whatever arrived: fewer, larger writes
                    received += len(chunk)
                    if received > limit:
                        raise _TooLarge(f"upstream response is over the limit of {limit} bytes")
                    out = scrubber.feed(chunk)
                    sent.feed(out)
                    await response.write(out)
                tail = scrubber.finish()
                sent.feed(tail)
                await response.write_eof(tail)
                complete = True
            except (aiohttp.ClientError, OSError, TimeoutError, _TooLarge) as exc:
                ex.error = {"status": 502, "message": f"response cut short: {type(exc).__name__}: {exc}"}
            finally:
                if not complete and request.transport is not None:
                    request.transport.abort()  # never let a cut-short body look complete
        record: dict[str, Any] = {"status": answer.status,
                                  "headers": headers_record(out_headers, upstream.secret_headers),
                                  "body": body_record(sent, content_type, upstream.response_masks, upstream.scrub)}
        if upstream_sha256 is not None and upstream_sha256 != sent.sha256:  # for replay
            record["body"]["upstream_sha256"] = upstream_sha256
        if scrubber.replaced:
            record["body"]["credential_scrubbed"] = scrubber.replaced
        if masked_hits:
            record["body"]["masked_for_caller"] = masked_hits
        ex.response = record
        return response

    # ----------------------------------------------------------------------------------------- audit

    def _record(self, ex: _Exchange) -> None:
        assert ex.identity is not None
        event: dict[str, Any] = {
            "event": "http_exchange", "ts": ex.started, "session": http_session_id(ex.identity), "exchange": ex.id,
            "identity": ex.identity.audit_fields(), "client": ex.client, "target": ex.target, "method": ex.method,
            "path": redact_text(ex.path_qs), "url": ex.url, "decision": ex.decision,
            "request": {"headers": ex.request_headers, "body": ex.request_body},
            "timings": {"started_at": ex.started, "upstream_headers_ms": ex.upstream_ms,
                        "total_ms": round((time.monotonic() - ex.t0) * 1000, 3)}}
        if ex.response is not None:
            event["response"] = ex.response
        if ex.error is not None:
            event["error"] = ex.error
        self._emit(event)

    def _emit(self, event: dict[str, Any]) -> None:
        self._recorder.emit(event, event.get("exchange"))


def ambiguous_path(decoded: str, raw: str) -> str | None:
    """Why a path could mean something else upstream than what the policy matched, or None.

    The policy judges the decoded path; an upstream that resolves ``..``, or decodes ``%2F`` into a
    separator, or merges ``//``, could reach a path no rule was asked about. Such paths are refused.
    """
    lowered = raw.lower()
    if "%2f" in lowered or "%5c" in lowered or "\\" in decoded:
        return "encoded '/' or '\\' in the path"
    if "//" in decoded:
        return "empty path segment ('//')"
    if any(segment in (".", "..") for segment in decoded.split("/")):
        return "'.' or '..' segment in the path"
    return None


async def _read_spool(spool: IO[bytes]) -> AsyncIterator[bytes]:
    while chunk := spool.read(CHUNK):
        yield chunk


async def _stream(request: web.Request, limit: int, tap: BodyTap, overflow: list[bool]) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_any():
        tap.feed(chunk)
        if tap.size > limit:
            overflow.append(True)
            raise _TooLarge(f"request body is over the limit of {limit} bytes")
        yield chunk


async def _read_limited(answer: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    """The whole body, refused (502) past ``limit`` bytes (the ``limit`` bytes that ``what``)."""
    body = bytearray()
    async for chunk in answer.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise _Refused(502, f"upstream response is over the {limit} bytes that {what}")
    return bytes(body)
