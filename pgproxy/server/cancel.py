"""Map the cancel keys the proxy hands to clients onto the upstream backends' real keys.

Clients see the upstream backend's process id (so ``pg_backend_pid()``, NOTIFY senders and
pg_stat_activity agree) but a secret key issued by the proxy: the real upstream secret never leaves
the proxy, and a cancel is only forwarded when the client's key matches one we issued.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from dataclasses import dataclass

from ..protocol.startup import CancelRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Target:
    proxy_secret: int
    upstream_secret: int
    host: str
    port: int


class CancelRegistry:
    """Live sessions' cancel keys, keyed by upstream process id."""

    def __init__(self) -> None:
        self._targets: dict[int, _Target] = {}

    def register(self, process_id: int, upstream_secret: int, host: str, port: int) -> int:
        """Remember an upstream backend; returns the secret key to give the client."""
        proxy_secret = secrets.randbits(32)
        self._targets[process_id] = _Target(proxy_secret, upstream_secret, host, port)
        return proxy_secret

    def unregister(self, process_id: int, proxy_secret: int) -> None:
        target = self._targets.get(process_id)
        if target is not None and target.proxy_secret == proxy_secret:
            del self._targets[process_id]

    def __len__(self) -> int:
        return len(self._targets)

    async def cancel(self, request: CancelRequest, timeout: float) -> bool:
        """Forward a client's CancelRequest upstream if its key is one we issued; True if forwarded."""
        target = self._targets.get(request.process_id)
        if target is None or not hmac.compare_digest(target.proxy_secret.to_bytes(4, "big"),
                                                     request.secret_key.to_bytes(4, "big")):
            log.info("cancel request with unknown key for pid %d ignored", request.process_id)
            return False
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(target.host, target.port), timeout)
        except (OSError, TimeoutError) as exc:
            log.warning("cannot forward cancel for pid %d: %s", request.process_id, exc)
            return False
        try:
            writer.write(CancelRequest(request.process_id, target.upstream_secret).encode())
            await asyncio.wait_for(writer.drain(), timeout)
            # PostgreSQL closes the cancel connection once it has signalled the backend; libpq and
            # asyncpg take that EOF as "cancel processed", so the client's socket closes only after it.
            try:
                await asyncio.wait_for(reader.read(), timeout)
            except (OSError, TimeoutError) as exc:
                log.warning("upstream did not close the cancel connection for pid %d: %s", request.process_id, exc)
        finally:
            writer.close()
        return True
