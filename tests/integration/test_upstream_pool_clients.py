"""Real clients (psql, asyncpg, psycopg) run a subset of their conformance tests through a proxy with
``upstream.pool`` enabled: sessions get connections earlier sessions left, and see nothing of them.

The tests are the client suites' own, collected here a second time against the pooled proxy (the module's
``proxy`` fixture overrides the shared one). The last test checks that connections were in fact reused.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from harness import ProxyUnderTest, config_edit
from test_clients_asyncpg import (  # noqa: F401
    conn,
    test_copy_records_to_table_and_back,
    test_cursor_with_prefetch,
    test_notify_reaches_listener,
    test_prepared_statement_reused,
    test_transactions,
)
from test_clients_psql import (  # noqa: F401
    test_backend_pid_matches_upstream,
    test_copy_text_and_csv_in_and_out,
    test_set_sends_parameter_status,
    test_startup_parameters_reach_upstream_verbatim,
    upstream,
)
from test_clients_psycopg import (  # noqa: F401
    test_autocommit_and_transactions,
    test_cancel_from_another_thread,
    test_named_cursor_with_itersize,
    test_notifies_generator,
    test_pipeline_error_aborts_rest_of_sync_block_then_recovers,
    test_server_side_prepare,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def proxy(proxy: ProxyUnderTest) -> Iterator[ProxyUnderTest]:
    """The shared proxy's config with the pool on."""
    pooled = proxy.variant(config_edit("upstream.pool", {"enabled": True}))
    try:
        yield pooled
    finally:
        pooled.running.stop()


def test_connections_were_reused(proxy: ProxyUnderTest) -> None:
    starts = proxy.events("session_start")
    assert sum(e["upstream_reused"] for e in starts) >= 5, [e.get("application_name") for e in starts]
