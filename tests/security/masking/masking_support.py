"""The masking suites' fixture data and their leak detector (importable by name from the test modules).

What for: one ``maskt`` schema whose secret values are *canaries* -- distinctive strings that must never
reach a masked identity, neither raw nor transformed (reversed, case-changed, hex of UTF-8, base64,
md5/sha256 hex, other date and number renderings, their binary wire encodings). ``Needles`` finds them in
anything a client received (wire message bodies, decoded driver values, error fields) or in audit events,
and says which canary leaked and where.

Must never: report a canary the client itself sent (callers pass their SQL as ``exclude``), or depend on
the proxy's own masking code (the expected shapes are written out here independently).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from rawwire import login, parse_fields, read_until_ready

SCHEMA = "maskt"
KEY_ENV = "PGPROXY_TEST_MASKING_KEY"
NOTIFY_CHANNEL = "maskt_changes"

# --------------------------------------------------------------------------------------------------
# The data: two rows full of canaries, one row of NULLs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Customer:
    id: int
    region: str
    tier: int
    email: str | None = None
    ssn: str | None = None
    card: str | None = None
    salary: Decimal | None = None
    birth_date: dt.date | None = None
    full_name: str | None = None
    profile: dict[str, str] | None = None
    city: str | None = None
    phone: str | None = None


CUSTOMERS = (
    Customer(1, "north", 2, "quixotic.zanzibar.ann@example.com", "NID-QZ7315942468", "4929 7311 5862 0044",
             Decimal("918273.46"), dt.date(1987, 6, 23), "Zebulon Quixwell",
             {"passport": "PZX99887766", "level": "gold"}, "Quagmireville", "+1-555-0199-7788"),
    Customer(2, "south", 1, "vermilion.yak.brody@sample.org", "NID-JW6048173519", "6011 4480 9127 3350",
             Decimal("764193.27"), dt.date(1974, 11, 9), "Octavia Brennagh",
             {"passport": "QLM44556677"}, "Thistlewick", "+1-555-0142-6630"),
    Customer(3, "north", 0),
)
# payments (partitioned by id): (id, customer_id, payer_name, card, amount)
PAYMENTS = ((10, 1, "Zebulon Quixwell", "5500 8811 2299 3344", Decimal("120.50")),
            (11, 2, "Octavia Brennagh", "5425 2334 3010 9903", Decimal("75.25")),
            (12, 1, "Zebulon Quixwell", "5500 8811 2299 3344", Decimal("9.99")))
PEOPLE_SSN = "NID-WV8402137755"  # maskt.people (parent)
STAFF_SSN = "NID-KT5521908866"  # maskt.staff (INHERITS people)
EVENT_ROWS = 3000  # maskt.events: unmasked, for the utility comparisons


def schema_sql() -> list[str]:
    """DDL + data for the ``maskt`` schema (run as the superuser; idempotent)."""
    def lit(value: Any) -> str:
        if value is None:
            return "NULL"
        if isinstance(value, dict):
            value = json.dumps(value)
        return "'" + str(value).replace("'", "''") + "'"

    rows = ", ".join(
        "(" + ", ".join(lit(v) for v in (c.id, c.region, c.tier, c.email, c.ssn, c.card, c.salary, c.birth_date,
                                          c.full_name, c.profile, c.city, c.phone)) + ")"
        for c in CUSTOMERS)
    payments = ", ".join("(" + ", ".join(lit(v) for v in p) + ")" for p in PAYMENTS)
    s = SCHEMA
    return [
        f"DROP SCHEMA IF EXISTS {s} CASCADE",
        f"CREATE SCHEMA {s}",
        f"""CREATE TABLE {s}.customers (
              id int PRIMARY KEY, region text NOT NULL DEFAULT 'none',
              tier int NOT NULL DEFAULT 0 CONSTRAINT customers_tier_check CHECK (tier >= 0),
              email text, ssn text, card text,
              salary numeric(12,2) CONSTRAINT customers_salary_cap CHECK (salary < 5000000),
              birth_date date, full_name text, profile jsonb, city text, phone text)""",
        f"CREATE UNIQUE INDEX customers_email_key ON {s}.customers (email)",
        f"CREATE UNIQUE INDEX customers_card_key ON {s}.customers (card)",
        f"INSERT INTO {s}.customers VALUES {rows}",
        f"""CREATE TABLE {s}.payments (id int, customer_id int, payer_name text, card text, amount numeric(10,2))
              PARTITION BY RANGE (id)""",
        f"CREATE TABLE {s}.payments_p1 PARTITION OF {s}.payments FOR VALUES FROM (0) TO (1000)",
        f"INSERT INTO {s}.payments VALUES {payments}",
        f"CREATE TABLE {s}.people (id int, ssn text)",
        f"CREATE TABLE {s}.staff (badge text) INHERITS ({s}.people)",
        f"INSERT INTO {s}.people VALUES (1, {lit(PEOPLE_SSN)})",
        f"INSERT INTO {s}.staff VALUES (2, {lit(STAFF_SSN)}, 'B-7')",
        f"""CREATE TABLE {s}.events AS SELECT g AS id, 1 + g % 3 AS customer_id,
              (ARRAY['view', 'buy', 'return'])[1 + g % 3] AS kind, (g * 37) % 1000 AS amount
              FROM generate_series(1, {EVENT_ROWS}) g""",
        f"CREATE VIEW {s}.v_plain AS SELECT * FROM {s}.customers",
        f"""CREATE VIEW {s}.v_derived AS SELECT id, upper(email) AS e, ssn || '#' AS s, salary * 2 AS s2,
              birth_date AS b FROM {s}.customers""",
        f"CREATE VIEW {s}.v_view2 AS SELECT * FROM {s}.v_derived",
        f"CREATE MATERIALIZED VIEW {s}.mv AS SELECT id, email, salary, full_name FROM {s}.customers",
        f"""CREATE FUNCTION {s}.get_email(int) RETURNS text LANGUAGE sql STABLE
              AS 'SELECT email FROM {s}.customers WHERE id = $1'""",
        f"""CREATE FUNCTION {s}.plp_email(int) RETURNS text LANGUAGE plpgsql AS $f$
              DECLARE e text;
              BEGIN SELECT email INTO e FROM {s}.customers WHERE id = $1; RAISE NOTICE 'email is %', e; RETURN e; END
              $f$""",
        f"""CREATE FUNCTION {s}.raw_email(anyelement) RETURNS text LANGUAGE sql STABLE
              AS 'SELECT email FROM {s}.customers WHERE id = 1'""",  # callable as x.raw_email
        # An operator an administrator created over a function that runs SQL text (refused by name).
        f"CREATE OPERATOR {s}.@@@ (leftarg = tsquery, rightarg = text, function = pg_catalog.ts_rewrite)",
        f"""CREATE FUNCTION {s}.notify_change() RETURNS trigger LANGUAGE plpgsql AS $f$
              BEGIN PERFORM pg_notify('{NOTIFY_CHANNEL}', NEW.email); RETURN NEW; END $f$""",
        f"""CREATE TRIGGER customers_notify AFTER UPDATE ON {s}.customers
              FOR EACH ROW EXECUTE FUNCTION {s}.notify_change()""",
        f"GRANT USAGE ON SCHEMA {s} TO agent_reader, agent_writer",
        f"GRANT SELECT ON ALL TABLES IN SCHEMA {s} TO agent_reader",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {s} TO agent_writer",
        f"ANALYZE {s}.customers",
        f"ANALYZE {s}.payments",
        "CHECKPOINT",  # the heap files on disk hold the raw rows (pg_read_binary_file probe)
    ]


MASKED_GROUP, EXEMPT_GROUP = "agents", "dba"
_WHO = {"applies_to": {"groups": [MASKED_GROUP]}, "exempt": {"groups": [EXEMPT_GROUP]}}

RULES: dict[str, Any] = {
    "tables": {
        f"{SCHEMA}.customers": {
            **_WHO,
            "columns": {
                "email": {"mask": "email"},
                "ssn": {"mask": "partial", "keep_last": 4},
                "card": {"mask": "partial", "keep_first": 0, "keep_last": 4},
                "salary": {"mask": "numeric", "mode": "bucket", "step": 10000},
                "birth_date": {"mask": "date"},
                "full_name": {"mask": "keyed_hash"},
                "profile": {"mask": "fixed", "value": '{"masked": true}'},
                "city": {"mask": "sql", "expression": "left({column}, 1) || '...'"},
                "phone": {"mask": "null"},
            },
        },
        f"{SCHEMA}.payments": {**_WHO, "columns": {"payer_name": "keyed_hash",
                                                   "card": {"mask": "partial", "keep_last": 4}}},
        f"{SCHEMA}.people": {"exempt": {"groups": [EXEMPT_GROUP]}, "columns": {"ssn": {"mask": "partial"}}},
    }
}

# --------------------------------------------------------------------------------------------------
# Canaries and their transformed forms
# --------------------------------------------------------------------------------------------------


def numeric_binary(value: Decimal) -> bytes:
    """PostgreSQL's binary ``numeric`` encoding (base-10000 digits), to spot a raw number in binary output."""
    int_part, _, frac = format(abs(value), "f").partition(".")
    int_part = int_part.lstrip("0")
    int_groups = [int(int_part[max(0, i - 4):i]) for i in range(len(int_part), 0, -4)][::-1]
    padded = frac + "0" * (-len(frac) % 4)
    frac_groups = [int(padded[i:i + 4]) for i in range(0, len(padded), 4)]
    digits = int_groups + frac_groups
    weight = len(int_groups) - 1
    while digits and digits[0] == 0:
        digits.pop(0)
        weight -= 1
    while digits and digits[-1] == 0:
        digits.pop()
    sign = 0x4000 if value < 0 else 0
    return struct.pack(f"!hhHH{len(digits)}H", len(digits), weight, sign, len(frac), *digits)


