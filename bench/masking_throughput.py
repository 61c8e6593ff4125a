#!/usr/bin/env python3
"""Column masking throughput: full-table SELECTs through the proxy as a masked identity vs direct (a benchmark).

What it does: starts a throwaway cluster with a 1,000,000-row table (``--rows``) and ``pgproxy serve``
(the helpers of bench/pgbench_compare.py, with a ``masking:`` section added to its config), then fetches
every row of ``SELECT id, email, region, amount`` (one masked column: email) and ``SELECT id, email, ssn,
region, amount`` (two: email + ssn) over three paths -- direct, proxy as an exempt identity, proxy as a
masked identity -- with two clients: asyncpg (binary, extended protocol) and psycopg (text, simple
protocol, ``fetchall``). Paths run interleaved, the order rotated every round; the report shows the median
rows/s per (query, client, path) and masked/direct ratios (target >= 0.5) in Markdown.

Run: ``.venv/bin/python bench/masking_throughput.py [--rows 1000000] [--rounds 3]
[--out bench/results/masking.md]``. Everything it starts is stopped and removed on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import yaml
from pgbench_compare import (
    AUDIENCE,
    BENCH_DB,
    BENCH_ROLE,
    ISSUER,
    Endpoint,
    ProxyProcess,
    fmt,
    log,
    machine_facts,
    pg_env,
    start_bench_database,
    wait_until_quiet,
)

from pgproxy.identity import mint_token
from pgproxy.identity.minting import PRIVATE_KEY_FILENAME

REPO = Path(__file__).resolve().parent.parent
KEY_ENV = "PGPROXY_BENCH_MASKING_KEY"
QUERIES = {
    "1 masked column": "SELECT id, email, region, amount FROM items",
    "2 masked columns": "SELECT id, email, ssn, region, amount FROM items",
}
PATHS = ("direct", "proxy exempt", "proxy masked")
CLIENTS = ("asyncpg (binary)", "psycopg (text)")
RULES = {"tables": {"public.items": {"applies_to": {"groups": ["agents"]}, "exempt": {"groups": ["dba"]},
                                      "columns": {"email": {"mask": "email"},
                                                  "ssn": {"mask": "partial", "keep_last": 4}}}}}


def fetch_asyncpg(path: Endpoint, query: str) -> int:
    async def run() -> int:
        conn = await asyncpg.connect(host="127.0.0.1", port=path.port, user=BENCH_ROLE, password=path.env["PGPASSWORD"],
                                     database=BENCH_DB, ssl=False)
        try:
            return len(await conn.fetch(query))
        finally:
            await conn.close()
    return asyncio.run(run())


def fetch_psycopg(path: Endpoint, query: str) -> int:
    with psycopg.connect(host="127.0.0.1", port=path.port, user=BENCH_ROLE, password=path.env["PGPASSWORD"],
                         dbname=BENCH_DB, sslmode="disable") as conn:
        return len(conn.execute(query).fetchall())


FETCHERS: dict[str, Callable[[Endpoint, str], int]] = {CLIENTS[0]: fetch_asyncpg, CLIENTS[1]: fetch_psycopg}


def start_masked_stack(stack: contextlib.ExitStack, load: Callable[[psycopg.Connection[Any]], None],
                       rules: dict[str, Any], prefix: str) -> list[Endpoint]:
    """A cluster loaded by ``load`` (as the bench role) and ``pgproxy serve`` with ``rules`` (group ``agents``
    masked, ``dba`` exempt): the endpoints direct, proxy exempt and proxy masked."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    stack.callback(shutil.rmtree, workdir, True)
    _, db, password, _ = start_bench_database(stack)
    with psycopg.connect(db.dsn(user=BENCH_ROLE, password=password, database=BENCH_DB), autocommit=True) as conn:
        load(conn)
    proxy_dir = workdir / "proxy"
    proxy_dir.mkdir()
    proxy = ProxyProcess(proxy_dir, db, password, None, 6 * 3600)
    stack.callback(proxy.stop)
    rules_dir = proxy_dir / "masking_rules"
    rules_dir.mkdir()
    (rules_dir / "rules.yaml").write_text(yaml.safe_dump(rules))
    config = yaml.safe_load(proxy.config_file.read_text())
    config["masking"] = {"rules_dir": str(rules_dir), "key_env": KEY_ENV, "schema_role": BENCH_ROLE,
                         "schema_database": BENCH_DB}
    proxy.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    os.environ[KEY_ENV] = secrets.token_hex(32)
    log("starting pgproxy ...")
    proxy.start()
    key_file = proxy_dir / "keys" / PRIVATE_KEY_FILENAME

    def token(group: str) -> str:
        return mint_token(key_file, issuer=ISSUER, audience=AUDIENCE, subject=f"bench-{group}", groups=[group],
                          db_role=[BENCH_ROLE], ttl_seconds=6 * 3600)

    return [Endpoint("direct", db.port, pg_env(db.port, password, "disable")),
            Endpoint("proxy exempt", proxy.port, pg_env(proxy.port, token("dba"), "disable")),
            Endpoint("proxy masked", proxy.port, pg_env(proxy.port, token("agents"), "disable"))]


