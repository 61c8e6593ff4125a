"""JSON log lines: the formatter itself, and `pgproxy serve --log-format json` as a real process."""

from __future__ import annotations

import io
import json
import logging
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
import yaml

from pgproxy.config import ConfigError, parse_config
from pgproxy.identity import DevKeys, mint_token
from pgproxy.logsetup import JsonFormatter, session_context, status_line

ISSUER, AUDIENCE = "https://issuer.test", "pgproxy-test"


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("pgproxy.test_json_logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_fields_of_a_plain_line(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    logger.warning("listening on %s:%d", "127.0.0.1", 6432)
    [entry] = lines(stream)
    assert set(entry) == {"ts", "level", "logger", "message"}
    assert entry["level"] == "WARNING" and entry["logger"] == "pgproxy.test_json_logs"
    assert entry["message"] == "listening on 127.0.0.1:6432"
    assert entry["ts"].endswith("Z") and entry["ts"][10] == "T"


def test_session_and_subject_from_the_context(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    session = SimpleNamespace(id="0123456789abcdef", identity=None)
    token = session_context.set(session)
    try:
        logger.info("before login")
        session.identity = SimpleNamespace(subject="agent-7")
        logger.info("after login")
    finally:
        session_context.reset(token)
    logger.info("session %s: named in the message", "fedcba9876543210")
    logger.info("no session")
    before, after, named, none = lines(stream)
    assert before["session"] == "0123456789abcdef" and "subject" not in before
    assert after["session"] == "0123456789abcdef" and after["subject"] == "agent-7"
    assert named["session"] == "fedcba9876543210"
    assert named["message"] == "session fedcba9876543210: named in the message"
    assert "session" not in none


def test_exceptions_and_odd_messages_stay_one_line(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        logger.exception("failed with %r", {"key": b"\xff"})
    logger.info("multi\nline \"quoted\" \u00e9")
    assert len(stream.getvalue().splitlines()) == 2
    failed, multi = lines(stream)
    assert failed["level"] == "ERROR" and "ValueError: boom" in failed["exc"]
    assert multi["message"] == "multi\nline \"quoted\" \u00e9"


def test_status_line() -> None:
    assert status_line("pgproxy listening on ports 1", "text") == "pgproxy listening on ports 1"
    entry = json.loads(status_line("pgproxy listening on ports 1", "json"))
    assert entry["message"] == "pgproxy listening on ports 1" and entry["level"] == "INFO"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(keys: DevKeys, tmp_path: Path, **sections: Any) -> dict[str, Any]:
    return {
        "listeners": [{"host": "127.0.0.1", "port": 0, "insecure_plaintext": True}],
        "identity": {"issuer": ISSUER, "audience": AUDIENCE, "algorithms": ["ES256"], "jwks_file": str(keys.jwks_file)},
        "upstream": {"port": _free_port(), "connect_timeout_seconds": 2, "credentials": [{"role": "*"}]},
        "audit": {"jsonl_path": str(tmp_path / "audit.jsonl")},
        **sections,
    }


def test_logging_format_in_the_config(dev_keys: DevKeys, tmp_path: Path) -> None:
    assert parse_config(_config(dev_keys, tmp_path), tmp_path).logging.format == "text"
    assert parse_config(_config(dev_keys, tmp_path, logging={"format": "json"}), tmp_path).logging.format == "json"
    with pytest.raises(ConfigError, match=r"logging\.format: must be one of text, json"):
        parse_config(_config(dev_keys, tmp_path, logging={"format": "xml"}), tmp_path)
    with pytest.raises(ConfigError, match=r"logging\.level: unknown setting"):
        parse_config(_config(dev_keys, tmp_path, logging={"level": "INFO"}), tmp_path)


def test_serve_logs_json(dev_keys: DevKeys, tmp_path: Path) -> None:
    """A real `pgproxy serve`: every stderr line is a JSON object; a session's warning names it and its subject."""
    config = _config(dev_keys, tmp_path)
    (tmp_path / "pgproxy.yaml").write_text(yaml.safe_dump(config))
    process = subprocess.Popen([sys.executable, "-m", "pgproxy", "serve", "--log-format", "json", "-c",
                                str(tmp_path / "pgproxy.yaml")], stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    try:
        seen: list[dict[str, Any]] = []
        while not seen or "listening on ports" not in seen[-1]["message"]:
            line = process.stderr.readline()
            assert line, f"serve exited: {seen}"
            seen.append(json.loads(line))
        port = seen[-1]["message"].rsplit(" ", 1)[1]
        token = mint_token(dev_keys.private_key_file, issuer=ISSUER, audience=AUDIENCE, subject="agent-9",
                           db_role=["agent_reader"], ttl_seconds=60)
        with pytest.raises(psycopg.OperationalError):  # the upstream is down: the session logs a warning
            psycopg.connect(host="127.0.0.1", port=port, user="agent_reader", password=token, dbname="x",
                            sslmode="disable")
    finally:
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=30)
    entries = seen + [json.loads(line) for line in rest.splitlines()]
    assert all({"ts", "level", "logger", "message"} <= set(e) for e in entries)
    [warning] = [e for e in entries if e["logger"] == "pgproxy.server.session"]
    assert warning["level"] == "WARNING" and warning["subject"] == "agent-9"
    assert len(warning["session"]) == 16 and warning["message"].startswith(f"session {warning['session']}: ")
    assert token not in rest
