"""Functions past the rewrite, through the real proxy as the masked identity (see also FUNCTIONS in
test_masking_bypass.py): statement text never shows the keyed-hash pads, and the common safe functions
still work on masked values."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac

import psycopg
import pytest
from harness import ProxyUnderTest
from masking_support import CUSTOMERS, PAYMENTS, run_wire

from pgproxy.masking.masks import MaskKey

pytestmark = pytest.mark.timeout(120)

# Each probe reads a masked keyed-hash column (so the rewritten text holds the pads), then shows statement text.
PAD_PROBES = {
    "backend_activity": ["SELECT pg_stat_get_backend_activity(b), p.payer_name FROM pg_stat_get_backend_idset() b, "
                         "maskt.payments p"],
    "stat_get_activity": ["SELECT a.query, p.payer_name FROM pg_stat_get_activity(NULL) a, maskt.payments p"],
    "memory_contexts": ["PREPARE pads AS SELECT payer_name FROM maskt.payments",
                        "SELECT ident FROM pg_backend_memory_contexts WHERE ident LIKE '%payments%'"],
    "memory_contexts_function": ["PREPARE pads AS SELECT payer_name FROM maskt.payments",
                                 "SELECT ident FROM pg_get_backend_memory_contexts()"],
    "prepared_statement_function": ["PREPARE pads AS SELECT payer_name FROM maskt.payments",
                                    "SELECT statement FROM pg_prepared_statement()"],
    "cursor_function": ["BEGIN", "DECLARE pads CURSOR FOR SELECT payer_name FROM maskt.payments",
                        "SELECT statement FROM pg_cursor()", "ROLLBACK"],
}


@pytest.mark.parametrize("name", sorted(PAD_PROBES))
def test_statement_text_with_the_pads_is_refused(name: str, masked: ProxyUnderTest, masked_token: str,
                                                  masking_key: bytes) -> None:
    inner, outer = (p.split("'")[1][2:] for p in MaskKey(masking_key).pads_sql())  # hex digits of each pad
    got = run_wire(masked.plain_port, masked.database.database, masked_token, PAD_PROBES[name])
    received = b"".join(body for _, body in got.messages()).lower()
    assert inner[:32].encode() not in received and outer[:32].encode() not in received, \
        f"{name}: the keyed-hash pads reached the client"
    refusals = got.masking_refusals()
    assert refusals, f"{name} not refused: {got.describe()}"
    assert any("()" in r["M"] or "pg_backend_memory_contexts" in r["M"] for r in refusals), refusals


def test_common_functions_work_on_masked_values(masked: ProxyUnderTest, masked_token: str,
                                                masking_key: bytes) -> None:
    r1 = CUSTOMERS[0]
    assert r1.full_name is not None and r1.birth_date is not None
    pseudonym = hmac.new(masking_key, r1.full_name.encode(), hashlib.sha256).hexdigest()[:16]
    with psycopg.connect(masked.dsn(user="agent_writer", token=masked_token, tls=False), autocommit=True) as conn:
        row = conn.execute("""
            SELECT lower(email), upper(right(ssn, 4)), coalesce(phone, 'none'), date_trunc('year', birth_date)::date,
                   profile->>'masked', jsonb_typeof(profile), jsonb_build_object('e', email)->>'e', length(full_name),
                   full_name, split_part(email, '@', 2), to_char(salary, 'FM9999990'), now() <= clock_timestamp(),
                   extract(year FROM birth_date)::int, pg_catalog.concat_ws('/', city, region)
            FROM maskt.customers WHERE id = 1""").fetchone()
        assert row == ("****@example.com", "2468", "none", dt.date(r1.birth_date.year, 1, 1), "true", "object",
                       "****@example.com", 16, pseudonym, "example.com", "910000", True, r1.birth_date.year,
                       "Q.../north")
        counts = conn.execute("SELECT count(*), count(DISTINCT email), string_agg(DISTINCT left(card, 4), ',') "
                              "FROM maskt.customers WHERE card IS NOT NULL").fetchone()
        assert counts == (2, 2, "****")
        payers = conn.execute("SELECT count(DISTINCT payer_name), sum(amount) FROM maskt.payments").fetchone()
        assert payers == (2, sum(p[4] for p in PAYMENTS))
