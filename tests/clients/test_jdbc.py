"""pgjdbc (Debian's libpostgresql-jdbc-java, on the system JRE) through the proxy: verify-full TLS and a JWT,
a prepared statement with a parameter, a masked read, a denied and an approval-needing statement."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from client_matrix import Matrix

pytestmark = pytest.mark.timeout(120)
CLIENT = Path(__file__).parent / "jdbc" / "Client.java"
DRIVER = Path("/usr/share/java/postgresql.jar")  # apt-get install libpostgresql-jdbc-java


@pytest.fixture(scope="module")
def java() -> str:
    path = shutil.which("java")
    if path is None:
        pytest.skip("a Java runtime is needed for the JDBC client (apt-get install default-jre-headless)")
    assert DRIVER.is_file(), f"{DRIVER} is missing: apt-get install libpostgresql-jdbc-java"
    return path


def test_pgjdbc_scenario(java: str, matrix: Matrix) -> None:
    url = (f"jdbc:postgresql://localhost:{matrix.port}/{matrix.database}?sslmode=verify-full"
           f"&sslrootcert={matrix.ca_file}&ApplicationName=pgjdbc-matrix")
    done = subprocess.run([java, "-cp", str(DRIVER), str(CLIENT), url, "agent_writer", matrix.token],
                          capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stderr
    steps = {line.split("\t")[0]: line.split("\t")[1:] for line in done.stdout.splitlines()}
    assert steps["parameterised"] == ["ok", matrix.parameterised_name]
    assert steps["masked"] == ["ok", matrix.masked_email]
    assert steps["denied"][:2] == ["error", matrix.denied_sqlstate] and matrix.denied_message in steps["denied"][2]
    outcome, sqlstate, message = steps["approval"]
    assert (outcome, sqlstate) == ("error", matrix.approval_sqlstate)
    approval_id = message[message.index("apr_"):].split()[0]
    assert approval_id in matrix.pending_approvals()
    assert f"pgproxy approvals approve {approval_id}" in message
    assert steps["after"] == ["ok", "2"]
