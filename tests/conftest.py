"""Shared pytest fixtures.

What for: one upstream PostgreSQL per test session (``database``, via ``pgproxy.devdb.start_database``:
``$PGPROXY_TEST_DSN`` > testcontainers when a Docker engine answers > a local temporary cluster) and dev
TLS material (``tls_files``).

Must never: start a server on a fixed port, or wipe a database it did not create.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pgproxy.devdb import Database, start_database
from pgproxy.tlsutil import DevTLS, generate_dev_ca_and_cert

# --------------------------------------------------------------------------------------------------
# Upstream database and TLS material
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def database() -> Iterator[Database]:
    """A running PostgreSQL with superuser credentials, shared by the whole session."""
    db, stop = start_database()
    try:
        yield db
    finally:
        stop()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> DevTLS:
    """A dev CA and a server certificate for localhost / 127.0.0.1 / ::1."""
    return generate_dev_ca_and_cert(tmp_path_factory.mktemp("tls"))


# --------------------------------------------------------------------------------------------------
# Proxy fixtures (added by the lead)
# --------------------------------------------------------------------------------------------------
