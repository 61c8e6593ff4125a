"""Operating a running proxy: config reload (SIGHUP and the admin API) under live sessions, health
endpoints, the version. Each through a real `pgproxy serve` or proxy and real clients."""

from __future__ import annotations

import contextlib
import copy
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import yaml
from harness import ProxyUnderTest
from rawwire import start_serve

from pgproxy import __version__
from pgproxy.audit.sink import JsonLinesAuditSink
from pgproxy.config import load_config, parse_config
from pgproxy.reload import ReloadError
from pgproxy.testing import RunningProxy
from pgproxy.tlsutil import generate_dev_ca_and_cert

ALLOW_ALL = "rules: []\ndefault: allow\n"
DENY_READS = """
rules:
  - name: no-reads
    match: {classes: [read]}
    action: deny
    message: reads are switched off
default: allow
"""


def _wait_for_line(lines: list[str], text: str, start: int = 0, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in lines[start:]:
            if text in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"no log line with {text!r}: {''.join(lines[start:])}")


def test_version() -> None:
    out = subprocess.run([sys.executable, "-m", "pgproxy", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"pgproxy {__version__}"
    assert __version__ != "0+unknown"  # read from the installed package


def test_sighup_reloads_the_policy_under_a_live_session(proxy: ProxyUnderTest, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(ALLOW_ALL)

    def with_policy(data: dict[str, Any]) -> None:
        data["policy"] = {"file": str(policy)}

    serve = start_serve(proxy.config_data, tmp_path, mutate=with_policy, log_level="INFO")
    try:
        assert any(f"pgproxy {__version__} listening on ports" in line for line in serve.stderr_lines)
        port = str(serve.ports[1])
        with psycopg.connect(proxy.dsn(tls=False, port=port), autocommit=True) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
            # A reload with the new policy: the open session stays and gets it at its next statement.
            policy.write_text(DENY_READS)
            mark = len(serve.stderr_lines)
            serve.process.send_signal(signal.SIGHUP)
            _wait_for_line(serve.stderr_lines, "config reloaded", mark)
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="reads are switched off"):
                conn.execute("select 1")
            conn.execute("set application_name = 'still-here'")  # the session survived the reload
            with psycopg.connect(proxy.dsn(tls=False, port=port), autocommit=True) as fresh, \
                    pytest.raises(psycopg.errors.InsufficientPrivilege):
                fresh.execute("select 2")
            # A broken policy: the reload fails, says why, and the running policy stays.
            policy.write_text("rules: [{name: x, match: {}, action: explode}]\n")
            mark = len(serve.stderr_lines)
            serve.process.send_signal(signal.SIGHUP)
            line = _wait_for_line(serve.stderr_lines, "config reload failed", mark)
            assert "running config stays in force" in line and "action" in line, line
            assert serve.process.poll() is None
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="reads are switched off"):
                conn.execute("select 3")
            conn.execute("set application_name = 'still-here-too'")  # and survived the failed one
    finally:
        assert serve.stop() == 0


def _admin_config(proxy: ProxyUnderTest, tmp_path: Path, **changes: Any) -> Path:
    data = copy.deepcopy(proxy.config_data)
    data["approvals"] = {"store": "sqlite", "path": str(tmp_path / "approvals.sqlite")}
    data["admin"] = {"host": "127.0.0.1", "port": 0, "operator_groups": ["ops"]}
    data["audit"] = {"jsonl_path": str(tmp_path / "audit.jsonl")}
    data.update(changes)
    path = tmp_path / "pgproxy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _request(port: int, path: str, *, method: str = "GET", token: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, headers=headers,
                                     data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_reload_over_the_admin_api(proxy: ProxyUnderTest, tmp_path: Path) -> None:
    config = _admin_config(proxy, tmp_path)
    running = RunningProxy(load_config(config)).start()
    try:
        assert running.server is not None and running.server.admin is not None
        admin = running.server.admin.port
        assert _request(admin, "/api/reload", method="POST")[0] == 401
        status, body = _request(admin, "/api/reload", method="POST", token=proxy.token(groups=("agents",)))
        assert status == 403 and "ops" in body["error"]
        operator = proxy.token(sub="oncall", groups=("ops",))
        # A new TLS certificate (from another CA) is presented to new connections after the reload.
        new_tls = generate_dev_ca_and_cert(tmp_path / "new-tls")
        data = yaml.safe_load(config.read_text())
        data["listeners"][0]["tls"] = {"cert_file": str(new_tls.cert_file), "key_file": str(new_tls.key_file)}
        data["limits"]["max_connections"] = 7
        config.write_text(yaml.safe_dump(data))
        conn = psycopg.connect(proxy.dsn(port=str(running.ports[0])))  # open across the reload
        status, body = _request(admin, "/api/reload", method="POST", token=operator)
        assert status == 200 and body["reloaded"] is True
        assert running.server.config.limits.max_connections == 7
        assert running.server.admin.service.verifier is running.server.verifier  # the reloaded identity settings
        with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
            psycopg.connect(proxy.dsn(port=str(running.ports[0])))
        new_dsn = proxy.dsn(port=str(running.ports[0])) + f" sslrootcert='{new_tls.ca_file}'"
        with psycopg.connect(new_dsn) as fresh:
            assert fresh.execute("select 1").fetchone() == (1,)
        assert conn.execute("select 2").fetchone() == (2,)
        # Settings that need a restart are refused by name, and nothing of the file is applied.
        data["listeners"][1]["port"] = 1
        data["limits"]["max_connections"] = 9
        config.write_text(yaml.safe_dump(data))
        status, body = _request(admin, "/api/reload", method="POST", token=operator)
        assert status == 409 and "listeners[1].port" in body["error"] and "restart" in body["error"], body
        assert running.server.config.limits.max_connections == 7
        config.write_text("listeners: [")
        status, body = _request(admin, "/api/reload", method="POST", token=operator)
        assert status == 409 and "invalid YAML" in body["error"]
        assert conn.execute("select 3").fetchone() == (3,)
        conn.close()
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10).read().decode()
        assert 'pgproxy_config_reloads_total{outcome="ok"} 1.0' in metrics
        assert 'pgproxy_config_reloads_total{outcome="failed"} 2.0' in metrics
        assert f'pgproxy_build_info{{version="{__version__}"}} 1.0' in metrics
    finally:
        running.stop()


