"""Fixtures for driving the proxy through a real MCP PostgreSQL server, as an LLM agent's tool host does.

What for: ``mcp_server`` is the installed ``@modelcontextprotocol/server-postgres`` (pinned in this
directory's package.json / package-lock.json; installed with ``npm ci`` here if missing).

Must never: skip for a reason other than Node.js/npm being absent.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent
SERVER_JS = HERE / "node_modules" / "@modelcontextprotocol" / "server-postgres" / "dist" / "index.js"


@pytest.fixture(scope="session")
def mcp_server() -> Path:
    """The MCP server's entry point; installs the pinned package on first use."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js and npm are needed to run the MCP PostgreSQL server (apt-get install nodejs npm)")
    if not SERVER_JS.exists():
        done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=HERE, capture_output=True, text=True,
                              timeout=300, check=False)
        assert done.returncode == 0, f"npm ci in {HERE} failed:\n{done.stdout}\n{done.stderr}"
    assert SERVER_JS.exists(), f"npm ci did not install {SERVER_JS}"
    return SERVER_JS
