"""Open a session's upstream connection and log in with the proxy's own credential.

The caller's token never goes upstream and the upstream password never goes to the caller: this
module is the only place that holds the password, and only for the duration of the login (the SCRAM
keys derived from it are kept in memory, see :class:`~pgproxy.protocol.upstream_auth.ScramKeyCache`).
What every login would otherwise redo is kept for the next one: the derived SCRAM keys and the TLS
client context.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Mapping
from pathlib import Path

from cachetools import LRUCache

from ..config import UpstreamConfig
from ..protocol.codec import ProtocolViolation
from ..protocol.messages import ErrorResponse, NegotiateProtocolVersion, NoticeResponse, decode_backend
from ..protocol.startup import PROTOCOL_3_0, SSLRequest, StartupMessage
from ..protocol.types import Backend
from ..protocol.upstream_auth import AuthMessage, ScramKeyCache, UpstreamAuthenticator, UpstreamAuthError
from ..tlsutil import client_context
from .link import Link, LinkClosed

AUTH_MESSAGE_LIMIT = 64 * 1024

_scram_keys = ScramKeyCache()
_tls_contexts: LRUCache[tuple[str, Path | None, tuple[int, int] | None], ssl.SSLContext | None] = LRUCache(16)


def _client_context(sslmode: str, ca_file: Path | None) -> ssl.SSLContext | None:
    """The TLS client context for ``sslmode``, built once per CA file version (loading CAs is slow)."""
    version = None
    if ca_file is not None:
        with contextlib.suppress(OSError):  # a missing file fails in client_context, as before
            st = ca_file.stat()
            version = (st.st_mtime_ns, st.st_size)
    key = (sslmode, ca_file, version)
    if key not in _tls_contexts:
        _tls_contexts[key] = client_context(sslmode, ca_file)
    return _tls_contexts[key]


class UpstreamRefused(Exception):
    """The upstream server answered the login with an ErrorResponse (relayed to the client)."""

    def __init__(self, error: ErrorResponse) -> None:
        super().__init__(error.message)
        self.error = error


class UpstreamUnavailable(Exception):
    """The upstream server could not be reached or spoke nonsense.

    ``str()`` is for the proxy's own log and names the upstream address; ``public`` is what a client
    is told, and never names it (callers learn nothing of the network behind the proxy).
    """

    def __init__(self, public: str, address: str | None = None) -> None:
        super().__init__(f"{public} (upstream {address})" if address else public)
        self.public = public


async def connect_upstream(cfg: UpstreamConfig, params: Mapping[str, str], password: str | None,
                           ) -> tuple[Link, list[bytes]]:
    """Connect, negotiate TLS per ``cfg.sslmode``, send the startup packet and authenticate.

    Returns the link (still in startup mode, holding whatever followed AuthenticationOk) and the
    notices received during login, to be relayed to the client.
    """
    loop = asyncio.get_running_loop()
    timeout = cfg.connect_timeout_seconds
    address = f"[{cfg.host}]:{cfg.port}" if ":" in cfg.host else f"{cfg.host}:{cfg.port}"
    try:
        _, link = await asyncio.wait_for(loop.create_connection(Link, cfg.host, cfg.port), timeout)
    except (OSError, TimeoutError) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise UpstreamUnavailable(f"could not connect to the upstream database: {reason}", address) from None
    try:
        async with asyncio.timeout(timeout):
            notices = await _login(link, cfg, params, password)
    except TimeoutError:
        link.close()
        raise UpstreamUnavailable("timed out logging in to the upstream database", address) from None
    except UpstreamUnavailable as exc:
        link.close()
        raise UpstreamUnavailable(exc.public, address) from None
    except ssl.SSLError as exc:
        link.close()
        raise UpstreamUnavailable(f"TLS with the upstream database failed: {exc.reason or 'handshake failed'}",
                                  f"{address}: {exc}") from None
    except (LinkClosed, ProtocolViolation, OSError) as exc:
        link.close()
        reason = ("the server closed the connection" if isinstance(exc, LinkClosed) else
                  "invalid message from the server" if isinstance(exc, ProtocolViolation) else
                  exc.strerror or "network error")
        raise UpstreamUnavailable(f"upstream connection failed during login: {reason}",
                                  f"{address}: {exc or 'closed'}") from None
    except BaseException:
        link.close()
        raise
    return link, notices


async def _login(link: Link, cfg: UpstreamConfig, params: Mapping[str, str], password: str | None,
                 ) -> list[bytes]:
    context = _client_context(cfg.sslmode, cfg.sslrootcert)
    if context is not None:
        link.write(SSLRequest().encode())
        answer = await link.read_exactly(1)
        if answer != b"S":
            raise UpstreamUnavailable(f"upstream does not accept TLS but sslmode is {cfg.sslmode}")
        hostname = cfg.host if cfg.sslmode == "verify-full" else None
        await link.start_tls(context, server_side=False, server_hostname=hostname)
    link.write(StartupMessage(PROTOCOL_3_0, dict(params)).encode())
    auth = UpstreamAuthenticator(params["user"], password, _scram_keys)
    notices: list[bytes] = []
    while not auth.done:
        msg_type, body = await link.read_message(AUTH_MESSAGE_LIMIT)
        msg = decode_backend(msg_type, body)
        if isinstance(msg, ErrorResponse):
            raise UpstreamRefused(msg)
        if isinstance(msg, NoticeResponse):
            notices.append(msg.encode())
            continue
        if isinstance(msg, NegotiateProtocolVersion):
            continue  # we asked for plain 3.0; nothing to adjust
        if msg_type != Backend.AUTHENTICATION:
            raise UpstreamUnavailable(f"unexpected message {chr(msg_type)!r} from upstream during login")
        try:
            reply = auth.handle(msg)  # type: ignore[arg-type]
        except UpstreamAuthError as exc:
            raise UpstreamUnavailable(str(exc)) from None
        if reply is not None:
            link.write(reply)
    return notices


__all__ = ["AuthMessage", "UpstreamRefused", "UpstreamUnavailable", "connect_upstream"]
