"""parse_config / load_config: the YAML schema, its defaults and its precise error paths."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from pgproxy.config import (
    CONFIG_ENV_VAR,
    ClaimNames,
    ConfigError,
    LimitsConfig,
    ProxyConfig,
    UpstreamConfig,
    UpstreamCredential,
    load_config,
    parse_config,
)


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    """A config directory holding the files the config refers to (relative paths)."""
    (tmp_path / "tls").mkdir()
    for name in ("tls/server.crt", "tls/server.key", "jwks.json", "ca.pem", "upstream.pw"):
        (tmp_path / name).write_text("placeholder\n")
    return tmp_path


def minimal() -> dict[str, Any]:
    return {
        "listeners": [{"host": "127.0.0.1", "port": 6432, "tls": {"cert_file": "tls/server.crt",
                                                                   "key_file": "tls/server.key"}}],
        "identity": {"issuer": "https://issuer.example", "audience": "pgproxy",
                     "algorithms": ["RS256"], "jwks_file": "jwks.json"},
        "upstream": {"credentials": [{"role": "*", "password_env": "UPSTREAM_PW"}]},
    }


def error_of(data: Any, base_dir: Path) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_config(data, base_dir)
    return str(exc.value)


def with_(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``data`` with the dotted ``path`` (``a.b[0].c``) set (or deleted when ``...``)."""
    out = copy.deepcopy(data)
    parts = [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", path)]
    node: Any = out
    for part in parts[:-1]:
        node = node.setdefault(part, {}) if isinstance(node, dict) else node[part]
    if value is ...:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return out


# --------------------------------------------------------------------------------------------------
# Valid configurations


def test_full_valid_config(base_dir: Path) -> None:
    data = {
        "listeners": [
            {"host": "0.0.0.0", "port": 5433,
             "tls": {"cert_file": "tls/server.crt", "key_file": str(base_dir / "tls/server.key")}},
            {"host": "127.0.0.1", "port": 6433, "insecure_plaintext": True},
        ],
        "identity": {
            "issuer": "https://issuer.example",
            "audience": "pgproxy",
            "algorithms": ["RS256", "ES256", "EdDSA"],
            "jwks_url": "https://issuer.example/.well-known/jwks.json",
            "leeway_seconds": 5,
            "jwks_cache_seconds": 60.5,
            "jwks_timeout_seconds": 2,
            "jwks_min_refresh_seconds": 1,
            "claims": {"subject": "email", "groups": "roles", "db_role": "pg_role"},
            "default_db_role": "reader",
            "dev_signing_key_file": "keys/dev-private.pem",
        },
        "upstream": {
            "host": "db.internal",
            "port": 5432,
            "database": "app",
            "sslmode": "verify-full",
            "sslrootcert": "ca.pem",
            "connect_timeout_seconds": 3,
            "credentials": [
                {"role": "admin", "password_file": "upstream.pw"},
                {"role": "*", "password_env": "UPSTREAM_PW"},
                {"role": "trusted"},
            ],
        },
        "limits": {"max_message_bytes": 1 << 20, "max_startup_packet_bytes": 4096, "startup_timeout_seconds": 2.5},
        "audit": {"jsonl_path": "audit/events.jsonl"},
    }
    source = base_dir / "pgproxy.yaml"
    cfg = parse_config(data, base_dir, source=source)
    assert isinstance(cfg, ProxyConfig)
    assert cfg.source == source

    tls_l, plain_l = cfg.listeners
    assert (tls_l.host, tls_l.port, tls_l.insecure_plaintext) == ("0.0.0.0", 5433, False)
    assert tls_l.tls is not None
    assert tls_l.tls.cert_file == base_dir / "tls/server.crt"
    assert tls_l.tls.key_file == base_dir / "tls/server.key"
    assert (plain_l.host, plain_l.port, plain_l.tls, plain_l.insecure_plaintext) == ("127.0.0.1", 6433, None, True)

    ident = cfg.identity
    assert ident.issuer == "https://issuer.example"
    assert ident.audience == "pgproxy"
    assert ident.algorithms == ("RS256", "ES256", "EdDSA")
    assert ident.jwks_url == "https://issuer.example/.well-known/jwks.json"
    assert ident.jwks_file is None and ident.hs256_secret_env is None
    assert (ident.leeway_seconds, ident.jwks_cache_seconds, ident.jwks_timeout_seconds,
            ident.jwks_min_refresh_seconds) == (5.0, 60.5, 2.0, 1.0)
    assert isinstance(ident.leeway_seconds, float)
    assert ident.claims == ClaimNames(subject="email", groups="roles", db_role="pg_role")
    assert ident.claims.agent_id == "agent_id"
    assert ident.default_db_role == "reader"
    # Need not exist (written by `pgproxy keys`), but is resolved against the config directory.
    assert ident.dev_signing_key_file == base_dir / "keys/dev-private.pem"

    up = cfg.upstream
    assert (up.host, up.port, up.database, up.sslmode) == ("db.internal", 5432, "app", "verify-full")
    assert up.sslrootcert == base_dir / "ca.pem"
    assert up.connect_timeout_seconds == 3.0
    assert [c.role for c in up.credentials] == ["admin", "*", "trusted"]
    assert up.credentials[0].password_file == base_dir / "upstream.pw"
    assert up.credentials[1].password_env == "UPSTREAM_PW"
    assert up.credentials[2].password_env is None and up.credentials[2].password_file is None

    assert cfg.limits == LimitsConfig(max_message_bytes=1 << 20, max_startup_packet_bytes=4096,
                                      startup_timeout_seconds=2.5)
    assert cfg.audit.jsonl_path == base_dir / "audit/events.jsonl"


def test_minimal_config_defaults(base_dir: Path) -> None:
    cfg = parse_config(minimal(), base_dir)
    assert cfg.source is None
    assert cfg.limits == LimitsConfig()
    assert cfg.audit.jsonl_path is None
    up = cfg.upstream
    assert (up.host, up.port, up.database, up.sslmode, up.sslrootcert) == ("127.0.0.1", 5432, None, "disable", None)
    assert cfg.identity.claims == ClaimNames()
    assert cfg.identity.leeway_seconds == 30.0
    assert cfg.identity.default_db_role is None


def test_listener_defaults(base_dir: Path) -> None:
    data = with_(minimal(), "listeners", [{"insecure_plaintext": True}])
    (listener,) = parse_config(data, base_dir).listeners
    assert (listener.host, listener.port) == ("127.0.0.1", 6432)


def test_hs256_with_secret_env(base_dir: Path) -> None:
    data = with_(minimal(), "identity.jwks_file", ...)
    data["identity"].update(algorithms=["HS256", "HS512"], hs256_secret_env="JWT_SECRET")
    ident = parse_config(data, base_dir).identity
    assert ident.algorithms == ("HS256", "HS512")
    assert ident.hs256_secret_env == "JWT_SECRET"


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/jwks.json", "http://localhost/jwks.json",
                                 "http://localhost:9999/.well-known/jwks.json"])