def test_reload_without_a_file_is_refused(proxy: ProxyUnderTest) -> None:
    with pytest.raises(ReloadError, match="not read from a file"):
        proxy.running.call(proxy.running.server.reload())  # type: ignore[union-attr]


def test_health_endpoints(proxy: ProxyUnderTest, tmp_path: Path) -> None:
    running = RunningProxy(load_config(_admin_config(proxy, tmp_path))).start()
    try:
        assert running.server is not None and running.server.admin is not None
        admin = running.server.admin.port
        assert _request(admin, "/livez") == (200, {"status": "alive", "version": __version__})
        assert _request(admin, "/readyz") == (200, {"status": "ready", "checks": {
            "upstream": "ok", "audit": "ok", "approvals": "ok"}})
    finally:
        running.stop()


def test_readiness_fails_without_upstream_or_audit(proxy: ProxyUnderTest, tmp_path: Path) -> None:
    with socketless_port() as closed:
        data = yaml.safe_load(_admin_config(proxy, tmp_path).read_text())
        data["upstream"]["port"] = closed
        full = JsonLinesAuditSink(Path("/dev/full"))  # every write fails with ENOSPC
        running = RunningProxy(parse_config(data, tmp_path), audit=full).start()
        try:
            assert running.server is not None and running.server.admin is not None
            admin = running.server.admin.port
            with pytest.raises(psycopg.OperationalError):  # its audit record cannot be written
                psycopg.connect(proxy.dsn(tls=False, port=str(running.ports[1]), token="not-a-jwt"))
            status, body = _request(admin, "/readyz")
            assert status == 503 and body["status"] == "not ready"
            assert body["checks"] == {"upstream": "unreachable", "audit": "not writable", "approvals": "ok"}
            assert str(closed) not in json.dumps(body)  # no address in the answer
            assert _request(admin, "/livez")[0] == 200
        finally:
            with contextlib.suppress(OSError):  # closing a log on a full device fails as well
                running.stop()
            running.loop.call_soon_threadsafe(running.loop.stop)


class socketless_port:
    """A loopback port that nothing listens on (bound, not listening, while in use)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


async def test_asyncpg_session_survives_reload(proxy: ProxyUnderTest, tmp_path: Path) -> None:
    """An open asyncpg session keeps working across reloads (no drop, no re-login)."""
    running = RunningProxy(load_config(_admin_config(proxy, tmp_path))).start()
    try:
        assert running.server is not None
        conn = await asyncpg.connect(host="127.0.0.1", port=running.ports[1], user="agent_reader",
                                     password=proxy.token(), database=proxy.database.database, ssl=False)
        pid = await conn.fetchval("select pg_backend_pid()")
        for _ in range(3):
            running.call(running.server.reload())
            assert await conn.fetchval("select pg_backend_pid()") == pid
        await conn.close()
    finally:
        running.stop()
