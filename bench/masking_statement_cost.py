#!/usr/bin/env python3
"""Per-statement cost of reading statements the server's way, for a masked identity (a benchmark).

What it does: starts a throwaway cluster with a small ``items`` table (one masked column) and a view over
it, and ``pgproxy serve`` with a masking rule (``start_masked_stack`` of bench/masking_throughput.py), then runs one
client (psycopg, extended protocol) sending short statements with a fresh literal each, as LLM-written
SQL has, over these paths, interleaved, the order rotated every round:

- ``direct``: straight to PostgreSQL;
- ``proxy exempt``: through the proxy as an identity the rule exempts (no rewrite);
- ``proxy masked, table``: the statement is rewritten (a never-seen text each time);
- ``proxy masked, view``: also one pg_rewrite fingerprint query first (views may be replaced upstream);
- ``proxy masked, scs off``: ``standard_conforming_strings = off`` and a backslash in a literal: the text
  is read with libpg_query under that setting before it is rewritten.

It reports the median microseconds per statement and the added time over ``proxy exempt``.

Run: ``.venv/bin/python bench/masking_statement_cost.py [--statements 2000] [--rounds 3]
[--out bench/results/masking_statement_cost.md]``. Everything it starts is stopped and removed on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
from masking_throughput import start_masked_stack
from pgbench_compare import BENCH_DB, BENCH_ROLE, Endpoint, log, machine_facts

REPO = Path(__file__).resolve().parent.parent
RULES = {"tables": {"public.items": {"applies_to": {"groups": ["agents"]}, "exempt": {"groups": ["dba"]},
                                      "columns": {"email": {"mask": "email"}}}}}
TABLE = "SELECT id, email FROM items WHERE id = {n}"
VIEW = "SELECT id, email FROM items_v WHERE id = {n}"
BACKSLASH = "SELECT id, email, 'a\\b{n}' AS tag FROM items WHERE id = {n}"
# path name -> (endpoint name, statement template, settings sent first)
PATHS = {
    "direct": ("direct", TABLE, None),
    "proxy exempt": ("proxy exempt", TABLE, None),
    "proxy masked, table": ("proxy masked", TABLE, None),
    "proxy masked, view": ("proxy masked", VIEW, None),
    "proxy masked, scs off": ("proxy masked", BACKSLASH, "SET standard_conforming_strings = off"),
}


def set_up(stack: contextlib.ExitStack) -> dict[str, Endpoint]:
    def load(conn: psycopg.Connection[Any]) -> None:
        conn.execute("CREATE TABLE items AS SELECT g AS id, 'user' || g || '@example.com' AS email "
                     "FROM generate_series(1, 10000) g")
        conn.execute("ALTER TABLE items ADD PRIMARY KEY (id)")
        conn.execute("CREATE VIEW items_v AS SELECT id, email FROM items")
        conn.execute("VACUUM ANALYZE items")

    return {e.name: e for e in start_masked_stack(stack, load, RULES, "pgproxy-stmtbench-")}


def run_path(endpoint: Endpoint, template: str, setting: str | None, statements: int, offset: int) -> float:
    """Median microseconds per statement, each with a literal never sent before."""
    with psycopg.connect(host="127.0.0.1", port=endpoint.port, user=BENCH_ROLE, password=endpoint.env["PGPASSWORD"],
                         dbname=BENCH_DB, sslmode="disable", autocommit=True) as conn:
        if setting is not None:
            conn.execute(setting)
        times = []
        for i in range(statements):
            sql = template.format(n=1 + (offset + i) % 10000)
            started = time.perf_counter()
            row = conn.execute(sql, prepare=False).fetchone()
            times.append(time.perf_counter() - started)
            if row is None:
                raise RuntimeError(f"{sql!r} returned no row")
            if endpoint.name == "proxy masked" and "@example.com" in row[1] and row[1].startswith("user"):
                raise RuntimeError(f"masking not in effect: {row}")
    return statistics.median(times) * 1e6


def report(args: argparse.Namespace, results: dict[str, list[float]], elapsed_s: float) -> str:
    out = ["# Per-statement cost of masking and of reading statements the server's way\n"]
    started = dt.datetime.now().astimezone() - dt.timedelta(seconds=elapsed_s)
    out.append(f"Run started {started:%Y-%m-%d %H:%M %Z}, took {elapsed_s / 60:.1f} min. One psycopg client, "
               f"extended protocol, {args.statements} statements per path and round, each with a fresh literal; "
               f"{args.rounds} interleaved rounds (order rotated); median of the rounds' medians. No TLS; JSON-lines "
               "audit log.\n")
    out.append("| machine | |\n|---|---|")
    out += [f"| {k} | {v} |" for k, v in machine_facts(None, "see devdb")[:6]]
    out.append("\n| path | µs per statement | added over proxy exempt |")
    out.append("|---|---:|---:|")
    exempt = statistics.median(results["proxy exempt"])
    for name in PATHS:
        value = statistics.median(results[name])
        added = "" if name in ("direct", "proxy exempt") else f"{value - exempt:+.0f} µs"
        out.append(f"| {name} | {value:.0f} | {added} |")
    out.append("\n## Notes\n")
    out.append("- `proxy masked, table`: classification and rewrite of a never-seen text (no cache hit), the "
               "server computing the mask.")
    out.append("- `proxy masked, view`: plus one fingerprint query of pg_rewrite on a kept connection, so a view "
               "created or replaced upstream is never judged on a stale definition.")
    out.append("- `proxy masked, scs off`: plus parsing with libpg_query under standard_conforming_strings = off "
               "and deparsing (only texts with a backslash take this path).")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--statements", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "masking_statement_cost.md")
    args = p.parse_args(argv)
    started = time.monotonic()
    results: dict[str, list[float]] = {}
    with contextlib.ExitStack() as stack:
        endpoints = set_up(stack)
        names = list(PATHS)
        for round_no in range(args.rounds):
            for name in names[round_no % len(names):] + names[:round_no % len(names)]:
                endpoint, template, setting = PATHS[name]
                value = run_path(endpoints[endpoint], template, setting, args.statements, round_no * args.statements)
                results.setdefault(name, []).append(value)
                log(f"round {round_no + 1} {name:<22} {value:8.0f} µs/statement")
    text = report(args, results, time.monotonic() - started)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
