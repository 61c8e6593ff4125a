"""The proxy's own upstream login as a connection URL, for its side connections.

A leaf next to ``config``: policy (impact estimates), masking (schema checks, catalog reads) and the
server all use it, so it lives below every one of them rather than in ``server/``.
"""

from __future__ import annotations

from urllib.parse import quote, urlencode

from .config import ConfigError, UpstreamConfig


def upstream_dsn(cfg: UpstreamConfig, role: str, database: str) -> str:
    """A libpq/asyncpg URL that logs in upstream as ``role`` with the proxy's credential for it.

    For the proxy's own side connections (e.g. impact estimates); never shown to a client.
    """
    credential = cfg.credential_for(role)
    if credential is None:
        raise ConfigError(f"upstream.credentials: no credential for role {role!r}")
    password = credential.password()
    auth = quote(role, safe="") + (":" + quote(password, safe="") if password else "")
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    params: dict[str, str] = {"sslmode": cfg.sslmode}
    if cfg.sslrootcert is not None:
        params["sslrootcert"] = str(cfg.sslrootcert)
    return f"postgresql://{auth}@{host}:{cfg.port}/{quote(cfg.database or database, safe='')}?{urlencode(params)}"