def test_plain_http_jwks_url_allowed_for_loopback(base_dir: Path, url: str) -> None:
    data = with_(minimal(), "identity.jwks_file", ...)
    data["identity"]["jwks_url"] = url
    assert parse_config(data, base_dir).identity.jwks_url == url


def test_absolute_paths_are_kept(base_dir: Path) -> None:
    data = with_(minimal(), "identity.jwks_file", str(base_dir / "jwks.json"))
    data["listeners"] = [{"insecure_plaintext": True}]
    other = base_dir / "elsewhere"
    other.mkdir()
    assert parse_config(data, other).identity.jwks_file == base_dir / "jwks.json"


def test_relative_paths_resolved_against_base_dir(base_dir: Path, tmp_path_factory: pytest.TempPathFactory,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))  # the working directory must not matter
    cfg = parse_config(minimal(), base_dir)
    assert cfg.identity.jwks_file == base_dir / "jwks.json"
    assert cfg.listeners[0].tls is not None
    assert cfg.listeners[0].tls.cert_file == base_dir / "tls" / "server.crt"


# --------------------------------------------------------------------------------------------------
# Errors: each names the dotted path of the offending field


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("upstream.sslmode", "prefer", "upstream.sslmode"),
        ("upstream.sslmode", 3, "upstream.sslmode"),
        ("upstream.port", 70000, "upstream.port"),
        ("upstream.port", "5432", "upstream.port"),
        ("upstream.port", True, "upstream.port"),
        ("upstream.host", "", "upstream.host"),
        ("upstream.connect_timeout_seconds", 0, "upstream.connect_timeout_seconds"),
        ("upstream.connect_timeout_seconds", "fast", "upstream.connect_timeout_seconds"),
        ("upstream.sslrootcert", "missing.pem", "upstream.sslrootcert"),
        ("upstream.credentials", [], "upstream.credentials"),
        ("upstream.credentials", {"role": "*"}, "upstream.credentials"),
        ("upstream.credentials", ["*"], "upstream.credentials[0]"),
        ("upstream.credentials[0].role", None, "upstream.credentials[0].role"),
        ("upstream.credentials[0].password_env", 5, "upstream.credentials[0].password_env"),
        ("upstream.credentials[0].password_file", "nope.pw", "upstream.credentials[0].password_file"),
        ("upstream.credentials[0].extra", 1, "upstream.credentials[0].extra"),
        ("upstream.bogus", 1, "upstream.bogus"),
        ("upstream", ..., "upstream"),
        ("upstream", ["x"], "upstream"),
        ("listeners", [], "listeners"),
        ("listeners", ..., "listeners"),
        ("listeners", {"host": "x"}, "listeners"),
        ("listeners", ["127.0.0.1:6432"], "listeners[0]"),
        ("listeners[0].port", -1, "listeners[0].port"),
        ("listeners[0].port", 65536, "listeners[0].port"),
        ("listeners[0].insecure_plaintext", "yes", "listeners[0].insecure_plaintext"),
        ("listeners[0].tls", "on", "listeners[0].tls"),
        ("listeners[0].tls", {"cert_file": "tls/server.crt"}, "listeners[0].tls.key_file"),
        ("listeners[0].tls.cert_file", "tls/missing.crt", "listeners[0].tls.cert_file"),
        ("listeners[0].tls.ca_file", "tls/server.crt", "listeners[0].tls.ca_file"),
        ("listeners[0].hots", "127.0.0.1", "listeners[0].hots"),
        ("identity", ..., "identity"),
        ("identity.algorithms", ..., "identity.algorithms"),
        ("identity.algorithms", [], "identity.algorithms"),
        ("identity.algorithms", "RS256", "identity.algorithms"),
        ("identity.algorithms", ["none"], "identity.algorithms[0]"),
        ("identity.algorithms", ["rs256"], "identity.algorithms[0]"),
        ("identity.algorithms", [256], "identity.algorithms[0]"),
        ("identity.algorithms", ["RS256", "HS256"], "identity.algorithms"),
        ("identity.issuer", ..., "identity.issuer"),
        ("identity.audience", "", "identity.audience"),
        ("identity.jwks_file", "missing.json", "identity.jwks_file"),
        ("identity.leeway_seconds", -1, "identity.leeway_seconds"),
        ("identity.leeway_seconds", 300, "identity.leeway_seconds"),
        ("identity.jwks_timeout_seconds", 0.01, "identity.jwks_timeout_seconds"),
        ("identity.claims", ["sub"], "identity.claims"),
        ("identity.claims.subject", 1, "identity.claims.subject"),
        ("identity.claims.email", "mail", "identity.claims.email"),
        ("identity.kid", "k1", "identity.kid"),
        ("limits.max_message_bytes", 100, "limits.max_message_bytes"),
        ("limits.max_message_bytes", 1 << 31, "limits.max_message_bytes"),
        ("limits.max_startup_packet_bytes", 10, "limits.max_startup_packet_bytes"),
        ("limits.startup_timeout_seconds", 0, "limits.startup_timeout_seconds"),
        ("limits.max_rows", 10, "limits.max_rows"),
        ("limits", 5, "limits"),
        ("audit.jsonl_path", 7, "audit.jsonl_path"),
        ("audit.syslog", True, "audit.syslog"),
        ("bogus_top", 1, "bogus_top"),
    ],
)
def test_error_names_the_dotted_path(base_dir: Path, path: str, value: Any, expected: str) -> None:
    message = error_of(with_(minimal(), path, value), base_dir)
    assert message.startswith(expected + ":"), message


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("upstream.bogus", 1, "upstream.bogus: unknown setting"),
        ("listeners[0].hots", "x", "listeners[0].hots: unknown setting"),
        ("identity.claims.email", "mail", "identity.claims.email: unknown setting"),
        ("bogus_top", 1, "bogus_top: unknown setting"),
        ("limits.max_rows", 10, "limits.max_rows: unknown setting"),
    ],
)
def test_unknown_keys(base_dir: Path, path: str, value: Any, expected: str) -> None:
    assert error_of(with_(minimal(), path, value), base_dir) == expected