@dataclass(frozen=True)
class Needle:
    label: str  # which canary, which transformation
    text: str = ""
    fold: bool = True  # compare case-insensitively
    binary: bytes = b""  # for raw byte scans only (binary wire formats)


@dataclass(frozen=True)
class Leak:
    label: str
    where: str
    snippet: str

    def __str__(self) -> str:
        return f"{self.label} in {self.where}: ...{self.snippet}..."


def _b64_cores(secret: bytes) -> list[str]:
    """Base64 substrings ``secret`` produces at any byte alignment inside a longer value (>= 8 chars)."""
    cores = []
    for offset in range(3):
        data = b"\0" * offset + secret
        full = base64.b64encode(data[:3 * (len(data) // 3)]).decode()
        core = full[4:] if offset else full
        if len(core) >= 8:
            cores.append(core)
    return cores


def _text_needles(label: str, raw: str, hidden: Sequence[str]) -> list[Needle]:
    out = [Needle(f"{label} md5", hashlib.md5(raw.encode()).hexdigest()),
           Needle(f"{label} sha256", hashlib.sha256(raw.encode()).hexdigest())]
    for part in hidden:
        out += [Needle(f"{label} raw {part!r}", part), Needle(f"{label} reversed", part[::-1]),
                Needle(f"{label} hex", part.encode().hex()),
                Needle(f"{label} md5 of part", hashlib.md5(part.encode()).hexdigest())]
        out += [Needle(f"{label} base64", core, fold=False) for core in _b64_cores(part.encode())]
        if len(part) >= 12:  # substr/left/right of a long secret
            out += [Needle(f"{label} fragment", part[:10]), Needle(f"{label} fragment", part[-10:])]
        words = re.findall(r"[A-Za-z0-9]+", part)
        if len(words) > 1:  # separators stripped (replace/regexp_replace), single words (error tokens)
            out += [Needle(f"{label} without separators", "".join(words))]
            out += [Needle(f"{label} word", w) for w in words if len(w) >= 6]
    return out


def _date_needles(label: str, d: dt.date) -> list[Needle]:
    epoch = int(dt.datetime(d.year, d.month, d.day, tzinfo=dt.UTC).timestamp())
    days = (d - dt.date(2000, 1, 1)).days
    forms = [d.isoformat(), d.strftime("%m/%d/%Y"), d.strftime("%d.%m.%Y"), d.strftime("%d/%m/%Y"),
             d.strftime("%Y%m%d"), str(epoch), str(d.toordinal() + 1721425)]
    return [*(Needle(f"{label} as {f!r}", f) for f in forms),
            Needle(f"{label} binary date", binary=struct.pack("!i", days))]


def _number_needles(label: str, n: Decimal) -> list[Needle]:
    whole = int(n)
    forms = {str(n), str(whole), f"{whole:,}", str(whole)[::-1]}
    return [*(Needle(f"{label} as {f!r}", f) for f in sorted(forms)),
            Needle(f"{label} binary numeric", binary=numeric_binary(n))]


def _build_needles() -> list[Needle]:
    out: list[Needle] = []
    for c in CUSTOMERS:
        tag = f"customers[id={c.id}]"
        if c.email:
            out += _text_needles(f"{tag}.email", c.email, [c.email.split("@")[0]])
        if c.ssn:
            out += _text_needles(f"{tag}.ssn", c.ssn, [c.ssn[:-4]])
        if c.card:
            out += _text_needles(f"{tag}.card", c.card, [c.card[:-5], c.card[:-5].replace(" ", "")])
        if c.salary is not None:
            out += _number_needles(f"{tag}.salary", c.salary)
            out += _number_needles(f"{tag}.salary*2", c.salary * 2)
        if c.birth_date:
            out += _date_needles(f"{tag}.birth_date", c.birth_date)
        if c.full_name:
            out += _text_needles(f"{tag}.full_name", c.full_name, [c.full_name, *c.full_name.split()])
        if c.profile:
            out += _text_needles(f"{tag}.profile", json.dumps(c.profile), [c.profile["passport"]])
        if c.city:
            out += _text_needles(f"{tag}.city", c.city, [c.city[1:]])
        if c.phone:
            out += _text_needles(f"{tag}.phone", c.phone, [c.phone[3:]])
    salaries = [c.salary for c in CUSTOMERS if c.salary is not None]
    out += _number_needles("sum(customers.salary)", sum(salaries, Decimal(0)))
    for pid, _cid, _payer, card, _amount in PAYMENTS:
        out += _text_needles(f"payments[id={pid}].card", card, [card[:-5]])
    out += _text_needles("people.ssn", PEOPLE_SSN, [PEOPLE_SSN[:-4]])
    out += _text_needles("staff.ssn", STAFF_SSN, [STAFF_SSN[:-4]])
    unique: dict[tuple[str, bytes], Needle] = {}
    for n in out:
        unique.setdefault((n.text.lower() if n.fold else n.text, n.binary), n)
    return list(unique.values())


NEEDLES = _build_needles()


def needles_excluding(exclude: str) -> list[Needle]:
    """The needles that do not occur in ``exclude`` (what the client sent itself)."""
    low = exclude.lower()
    return [n for n in NEEDLES
            if not (n.text and ((n.text.lower() in low) if n.fold else (n.text in exclude)))]


def find_leaks(haystack: str | bytes, where: str, exclude: str = "") -> list[Leak]:
    """Every needle (not in ``exclude``) found in ``haystack``; bytes are also scanned for binary encodings."""
    raw = haystack if isinstance(haystack, bytes) else haystack.encode()
    text = raw.decode("utf-8", "replace")
    low = text.lower()
    leaks = []
    for n in needles_excluding(exclude):
        pos = raw.find(n.binary) if n.binary else low.find(n.text.lower()) if n.fold else text.find(n.text)
        if pos >= 0:
            snippet = text[max(0, pos - 30):pos + len(n.text or "x") + 30] if not n.binary else raw[
                max(0, pos - 8):pos + len(n.binary) + 8].hex()
            leaks.append(Leak(n.label, where, snippet.replace("\x00", "|")))
    return leaks


def flatten(value: Any) -> list[str | bytes]:
    """Everything a decoded driver value says, as strings (dates ISO, Decimals plain) and bytes."""
    if value is None:
        return []
    if isinstance(value, (bytes, bytearray, memoryview)):
        return [bytes(value)]
    if isinstance(value, (dt.date, dt.datetime, dt.time)):
        return [value.isoformat(), str(value)]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*flatten(k), *flatten(v))]
    if isinstance(value, (list, tuple)) or (hasattr(value, "items") and hasattr(value, "keys")):
        items = value.items() if hasattr(value, "items") else enumerate(value)
        return [s for k, v in items for s in (*(flatten(k) if isinstance(k, str) else []), *flatten(v))]
    return [str(value)]


def leaks_in_values(values: Iterable[Any], where: str, exclude: str = "") -> list[Leak]:
    found: list[Leak] = []
    for item in flatten(list(values)):
        found += find_leaks(item, where, exclude)
    return found


# --------------------------------------------------------------------------------------------------
# A raw wire session: everything the client receives, message by message
# --------------------------------------------------------------------------------------------------

MESSAGE_NAMES = {"T": "RowDescription", "D": "DataRow", "C": "CommandComplete", "E": "ErrorResponse",
                 "N": "NoticeResponse", "A": "NotificationResponse", "d": "CopyData", "H": "CopyOutResponse",
                 "V": "FunctionCallResponse", "S": "ParameterStatus", "I": "EmptyQueryResponse",
                 "Z": "ReadyForQuery", "t": "ParameterDescription", "1": "ParseComplete", "2": "BindComplete"}


@dataclass
class Exchange:
    """What one client session received, per request sent."""

    replies: list[list[tuple[str, bytes]]] = field(default_factory=list)

    def messages(self) -> list[tuple[str, bytes]]:
        return [m for reply in self.replies for m in reply]

    def errors(self) -> list[dict[str, str]]:
        return [parse_fields(body) for t, body in self.messages() if t == "E"]

    def refusals(self) -> list[dict[str, str]]:
        return [e for e in self.errors() if e.get("C") == "42501"]

    def masking_refusals(self) -> list[dict[str, str]]:
        return [e for e in self.refusals() if e.get("M", "").startswith("pgproxy masking:")]

    def last_rows(self) -> list[list[bytes | None]]:
        """The DataRows of the last request that returned any."""
        for reply in reversed(self.replies):
            rows = [_data_row(body) for t, body in reply if t == "D"]
            if rows:
                return rows
        return []

    def leaks(self, exclude: str) -> list[Leak]:
        found: list[Leak] = []
        for i, reply in enumerate(self.replies):
            for t, body in reply:
                found += find_leaks(body, f"request {i + 1} {MESSAGE_NAMES.get(t, t)}", exclude)
        return found

    def tags(self) -> list[str]:
        return [body.rstrip(b"\0").decode() for t, body in self.messages() if t == "C"]

    def describe(self) -> str:
        errs = "; ".join(f"{e.get('C')} {e.get('M')}" for e in self.errors())
        return f"errors: [{errs}] tags: {self.tags()} last rows: {self.last_rows()[:3]}"


def _data_row(body: bytes) -> list[bytes | None]:
    count = struct.unpack_from("!h", body)[0]
    pos, row = 2, []
    for _ in range(count):
        n = struct.unpack_from("!i", body, pos)[0]
        pos += 4
        row.append(None if n < 0 else body[pos:pos + n])
        pos += max(n, 0)
    return row


def run_wire(port: int, database: str, token: str, requests: Sequence[str | bytes], *, user: str = "agent_writer",
             **startup: str) -> Exchange:
    """Log in on the plaintext listener and send each request (SQL text as a Query, or raw message bytes)."""
    sock: socket.socket = login(port, user, database, token, **startup)
    exchange = Exchange()
    try:
        for request in requests:
            data = request if isinstance(request, bytes) else _query(request)
            sock.sendall(data)
            exchange.replies.append(read_until_ready(sock))
    finally:
        sock.close()
    return exchange


def _query(sql: str) -> bytes:
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!i", len(body) + 4) + body


def function_call(oid: int, *args: str) -> bytes:
    """A fast-path FunctionCall message with text arguments and a text result."""
    body = struct.pack("!ihhh", oid, 1, 0, len(args))
    for arg in args:
        body += struct.pack("!i", len(arg.encode())) + arg.encode()
    body += struct.pack("!h", 0)
    return b"F" + struct.pack("!i", len(body) + 4) + body
