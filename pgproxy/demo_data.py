"""The demo's sample schema: ``shop.customers`` (with PII columns) and ``shop.orders``, plus roles.

What for: give the demo, the tests and the benchmarks a small, deterministic data set whose columns
exercise masking (email, SSN, Luhn-valid card numbers, salary) and roles with distinct privileges
(``agent_reader`` read-only, ``agent_writer`` DML, ``dba`` owner of the schema).

Must never: be run against a database holding real data — ``seed_sample_schema`` DROPs schema ``shop``
(CASCADE) and recreates it; contain anything resembling real personal data (every value is generated
by arithmetic on ``generate_series``, all emails are ``@example.com``).
"""

from __future__ import annotations

__all__ = [
    "CUSTOMER_COUNT",
    "ORDER_COUNT",
    "SAMPLE_GRANTS_SQL",
    "SAMPLE_ROLES",
    "SAMPLE_SCHEMA_SQL",
    "seed_sample_schema",
]

CUSTOMER_COUNT = 200
ORDER_COUNT = 1000

#: Login roles created by :func:`seed_sample_schema` (all with the same password).
SAMPLE_ROLES: tuple[str, ...] = ("agent_reader", "agent_writer", "dba")

#: Schema + deterministic data. Self-contained: needs no roles; drops and recreates schema ``shop``.
SAMPLE_SCHEMA_SQL = f"""
DROP SCHEMA IF EXISTS shop CASCADE;
CREATE SCHEMA shop;

CREATE TABLE shop.customers (
    id          serial PRIMARY KEY,
    full_name   text NOT NULL,
    email       text NOT NULL,
    ssn         text NOT NULL,
    card_number text NOT NULL,
    salary      numeric(10,2) NOT NULL,
    city        text NOT NULL,
    created_at  timestamptz NOT NULL
);

CREATE TABLE shop.orders (
    id          serial PRIMARY KEY,
    customer_id int NOT NULL REFERENCES shop.customers(id),
    amount      numeric(10,2) NOT NULL,
    status      text NOT NULL,
    ordered_at  timestamptz NOT NULL
);

INSERT INTO shop.customers (full_name, email, ssn, card_number, salary, city, created_at)
SELECT
    n.first || ' ' || n.last,
    lower(n.first) || '.' || lower(n.last) || g || '@example.com',
    lpad((100 + (g * 7919) % 800)::text, 3, '0') || '-'
        || lpad((10 + (g * 31) % 89)::text, 2, '0') || '-'
        || lpad((1000 + (g * 104729) % 9000)::text, 4, '0'),
    c.prefix || ((10 - (
        SELECT sum(CASE WHEN i % 2 = 1
                        THEN (substr(c.prefix, i, 1)::int * 2) / 10 + (substr(c.prefix, i, 1)::int * 2) % 10
                        ELSE substr(c.prefix, i, 1)::int END)
        FROM generate_series(1, 15) AS i) % 10) % 10)::text,
    round(30000 + ((g * 7919) % 120000) + (g % 100) / 100.0, 2),
    (ARRAY['Lisbon', 'Porto', 'Madrid', 'Berlin', 'Paris', 'Rome', 'Vienna', 'Prague',
           'Dublin', 'Oslo'])[1 + (g * 7) % 10],
    timestamptz '2024-01-01 09:00:00+00' + g * interval '1 day 3 hours'
FROM generate_series(1, {CUSTOMER_COUNT}) AS g
CROSS JOIN LATERAL (
    SELECT
        (ARRAY['Ana', 'Bruno', 'Carla', 'Diego', 'Elena', 'Fabio', 'Greta', 'Hugo', 'Ines', 'Joao',
               'Karin', 'Luis', 'Marta', 'Nuno', 'Olga', 'Pedro', 'Rita', 'Sofia', 'Tiago', 'Vera'])
            [1 + g % 20] AS first,
        (ARRAY['Silva', 'Santos', 'Costa', 'Garcia', 'Muller', 'Rossi', 'Dubois', 'Novak', 'Smith',
               'Jensen', 'Ferreira', 'Lopez', 'Schmidt', 'Bianchi', 'Martin', 'Kowalski', 'Brown',
               'Olsen', 'Pereira', 'Weber'])[1 + (g * 7 + g / 20) % 20] AS last
) AS n
CROSS JOIN LATERAL (
    SELECT '4' || lpad(((g::bigint * 73939133000013 + 271828182845) % 100000000000000)::text, 14, '0')
        AS prefix
) AS c
ORDER BY g;

INSERT INTO shop.orders (customer_id, amount, status, ordered_at)
SELECT
    1 + (o * 37) % {CUSTOMER_COUNT},
    round(5 + ((o * 7919) % 50000) / 100.0, 2),
    (ARRAY['pending', 'paid', 'shipped', 'delivered', 'refunded'])[1 + o % 5],
    timestamptz '2024-03-01 00:00:00+00' + o * interval '7 hours 13 minutes'
FROM generate_series(1, {ORDER_COUNT}) AS o
ORDER BY o;

ANALYZE shop.customers;
ANALYZE shop.orders;
"""

#: Privileges; run after the roles exist and SAMPLE_SCHEMA_SQL ran.
SAMPLE_GRANTS_SQL = """
ALTER SCHEMA shop OWNER TO dba;
ALTER TABLE shop.customers OWNER TO dba;
ALTER TABLE shop.orders OWNER TO dba;

GRANT USAGE ON SCHEMA shop TO agent_reader, agent_writer;
GRANT SELECT ON ALL TABLES IN SCHEMA shop TO agent_reader;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA shop TO agent_writer;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA shop TO agent_writer;
"""


def seed_sample_schema(dsn: str, role_password: str) -> None:
    """(Re)create schema ``shop`` with its data and the roles in :data:`SAMPLE_ROLES`.

    ``dsn`` must be a superuser (or CREATEROLE + database owner) connection. Roles that already exist
    get their password reset and LOGIN/NOSUPERUSER applied. Runs in one transaction.
    """
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, connect_timeout=10) as conn:
        with conn.cursor() as cur:
            for role in SAMPLE_ROLES:
                cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
                verb = "ALTER ROLE" if cur.fetchone() is not None else "CREATE ROLE"
                cur.execute(
                    sql.SQL("{} {} WITH LOGIN NOSUPERUSER PASSWORD {}").format(
                        sql.SQL(verb), sql.Identifier(role), sql.Literal(role_password)
                    )
                )
            cur.execute(SAMPLE_SCHEMA_SQL.encode())
            cur.execute(SAMPLE_GRANTS_SQL.encode())
        conn.commit()