def test_unknown_key_of_a_second_credential(base_dir: Path) -> None:
    data = minimal()
    data["upstream"]["credentials"].append({"role": "admin", "pasword_env": "X"})
    assert error_of(data, base_dir) == "upstream.credentials[1].pasword_env: unknown setting"


def test_credential_with_both_password_sources(base_dir: Path) -> None:
    data = minimal()
    data["upstream"]["credentials"].append({"role": "admin", "password_env": "X", "password_file": "upstream.pw"})
    message = error_of(data, base_dir)
    assert message.startswith("upstream.credentials[1]:")
    assert "not both" in message


def test_second_listener_error(base_dir: Path) -> None:
    data = minimal()
    data["listeners"].append({"port": "6433", "insecure_plaintext": True})
    assert error_of(data, base_dir).startswith("listeners[1].port:")


def test_listener_without_tls_or_insecure_plaintext_is_refused(base_dir: Path) -> None:
    for listener in ({"host": "127.0.0.1", "port": 6432}, {"insecure_plaintext": False}):
        message = error_of(with_(minimal(), "listeners", [listener]), base_dir)
        assert message.startswith("listeners[0]:")
        assert "tls" in message and "insecure_plaintext" in message


def test_listener_with_tls_and_insecure_plaintext_is_accepted(base_dir: Path) -> None:
    data = with_(minimal(), "listeners[0].insecure_plaintext", True)
    (listener,) = parse_config(data, base_dir).listeners
    assert listener.tls is not None and listener.insecure_plaintext


