"""``GET /metrics`` on the admin listener: the proxy's Prometheus metrics (``pgproxy.metrics``).

Open when ``admin.metrics_token_env`` is unset (the admin listener is on loopback or behind TLS, and
metrics carry counts and fixed label values, never SQL, parameters or identities). When it is set, a
scrape needs ``Authorization: Bearer <the variable's value>`` (compared in constant time); anything
else is answered 401. The text or OpenMetrics format is chosen from the scraper's Accept header.
"""

from __future__ import annotations

import hmac

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from pgproxy.config import AdminConfig
from pgproxy.metrics import ProxyMetrics


def add_metrics_route(app: web.Application, metrics: ProxyMetrics, config: AdminConfig) -> None:
    """Serve ``metrics`` at /metrics of ``app`` (before the app starts; ConfigError if the token is unset)."""
    expected = config.metrics_token()
    expected_header = f"Bearer {expected}".encode() if expected is not None else None

    async def scrape(request: web.Request) -> web.Response:
        if expected_header is not None:
            given = request.headers.get("Authorization", "").encode("utf-8", "replace")
            if not hmac.compare_digest(given, expected_header):
                return web.json_response({"error": "missing or wrong bearer token for /metrics"}, status=401,
                                         headers={"WWW-Authenticate": 'Bearer realm="pgproxy-metrics"',
                                                  "Cache-Control": "no-store"})
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encode(metrics.registry), headers={"Content-Type": content_type})

    app.router.add_get("/metrics", scrape)
