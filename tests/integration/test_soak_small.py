"""A small, bounded soak (issue 9): 200 sessions held open plus a mixed asyncpg workload for 20 s through
`pgproxy serve` run as its own process. Zero errors, every held session still answers at the end, the
proxy's memory stays flat once warm and its file descriptors come back when the clients leave.

The full-size soak (1,000 connections, minutes) is bench/soak.py; this test runs its core.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from harness import ProxyUnderTest
from rawwire import serving

pytestmark = pytest.mark.timeout(150)

ROOT = Path(__file__).resolve().parents[2]
CONNECTIONS = 200
WORKERS = 8
DURATION = 20.0
WARMUP = 5.0
# Allowed RSS growth of the proxy between the first sample after warm-up and the end (KiB).
RSS_GROWTH_LIMIT_KIB = 12 * 1024


def _load_soak() -> Any:
    spec = importlib.util.spec_from_file_location("pgproxy_bench_soak", ROOT / "bench" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_small_soak(proxy: ProxyUnderTest, upstream_roles: str, tmp_path: Path) -> None:
    soak = _load_soak()
    soak.raise_fd_limit(4 * CONNECTIONS + 200)
    role = "agent_writer"
    asyncio.run(soak.prepare_schema(proxy.database.dsn(), role))
    tokens: dict[str, str] = {}

    with serving(proxy.config_data, tmp_path) as srv:
        port = srv.ports[1]

        async def connect(subject: str) -> Any:
            token = tokens.get(subject)
            if token is None:
                token = tokens[subject] = proxy.token(sub=f"soak-{subject}", roles=(role,), ttl=600)
            return await asyncpg.connect(host="127.0.0.1", port=port, user=role, password=token,
                                         database=proxy.database.database, ssl=False, timeout=30, command_timeout=30)

        result = asyncio.run(soak.run_soak(connect=connect, proxy_pid=srv.pid, connections=CONNECTIONS,
                                           workers=WORKERS, duration=DURATION, sample_interval=2.5))
        report = soak.report(result, {"test": "tests/integration/test_soak_small.py"})
        assert srv.process.poll() is None, "the proxy died during the soak"

    assert result.total_errors == 0, report
    assert result.held_ok_at_end == CONNECTIONS, report
    assert result.ops["read"] > 100 and result.ops["write"] > 50 and result.ops["prepared"] > 50, report
    growth = result.rss_growth_kib(WARMUP)
    assert growth < RSS_GROWTH_LIMIT_KIB, f"proxy RSS grew by {growth} KiB after warm-up\n{report}"
    assert result.fds_after_close <= result.fds_before + 2, f"file descriptors leaked\n{report}"