def test_hs_and_rs_mix_refused_with_jwks(base_dir: Path) -> None:
    message = error_of(with_(minimal(), "identity.algorithms", ["RS256", "HS256"]), base_dir)
    assert message.startswith("identity.algorithms:")


def test_hs_and_rs_mix_refused_with_secret(base_dir: Path) -> None:
    data = with_(minimal(), "identity.jwks_file", ...)
    data["identity"].update(algorithms=["HS256", "RS256"], hs256_secret_env="JWT_SECRET")
    assert error_of(data, base_dir).startswith("identity.algorithms:")


def test_secret_with_only_asymmetric_algorithms_refused(base_dir: Path) -> None:
    data = with_(minimal(), "identity.jwks_file", ...)
    data["identity"].update(algorithms=["RS256"], hs256_secret_env="JWT_SECRET")
    assert error_of(data, base_dir).startswith("identity.algorithms:")


@pytest.mark.parametrize(
    "sources",
    [
        {},
        {"jwks_file": "jwks.json", "jwks_url": "https://issuer.example/jwks"},
        {"jwks_file": "jwks.json", "hs256_secret_env": "S"},
        {"jwks_url": "https://issuer.example/jwks", "hs256_secret_env": "S"},
        {"jwks_file": "jwks.json", "jwks_url": "https://issuer.example/jwks", "hs256_secret_env": "S"},
    ],
    ids=["none", "file+url", "file+secret", "url+secret", "all"],
)
def test_exactly_one_key_source(base_dir: Path, sources: dict[str, str]) -> None:
    data = with_(minimal(), "identity.jwks_file", ...)
    data["identity"].update(sources)
    message = error_of(data, base_dir)
    assert message.startswith("identity:")
    assert "exactly one key source" in message


@pytest.mark.parametrize("url", ["http://issuer.example/jwks.json", "ftp://issuer.example/jwks.json",
                                 "issuer.example/jwks.json"])
def test_jwks_url_must_be_https(base_dir: Path, url: str) -> None:
    data = with_(minimal(), "identity.jwks_file", ...)
    data["identity"]["jwks_url"] = url
    assert error_of(data, base_dir).startswith("identity.jwks_url:")


@pytest.mark.parametrize("url", ["http://localhost.attacker.example/jwks.json", "http://127.attacker.example/jwks",
                                 "http://localhost@attacker.example/jwks.json"])
def test_jwks_url_plain_http_only_for_real_loopback_hosts(base_dir: Path, url: str) -> None:
    # These URLs start with "http://localhost" / "http://127." but fetch from a non-loopback host.
    data = with_(minimal(), "identity.jwks_file", ...)
    data["identity"]["jwks_url"] = url
    assert error_of(data, base_dir).startswith("identity.jwks_url:")


@pytest.mark.parametrize("mode", ["verify-ca", "verify-full"])
def test_verify_modes_need_sslrootcert(base_dir: Path, mode: str) -> None:
    message = error_of(with_(minimal(), "upstream.sslmode", mode), base_dir)
    assert message.startswith("upstream.sslrootcert:")


