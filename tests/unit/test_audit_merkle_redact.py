"""Merkle tree (RFC 9162 vectors, inclusion and consistency proofs), secret redaction, audit config."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgproxy.audit.events import TERMINAL_KINDS, AuditEmitter, EventKind, event_kind
from pgproxy.audit.logformat import canonical
from pgproxy.audit.merkle import (
    CompactTree,
    TreeView,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root_of,
    verify_consistency,
    verify_inclusion,
)
from pgproxy.audit.redact import _PRECHECK, may_hold_secret, may_hold_secret_encoded, redact_event, redact_text
from pgproxy.audit.sink import MemoryAuditSink
from pgproxy.config import ConfigError, parse_config

# The RFC 6962 / 9162 test vectors used by certificate-transparency implementations.
LEAVES = [b"", b"\x00", b"\x10", b"\x20\x21", b"\x30\x31", b"\x40\x41\x42\x43", bytes(range(0x50, 0x58)),
          bytes(range(0x60, 0x70))]
ROOTS = ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
         "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
         "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
         "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
         "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
         "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
         "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
         "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"]


def test_known_roots_and_compact_tree() -> None:
    hashes = [leaf_hash(x) for x in LEAVES]
    tree = CompactTree()
    assert tree.root() == hashlib.sha256(b"").digest()
    for n, expected in enumerate(ROOTS, 1):
        tree.append(hashes[n - 1])
        assert root_of(hashes[:n]).hex() == expected
        assert tree.root().hex() == expected


def test_known_inclusion_and_consistency_vectors() -> None:
    hashes = [leaf_hash(x) for x in LEAVES]
    # RFC 6962 inclusion proof for leaf 0 in the tree of 8 (from the CT test vectors).
    assert [h.hex()[:8] for h in inclusion_proof(0, hashes)] == ["96a296d2", "5f083f0a", "6b47aaf2"]
    # Consistency proof from 4 to 8 is the root of leaves 4..7 only (the old tree is a node).
    assert [h.hex()[:8] for h in consistency_proof(4, hashes)] == ["6b47aaf2"]


def test_proofs_verify_and_reject_for_every_size() -> None:
    hashes = [leaf_hash(i.to_bytes(2, "big")) for i in range(33)]
    view = TreeView(hashes)
    for n in range(1, len(hashes) + 1):
        root = root_of(hashes[:n])
        for i in range(n):
            proof = view.inclusion(i, n)
            assert proof == inclusion_proof(i, hashes[:n])
            assert verify_inclusion(hashes[i], i, n, proof, root)
            assert not verify_inclusion(leaf_hash(b"forged"), i, n, proof, root)
        for m in range(1, n + 1):
            proof = consistency_proof(m, hashes[:n])
            assert verify_consistency(m, n, root_of(hashes[:m]), root, proof)
            if m < n:
                assert not verify_consistency(m, n, leaf_hash(b"fork"), root, proof)


@pytest.mark.parametrize(("text", "kind", "leaked"), [
    ("ALTER ROLE bob PASSWORD 'hunter2'", "password", "hunter2"),
    ("create user x with encrypted password 'it''s secret' valid until 'infinity'", "password", "secret"),
    ("select '-----BEGIN RSA PRIVATE KEY-----\nMIIEabc\n-----END RSA PRIVATE KEY-----'", "private_key", "MIIE"),
    ("insert into t values ('eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl')", "jwt", "c2lnbmF0dXJl"),
    ("Authorization: Bearer abcdefghijklmnop0123456789", "bearer_token", "abcdefghijklmnop"),
    ("select 'AKIAIOSFODNN7EXAMPLE'", "aws_access_key", "IOSFODNN7"),
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "aws_secret_key", "wJalrXUtn"),
])
def test_secret_detectors(text: str, kind: str, leaked: str) -> None:
    out = redact_text(text)
    assert f"[redacted:{kind}]" in out and leaked not in out


def test_redaction_leaves_ordinary_sql_alone() -> None:
    sql = "select password_hash from users where id = $1"
    assert redact_text(sql) is sql
    event: dict[str, Any] = {"event": "statement", "sql": "alter role a password 'p'",
                             "params": ["AKIAIOSFODNN7EXAMPLE", None]}
    redact_event(event)
    assert event["sql"] == "alter role a password [redacted:password]"
    assert event["params"] == ["[redacted:aws_access_key]", None]


@given(st.text(alphabet=st.sampled_from("pasSwordPrivATe KEYjJbBcCiI_'1-"), max_size=40) | st.text(max_size=40))
def test_the_fast_secret_precheck_answers_as_the_regex(text: str) -> None:
    """ASCII text is pre-checked by substring tests of its lowercase form: the same answer as the regex."""
    assert may_hold_secret(text) == (_PRECHECK.search(text) is not None)


@pytest.mark.parametrize("text", ["ALTER ROLE a PASSWORD 'x'", "Bearer abc", "eYj", "aws_SECRET", "Private Key",
                                  "aws_\u017fecret_access_key", "pr\u0131vate key"])
def test_the_secret_precheck_matches_any_case(text: str) -> None:
    """Also non-ASCII letters that match an ASCII one case-insensitively (U+017F is s, U+0131 is i)."""
    assert may_hold_secret(text) and _PRECHECK.search(text) is not None


def _config(audit: dict[str, Any], tmp_path: Path) -> Any:
    return parse_config({
        "listeners": [{"host": "127.0.0.1", "port": 0, "insecure_plaintext": True}],
        "identity": {"issuer": "i", "audience": "a", "algorithms": ["HS256"], "hs256_secret_env": "X"},
        "upstream": {"credentials": [{"role": "*"}]}, "audit": audit}, tmp_path)


def test_audit_config(tmp_path: Path) -> None:
    (tmp_path / "k").write_text("x")
    cfg = _config({"dir": "log", "signing_key_file": "k", "fsync": "always", "witness_dir": "w"}, tmp_path).audit
    assert cfg.dir == tmp_path / "log" and cfg.fsync == "always" and cfg.max_result_rows == 20
    for audit, message in [
        ({"dir": "log", "jsonl_path": "a.jsonl", "signing_key_file": "k"},
         "audit: set exactly one of jsonl_path or dir"),
        ({"dir": "log"}, "audit.signing_key_file: required with dir"),
        ({"dir": "log", "signing_key_file": "k", "fsync": "sometimes"}, "audit.fsync: must be one of"),
        ({"dir": "log", "signing_key_file": "missing"}, "audit.signing_key_file: file not found"),
        ({"jsonl_path": "a.jsonl", "witness_dir": "w"}, "audit.witness_dir: only used with dir"),
        ({"dir": "log", "signing_key_file": "k", "max_result_rows": -1}, "audit.max_result_rows: must be"),
        ({"dir": "log", "signing_key_file": "k", "trusted_keys": ["gone.pub"]},
         r"audit.trusted_keys\[0\]: file not found"),
        ({"jsonl_path": "a.jsonl", "store_dsn_env": "X"}, "audit.store_dsn_env: only used with dir"),
        ({"dir": "log", "signing_key_file": "k", "store_schema": "a;b"}, "audit.store_schema: must be a plain"),
    ]:
        with pytest.raises(ConfigError, match=message):
            _config(audit, tmp_path)


@pytest.mark.parametrize("kind", list(EventKind))
def test_emitter_redacts_every_event_kind_in_nested_fields(kind: EventKind) -> None:
    sink = MemoryAuditSink()
    emitter = AuditEmitter(sink, clock=lambda: 42.0)
    secret = "ALTER ROLE x PASSWORD 'hunter2hunter2'"
    emitter.emit({"event": kind.value, "session": "s1", "sql": secret, "params": [secret],
                  "request": {"body": {"json": {"q": secret, "k": ["AKIAABCDEFGHIJKLMNOP"]}}}, "ts": 1.0})
    stored = sink.events[0]
    assert "hunter2" not in repr(stored) and "AKIAABCDEFGHIJKLMNOP" not in repr(stored)
    assert stored["request"]["body"]["json"]["k"] == ["[redacted:aws_access_key]"]
    assert stored["ts"] == 42.0  # the emitter owns timestamps
    assert stored["session_seq"] == 0
    assert ("session_records" in stored) == (kind in TERMINAL_KINDS)


def test_emitter_refuses_unknown_kinds_and_numbers_sessions_separately() -> None:
    sink = MemoryAuditSink()
    emitter = AuditEmitter(sink)
    with pytest.raises(ValueError):
        emitter.emit({"event": "something_else"})
    for sid in ("a", "b", "a", "a"):
        emitter.emit({"event": "statement", "session": sid, "sql": "select 1"})
    emitter.emit({"event": "session_end", "session": "a"})
    assert [(e["session"], e["session_seq"]) for e in sink.events] == [("a", 0), ("b", 0), ("a", 1), ("a", 2),
                                                                      ("a", 3)]
    assert sink.events[-1]["session_records"] == 4
    assert event_kind(sink.events[0]) is EventKind.STATEMENT and event_kind({"event": "x"}) is None


def test_emitter_forgets_the_stalest_open_session_beyond_its_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import pgproxy.audit.events as events

    monkeypatch.setattr(events, "MAX_OPEN_SESSIONS", 2)
    sink = MemoryAuditSink()
    emitter = AuditEmitter(sink)
    for sid in ("http-a", "http-b", "http-a", "http-c", "http-a", "http-b"):
        emitter.emit({"event": "http_exchange", "session": sid})
    # http-b was the stalest when http-c arrived: its numbering starts again
    assert [e["session_seq"] for e in sink.events] == [0, 0, 1, 0, 2, 0]


def test_emitter_reports_a_failing_sink_until_it_writes_again(tmp_path: Path) -> None:
    from pgproxy.audit.sink import AuditUnavailable, JsonLinesAuditSink

    sink = JsonLinesAuditSink(tmp_path / "audit.jsonl")
    emitter = AuditEmitter(sink)
    emitter.emit({"event": "statement", "session": "s", "sql": "select 1"})
    emitter.check()  # nothing failed: no exception
    assert emitter.problem is None
    sink._file.close()
    sink._file = open("/dev/full", "ab", buffering=0)  # noqa: SIM115  # a full disk: writes fail (ENOSPC)
    with pytest.raises(AuditUnavailable):
        emitter.flush()
    assert emitter.problem is not None
    with pytest.raises(AuditUnavailable):  # checked before a statement is forwarded
        emitter.check()
    sink._file.close()


def test_nested_fields_named_like_generated_ones_are_redacted_too() -> None:
    sink = MemoryAuditSink()
    AuditEmitter(sink).emit({"event": "http_exchange", "session": "http-1",
                             "request": {"body": {"json": {"session": "Bearer abcdefghijklmnopqrstuvwx",
                                                           "tags": ["AKIAABCDEFGHIJKLMNOP"]}}}})
    assert sink.events[0]["request"]["body"]["json"] == {"session": "Bearer [redacted:bearer_token]",
                                                         "tags": ["[redacted:aws_access_key]"]}


@pytest.mark.parametrize("secret", ["ALTER ROLE x PASSWORD 'hunter2hunter2'", "AKIAABCDEFGHIJKLMNOP",
                                    "Authorization: Bearer abcdefghijklmnopqrstuvwx",
                                    "alter role x pa\u017f\u017fword 'hunter2hunter2' -- \u00e9t\u00e9"])
def test_an_encoding_sink_stores_every_string_redacted(secret: str, tmp_path: Path) -> None:
    """The emitter checks the encoded event once for keywords; a secret anywhere (nested rows, non-ASCII
    letters that read as ASCII ones) still sends it through every detector before the bytes are stored."""
    import orjson

    from pgproxy.audit.sink import JsonLinesAuditSink

    sink = JsonLinesAuditSink(tmp_path / "audit.jsonl")
    emitter = AuditEmitter(sink)
    emitter.emit({"event": "statement", "session": "s", "sql": "select v from t where id = 1",
                  "result": {"columns": ["v"], "rows": [["ordinary"], [secret]]}})
    emitter.emit({"event": "statement", "session": "s", "sql": "select 1", "params": ["caf\u00e9", 1]})
    sink.close()
    first, second = (orjson.loads(line) for line in (tmp_path / "audit.jsonl").read_bytes().splitlines())
    assert first["result"]["rows"][0] == ["ordinary"]
    assert first["result"]["rows"][1] == [redact_text(secret)] and "[redacted:" in first["result"]["rows"][1][0]
    assert second["params"] == ["caf\u00e9", 1] and second["sql"] == "select 1"


@given(st.dictionaries(st.sampled_from(["sql", "params", "result", "error", "x"]),
                       st.text(max_size=60) | st.lists(st.text(alphabet=st.sampled_from(
                           "pasSwordPrivATe KEYjJbBcCiI_'1-\u017f\u0131\"\\\n"), max_size=60), max_size=3)))
def test_the_encoded_precheck_never_misses_what_redaction_changes(fields: dict[str, Any]) -> None:
    event = {"event": "statement", **fields}
    encoded = canonical(event)
    if canonical(redact_event(dict(event))) != encoded:
        assert may_hold_secret_encoded(encoded)


_SECRET_ALPHABET = "pasSwordPrivATe KEYjJbBcCiI_'1-\u017f\u0131\"\\\n"


@given(st.lists(st.text(alphabet=st.sampled_from(_SECRET_ALPHABET), max_size=40)
                | st.sampled_from(["AKIAABCDEFGHIJKLMNOP", "password 'x'", "Bearer abcdefghijklmnopq", "short"]),
                max_size=4))
def test_the_producers_texts_give_the_record_the_encoded_check_gives(texts: list[str]) -> None:
    """``emit(event, texts=...)`` keyword-checks only the listed strings: listing every string of the
    event stores the same bytes as checking its whole encoding."""
    stored: list[bytes] = []

    class Sink(MemoryAuditSink):
        def emit_encoded(self, event: dict[str, Any], encoded: bytes) -> None:
            stored.append(encoded)

    emitter = AuditEmitter(Sink(), clock=lambda: 1.0)
    for listed in (None, texts):
        event = {"event": "statement", "sql": texts[0] if texts else "", "params": texts[1:],
                 "result": {"sample_rows": [texts[::-1]]}}
        emitter.emit(event, texts=None if listed is None else [event["sql"], *texts[1:], *texts])
    assert stored[0] == stored[1]
