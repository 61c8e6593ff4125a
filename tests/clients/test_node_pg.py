"""Node.js `pg` (the npm package pinned in tests/clients/node) through the proxy: TLS and a JWT, a
parameterised query, a masked read, a denied and an approval-needing statement, then a clean close."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from client_matrix import Matrix

pytestmark = pytest.mark.timeout(120)
HERE = Path(__file__).parent / "node"


@pytest.fixture(scope="module")
def node_pg() -> Path:
    """The client script, with `pg` installed by `npm ci` (pinned in package-lock.json) if missing."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js and npm are needed for the Node.js client (apt-get install nodejs npm)")
    if not (HERE / "node_modules" / "pg").is_dir():
        done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=HERE,
                              capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, f"npm ci in {HERE} failed:\n{done.stdout}\n{done.stderr}"
    return HERE / "client.js"


def test_node_pg_scenario(node_pg: Path, matrix: Matrix) -> None:
    env = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(matrix.port), "PGUSER": "agent_writer",
           "PGPASSWORD": matrix.token, "PGDATABASE": matrix.database, "PGSSLROOTCERT": str(matrix.ca_file),
           "PGAPPNAME": "node-pg-matrix"}
    done = subprocess.run(["node", str(node_pg)], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["parameterised"] == {"rows": [{"name": matrix.parameterised_name}]}
    assert report["masked"] == {"rows": [{"email": matrix.masked_email}]}
    assert report["denied"]["code"] == matrix.denied_sqlstate
    assert matrix.denied_message in report["denied"]["message"]
    approval = report["approval"]
    assert approval["code"] == matrix.approval_sqlstate
    approval_id = approval["message"][approval["message"].index("apr_"):].split()[0]
    assert approval_id in matrix.pending_approvals()
    assert f"pgproxy approvals approve {approval_id}" in approval["message"]
    assert report["after"] == {"rows": [{"n": 2}]}
    # client.end() sends Terminate: the session ended cleanly, not as a lost upstream.
    deadline = time.monotonic() + 10
    while True:
        ids = {e["session"] for e in matrix.proxy.events("session_start")
               if e.get("application_name") == "node-pg-matrix"}
        ends = [e for e in matrix.proxy.events("session_end") if e["session"] in ids]
        if ends or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert [e["reason"] for e in ends] == ["client terminated"]