@pytest.mark.parametrize("mode", ["disable", "require"])
def test_other_sslmodes_accepted(base_dir: Path, mode: str) -> None:
    assert parse_config(with_(minimal(), "upstream.sslmode", mode), base_dir).upstream.sslmode == mode


def test_top_level_must_be_a_mapping(base_dir: Path) -> None:
    assert error_of(["listeners"], base_dir).startswith("config:")
    assert error_of("text", base_dir).startswith("config:")


def test_empty_document(base_dir: Path) -> None:
    assert error_of(None, base_dir).startswith("listeners:")


def test_missing_file_reported_with_its_resolved_path(base_dir: Path) -> None:
    message = error_of(with_(minimal(), "identity.jwks_file", "keys/jwks.json"), base_dir)
    assert message == f"identity.jwks_file: file not found: {base_dir / 'keys/jwks.json'}"


# --------------------------------------------------------------------------------------------------
# load_config


def write_yaml(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_load_config_from_path(base_dir: Path, tmp_path_factory: pytest.TempPathFactory,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_yaml(base_dir / "pgproxy.yaml", minimal())
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    cfg = load_config(path)
    assert cfg.source == path
    assert cfg.identity.jwks_file == base_dir / "jwks.json"  # relative to the file, not the cwd


def test_load_config_accepts_str_path(base_dir: Path) -> None:
    path = write_yaml(base_dir / "pgproxy.yaml", minimal())
    assert load_config(str(path)).identity.issuer == "https://issuer.example"


def test_load_config_relative_path_resolves_against_the_file(base_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    sub = base_dir / "conf"
    sub.mkdir()
    data = with_(minimal(), "identity.jwks_file", "../jwks.json")
    data["listeners"][0]["tls"] = {"cert_file": "../tls/server.crt", "key_file": "../tls/server.key"}
    write_yaml(sub / "pgproxy.yaml", data)
    monkeypatch.chdir(base_dir)
    cfg = load_config("conf/pgproxy.yaml")
    assert cfg.identity.jwks_file is not None
    assert cfg.identity.jwks_file.resolve() == (base_dir / "jwks.json").resolve()


def test_load_config_from_env(base_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_yaml(base_dir / "from-env.yaml", minimal())
    monkeypatch.setenv(CONFIG_ENV_VAR, str(path))
    cfg = load_config(None)
    assert cfg.source == path


def test_load_config_without_path_or_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)
    with pytest.raises(ConfigError) as exc:
        load_config(None)
    assert CONFIG_ENV_VAR in str(exc.value)
    monkeypatch.setenv(CONFIG_ENV_VAR, "")
    with pytest.raises(ConfigError):
        load_config(None)


def test_load_config_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as exc:
        load_config(missing)
    assert str(missing) in str(exc.value)
    monkeypatch.setenv(CONFIG_ENV_VAR, str(missing))
    with pytest.raises(ConfigError):
        load_config(None)


def test_load_config_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_config(tmp_path)


@pytest.mark.parametrize("text", ["listeners: [\n", "a: b: c\n", "key: 'unterminated\n", "\t- tab indent\n"])
def test_load_config_invalid_yaml(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert "invalid YAML" in str(exc.value)
    assert str(path) in str(exc.value)


def test_load_config_schema_error(base_dir: Path) -> None:
    path = write_yaml(base_dir / "pgproxy.yaml", with_(minimal(), "upstream.sslmode", "allow"))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value).startswith(f"{path}: upstream.sslmode:")


def test_load_config_reports_every_mistake_with_file_and_field(base_dir: Path) -> None:
    data = with_(minimal(), "listeners[0].port", 70000)
    data["limits"] = {"max_conections": 10}
    data["upstream"]["sslmode"] = "verify-full"  # without sslrootcert: a rule across two fields
    path = write_yaml(base_dir / "pgproxy.yaml", data)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.lines == [
        f"{path}: listeners[0].port: must be between 0 and 65535, got 70000",
        f"{path}: upstream.sslrootcert: required with sslmode verify-full",
        f"{path}: limits.max_conections: unknown setting",
    ]
    assert str(exc.value) == "\n".join(exc.value.lines)


def test_yaml_python_tags_are_not_executed(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("listeners: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError):
        load_config(path)


# --------------------------------------------------------------------------------------------------
# Upstream credentials


def test_password_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPROXY_TEST_CRED_PW", "from env ")
    assert UpstreamCredential(role="r", password_env="PGPROXY_TEST_CRED_PW").password() == "from env "


def test_password_env_not_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGPROXY_TEST_CRED_PW", raising=False)
    with pytest.raises(ConfigError) as exc:
        UpstreamCredential(role="reader", password_env="PGPROXY_TEST_CRED_PW").password()
    assert "PGPROXY_TEST_CRED_PW" in str(exc.value)
    assert "reader" in str(exc.value)


def test_password_from_file(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_text("s3cret pass\n")
    assert UpstreamCredential(role="r", password_file=f).password() == "s3cret pass"
    f.write_text("crlf\r\n")
    assert UpstreamCredential(role="r", password_file=f).password() == "crlf"
    f.write_text("no-newline")
    assert UpstreamCredential(role="r", password_file=f).password() == "no-newline"


def test_password_file_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        UpstreamCredential(role="reader", password_file=tmp_path / "gone").password()
    assert "reader" in str(exc.value)


def test_password_env_takes_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_text("file\n")
    monkeypatch.setenv("PGPROXY_TEST_CRED_PW", "env")
    # The schema refuses both sources at once; an object built past it still prefers the variable.
    both = UpstreamCredential.model_construct(role="r", password_env="PGPROXY_TEST_CRED_PW", password_file=f)
    assert both.password() == "env"


def test_no_password_source() -> None:
    assert UpstreamCredential(role="r").password() is None


def test_password_from_parsed_config(base_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (base_dir / "upstream.pw").write_text("filepw\n")
    data = with_(minimal(), "upstream.credentials", [{"role": "admin", "password_file": "upstream.pw"},
                                                     {"role": "*", "password_env": "PGPROXY_TEST_CRED_PW"}])
    monkeypatch.setenv("PGPROXY_TEST_CRED_PW", "envpw")
    up = parse_config(data, base_dir).upstream
    admin, anyone = up.credentials
    assert admin.password() == "filepw"
    assert anyone.password() == "envpw"


def test_credential_for() -> None:
    exact = UpstreamCredential(role="reader", password_env="A")
    wildcard = UpstreamCredential(role="*", password_env="B")
    writer = UpstreamCredential(role="writer", password_env="C")
    # The exact role wins even when the wildcard is listed first.
    up = UpstreamConfig(credentials=(wildcard, exact, writer))
    assert up.credential_for("reader") is exact
    assert up.credential_for("writer") is writer
    assert up.credential_for("someone") is wildcard
    assert up.credential_for("*") is wildcard

    only_exact = UpstreamConfig(credentials=(exact,))
    assert only_exact.credential_for("reader") is exact
    assert only_exact.credential_for("writer") is None
    assert only_exact.credential_for("Reader") is None  # role names are case-sensitive here


# --------------------------------------------------------------------------------------------------
# Reload: configs compare by value


def test_reload_compares_parsed_configs(base_dir: Path) -> None:
    from pgproxy.reload import restart_only_changes

    source = base_dir / "pgproxy.yaml"
    old = parse_config(minimal(), base_dir, source=source)
    assert restart_only_changes(old, parse_config(minimal(), base_dir)) == []
    new = parse_config(with_(minimal(), "listeners[0].port", 7000), base_dir)
    assert restart_only_changes(old, new) == ["listeners[0].port"]
    new = parse_config(with_(minimal(), "audit.max_result_rows", 5), base_dir)
    assert restart_only_changes(old, new) == ["audit"]
    new = parse_config(with_(minimal(), "limits.max_connections", 5), base_dir)
    assert restart_only_changes(old, new) == []  # limits apply to new sessions
    # What the running server keeps after a reload: the new config with the bound listeners, same source.
    kept = new.model_copy(update={"listeners": old.listeners})
    assert kept.limits.max_connections == 5 and kept.listeners == old.listeners
    with pytest.raises(ValidationError):
        old.limits.max_connections = 1  # type: ignore[misc]  # frozen: nobody changes a running config in place


@pytest.mark.parametrize(("section", "value", "expected"), [
    ("admin", {"oidc": {"issuer": "https://idp.test", "client_id": "x", "algorithms": []}},
     "admin.oidc.algorithms: required: at least one algorithm"),
    ("admin", {"oidc": {"issuer": "https://idp.test", "client_id": "x", "scopes": []}},
     "admin.oidc.scopes: expected a list of scope names including openid"),
])
def test_empty_lists_are_refused_not_defaulted(base_dir: Path, section: str, value: Any, expected: str) -> None:
    data = minimal()
    data["approvals"] = {"path": "a.db"}
    data[section] = value
    assert error_of(data, base_dir) == expected