def set_up(args: argparse.Namespace, stack: contextlib.ExitStack) -> list[Endpoint]:
    def load(conn: psycopg.Connection[Any]) -> None:
        log(f"loading {args.rows} rows ...")
        conn.execute("CREATE TABLE items AS SELECT g AS id, 'user' || g || '@example.com' AS email, "
                     "lpad((g::bigint * 7919 %% 1000000000)::text, 9, '0') AS ssn, "
                     "(ARRAY['north', 'south', 'east', 'west'])[1 + g %% 4] AS region, "
                     "(g %% 10000)::numeric / 100 AS amount FROM generate_series(1, %s) g", (args.rows,))
        conn.execute("VACUUM ANALYZE items")

    return start_masked_stack(stack, load, RULES, "pgproxy-maskbench-")


def check_masking(paths: list[Endpoint]) -> None:
    """Fail early unless the masked path really masks and the others do not."""
    probe = "SELECT email, ssn FROM items WHERE id = 1"
    seen = {}
    for p in paths:
        with psycopg.connect(host="127.0.0.1", port=p.port, user=BENCH_ROLE, password=p.env["PGPASSWORD"],
                             dbname=BENCH_DB, sslmode="disable") as conn:
            seen[p.name] = conn.execute(probe).fetchone()
    if seen["direct"] != seen["proxy exempt"] or seen["proxy masked"] == seen["direct"]:
        raise RuntimeError(f"masking not in effect as expected: {seen}")
    log(f"masked row: {seen['proxy masked']} (raw {seen['direct']})")


def measure(args: argparse.Namespace, paths: list[Endpoint]) -> dict[tuple[str, str, str], list[float]]:
    results: dict[tuple[str, str, str], list[float]] = {}
    for round_no in range(args.rounds):
        order = paths[round_no % len(paths):] + paths[:round_no % len(paths)]
        for qname, query in QUERIES.items():
            for client, fetch in FETCHERS.items():
                for p in order:
                    wait_until_quiet(args.quiet_wait)
                    started = time.perf_counter()
                    rows = fetch(p, query)
                    elapsed = time.perf_counter() - started
                    if rows != args.rows:
                        raise RuntimeError(f"{p.name} returned {rows} rows, expected {args.rows}")
                    results.setdefault((qname, client, p.name), []).append(rows / elapsed)
                    log(f"round {round_no + 1} {qname:<17} {client:<17} {p.name:<13} {rows / elapsed:12,.0f} rows/s")
    return results


def report(args: argparse.Namespace, results: dict[tuple[str, str, str], list[float]], elapsed_s: float) -> str:
    out = ["# Column masking throughput: full-table SELECT, direct vs proxy (exempt / masked)\n"]
    started = dt.datetime.now().astimezone() - dt.timedelta(seconds=elapsed_s)
    out.append(f"Run started {started:%Y-%m-%d %H:%M %Z}, took {elapsed_s / 60:.1f} min. {args.rows:,} rows per "
               f"SELECT, one client at a time, {args.rounds} interleaved rounds (path order rotated each round), "
               "median rows/s shown. No TLS; the proxy writes its JSON-lines audit log as in production.\n")
    out.append("| machine | |\n|---|---|")
    out += [f"| {k} | {v} |" for k, v in machine_facts(None, "see devdb")[:6]]
    out.append("\n## Rows per second (median)\n")
    out.append("| query | client | direct | proxy exempt | proxy masked | exempt/direct | masked/direct | "
               "masked/exempt |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for qname in QUERIES:
        for client in CLIENTS:
            d, e, m = (statistics.median(results[(qname, client, p)]) for p in PATHS)
            out.append(f"| {qname} | {client} | {d:,.0f} | {e:,.0f} | {m:,.0f} | {e / d:.2f} | {m / d:.2f} | "
                       f"{m / e:.2f} |")
    out.append("\n## Every round (rows/s)\n")
    out.append("| query | client | path | " + " | ".join(f"round {i + 1}" for i in range(args.rounds)) + " |")
    out.append("|---|---|---|" + "---:|" * args.rounds)
    for (qname, client, p), values in results.items():
        out.append(f"| {qname} | {client} | {p} | " + " | ".join(fmt(v, ",.0f") for v in values) + " |")
    out.append("\n## Notes\n")
    out.append("- Target: masked/direct >= 0.5. masked/exempt isolates the cost of masking from the cost of the "
               "proxy hop (both go through the same pgproxy process).")
    out.append("- Masks: `email` (keeps the domain) and `partial` (keep_last 4) are computed by PostgreSQL in the "
               "rewritten statement; the proxy also checks every RowDescription (wire backstop).")
    out.append("- All processes share the machine's CPUs; client decoding (psycopg text, asyncpg binary) is part of "
               "every path.")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quiet-wait", type=float, default=10.0,
                   help="wait up to this many seconds for other load to drop before each fetch (0 disables)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "masking.md")
    args = p.parse_args(argv)
    started = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            paths = set_up(args, stack)
            check_masking(paths)
            results = measure(args, paths)
    except KeyboardInterrupt:
        log("interrupted; everything was stopped and removed")
        return 130
    text = report(args, results, time.monotonic() - started)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    log(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
