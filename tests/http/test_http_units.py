"""The sans-I/O parts of the HTTP proxy: config validation, JSON paths and masking, credential scrubbing,
audit body records, the HTTP policy."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import config_edit as edit
from http_helpers import CREDENTIAL, CREDENTIAL_ENV, config_data, token

from pgproxy.config import ConfigError, parse_config
from pgproxy.http.audit import BodyTap, body_record, headers_record
from pgproxy.http.jsonmask import MASK, mask_json, parse_path
from pgproxy.http.scrub import Scrubber
from pgproxy.identity import DevKeys, TokenVerifier


@pytest.fixture
def data(dev_keys: DevKeys, tmp_path: Path) -> dict[str, Any]:
    return config_data(dev_keys, "http://127.0.0.1:1", tmp_path)


@pytest.mark.parametrize(("mutate", "error"), [
    (edit("http.listen.port", None), r"http\.listen\.port: required"),
    (edit("http.listen.insecure_plaintext", False), r"http\.listen: a listener needs tls"),
    (edit("http.listen.host", "0.0.0.0"), r"http\.listen\.insecure_plaintext: only allowed on a loopback host"),
    (edit("http.targets", []), r"http\.targets: at least one target"),
    (edit("http.targets.1.name", "api"), r"http\.targets\[1\]\.name: duplicate target name"),
    (edit("http.targets.0.name", "a/b"), r"http\.targets\[0\]\.name: letters"),
    (edit("http.targets.0.upstream", "https://user:pw@example.com"), r"http\.targets\[0\]\.upstream: no credentials"),
    (edit("http.targets.0.upstream", "http://api.example.com"), r"http\.targets\[0\]\.upstream: must be https"),
    (edit("http.targets.0.credential.kind", "cookie"), r"http\.targets\[0\]\.credential\.kind: must be one of"),
    (edit("http.targets.0.credential.value_file", "/etc/hostname"),
     r"http\.targets\[0\]\.credential: set exactly one of value_env or value_file"),
    (edit("http.targets.0.credential.username", "u"), r"http\.targets\[0\]\.credential\.username: only used"),
    (edit("http.targets.0.masks.0.paths", ["$..email"]), r"http\.targets\[0\]\.masks\[0\]\.paths\[0\]: invalid"),
    (edit("http.targets.0.masks.1.in", ["request"]), r"http\.targets\[0\]\.masks\[1\]\.caller: only applies"),
    (edit("http.targets.0.masks.0.in", []), r"http\.targets\[0\]\.masks\[0\]\.in: must list request and/or response"),
    (edit("http.targets.0.timeout", 3), r"http\.targets\[0\]\.timeout: unknown setting"),
    (edit("http.rules.0.match.methods", ["FETCH"]), r"http\.rules\[0\]\.match\.methods: unknown method"),
    (edit("http.rules.1.match.targets", ["nope"]), r"http\.rules\[1\]\.match\.targets: unknown target 'nope'"),
    (edit("http.rules.1.approvers", KeyError), r"http\.rules\[1\]\.approvers: required for action approve"),
    (edit("http.rules.2.mode", "later"), r"http\.rules\[2\]\.mode: must be refuse or hold"),
    (edit("http.rules.0.match.paths", ["echo"]), r"http\.rules\[0\]\.match\.paths: 'echo' must start with /"),
    (edit("http.default", "maybe"), r"http\.default: must be one of allow, deny"),
])
def test_config_errors_name_the_field(data: dict[str, Any], tmp_path: Path, mutate: Any, error: str) -> None:
    broken = copy.deepcopy(data)
    mutate(broken)
    with pytest.raises(ConfigError, match=error):
        parse_config(broken, tmp_path)


def test_config_parses(data: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    http = parse_config(data, tmp_path).http
    assert http is not None
    api = http.target("api")
    assert api is not None and api.credential is not None
    assert [str(p) for p in api.mask_paths("response", caller=True)] == ["$.customer.email"]
    assert len(api.mask_paths("request")) == 2
    with pytest.raises(ConfigError, match=rf"credential: environment variable {CREDENTIAL_ENV} is not set"):
        monkeypatch.delenv(CREDENTIAL_ENV, raising=False)
        api.credential.resolve()
    monkeypatch.setenv(CREDENTIAL_ENV, CREDENTIAL)
    assert api.credential.resolve() == ("Authorization", f"Bearer {CREDENTIAL}", (CREDENTIAL,))


async def test_policy_decisions(data: dict[str, Any], tmp_path: Path, dev_keys: DevKeys) -> None:
    config = parse_config(data, tmp_path)
    assert config.http is not None
    identity = await TokenVerifier(config.identity).verify(token(dev_keys))
    decide = config.http.policy.decide
    assert decide(identity, "api", "DELETE", "/x").action == "deny"
    refund = decide(identity, "api", "POST", "/echo/refunds/1")
    assert (refund.action, refund.rule, refund.approval and refund.approval.mode) == ("approve", "refunds", "refuse")
    assert decide(identity, "down", "POST", "/echo/refunds/1").action == "allow"  # the rule names target api
    assert decide(identity, "api", "GET", "/echo/refunds").action == "allow"
    data["http"]["default"] = None
    assert parse_config(data, tmp_path).http.policy.decide(identity, "api", "GET", "/").action == "deny"  # type: ignore[union-attr]


@pytest.mark.parametrize(("path", "segments"), [
    ("$.customer.email", ("customer", "email")),
    ("items[*].ssn", ("items", None, "ssn")),
    ("$['odd key'][0].*", ("odd key", 0, None)),
    ("$.a[-1]", ("a", -1)),
])
def test_parse_path(path: str, segments: tuple[Any, ...]) -> None:
    assert parse_path(path).segments == segments


@pytest.mark.parametrize("bad", ["$", "", "$.", "a..b", "a[x]", "a[1"])
def test_parse_path_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_path(bad)


def test_mask_json_copies_only_what_it_changes() -> None:
    doc = {"customer": {"email": "a@b.c", "name": "A"}, "items": [{"ssn": "1"}, {"ssn": "2", "x": [1]}],
           "other": {"k": 1}}
    masked, hits = mask_json(doc, [parse_path("$.customer.email"), parse_path("items[*].ssn"),
                                   parse_path("$.missing.field")])
    assert masked == {"customer": {"email": MASK, "name": "A"}, "items": [{"ssn": MASK}, {"ssn": MASK, "x": [1]}],
                      "other": {"k": 1}}
    assert hits == ["$.customer.email", "items[*].ssn"]
    assert doc["customer"]["email"] == "a@b.c" and masked["other"] is doc["other"]
    assert mask_json([1, 2], [parse_path("$.a")]) == ([1, 2], [])


def test_scrubber_catches_secrets_split_across_chunks() -> None:
    secret = "s3cr3t-value"
    scrub = Scrubber([secret, "xy"])
    data = f"before {secret} middle {secret}{secret} after".encode()
    for size in (1, 2, 5, len(data)):
        out = b"".join(scrub.feed(data[i:i + size]) for i in range(0, len(data), size)) + scrub.finish()
        assert len(out) == len(data) and secret.encode() not in out and b"xy" not in out
        assert out.startswith(b"before ************ middle")
    assert Scrubber([]).feed(b"abc") == b"abc"
    fresh = scrub.fresh()  # the same secrets, none of the state
    assert fresh.replaced == 0 and fresh.whole(data) == out and fresh.replaced == 3
    assert scrub.text(f"Bearer {secret}") == "Bearer ************"


def test_body_records() -> None:
    paths = (parse_path("$.email"),)
    tap = BodyTap(1024)
    tap.feed(b'{"email": "a@b.c", "token": "Bearer abcdefghijklmnopqrstuvwxyz"}')
    record = body_record(tap, "application/json", paths)
    assert record["json"] == {"email": MASK, "token": "Bearer [redacted:bearer_token]"}
    assert record["masked"] == ["$.email"] and record["sha256"] == tap.sha256

    big = BodyTap(8)
    body = b'{"email": "a@b.c"}'
    big.feed(body)
    cut = body_record(big, "application/json", paths)
    assert cut == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest(), "content_type": "application/json",
                   "omitted": "JSON over the audit cap cannot be masked"}
    text = BodyTap(4)
    text.feed(b"hello world")
    assert body_record(text, "text/plain", paths)["text"] == "hell"
    binary = BodyTap(64)
    binary.feed(bytes(range(128, 256)))
    assert body_record(binary, "", ())["omitted"] == "binary body"
    leaked = BodyTap(64)
    leaked.feed(b"the key is " + CREDENTIAL.encode())
    assert body_record(leaked, "text/plain", (), [CREDENTIAL])["omitted"] == "holds a credential"


def test_headers_record() -> None:
    record = headers_record([("Authorization", "Bearer x"), ("X-Key", "v"), ("Accept", "a"), ("Accept", "b"),
                             ("X-Note", "AKIAABCDEFGHIJKLMNOP")], ["x-key"])
    assert record == {"authorization": "[redacted]", "x-key": "[redacted]", "accept": "a, b",
                      "x-note": "[redacted:aws_access_key]"}


def test_check_command_reports_http_problems(data: dict[str, Any], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from pgproxy.cli import main

    monkeypatch.delenv(CREDENTIAL_ENV, raising=False)
    path = tmp_path / "pgproxy.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["check", "-c", str(path)])
    assert result.exit_code == 1
    assert (f"error: {path}: http.targets[0].credential: environment variable {CREDENTIAL_ENV} is not set"
            in result.output)
    monkeypatch.setenv(CREDENTIAL_ENV, CREDENTIAL)
    result = CliRunner().invoke(main, ["check", "-c", str(path)])
    assert result.exit_code == 0, result.output
